"""Running workers survive restarts and crashes of their gateway (issue 8), on the simulated site
with the real ocserv, openconnect, slirp4netns and dnsmasq; every product process runs as the
site's unprivileged user."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import VP, comm, wait_until
from polling import Poller, descendants

pytestmark = pytest.mark.site

MODES = ("relay", "tunnel", "relay-only")
RECOVERY_LIMIT = 5.0  # seconds after `gateway start` returns (the promise)


@pytest.fixture
def own_gateway(site_env, start_gateway):
    """A gateway of this test's own (its own ports), so stopping it disturbs no other test."""
    (site_env.site.workdir / "www" / "hello.txt").write_text("hello\n")
    gw = start_gateway("gw-resilience")
    yield gw
    gw.stop()
    assert site_env.leftovers() == set()


def _kill(gw, what: str) -> None:
    supervisor = gw.pid
    if what == "stop":
        done = gw.stop()
        assert done.returncode == 0, done.stderr
    else:
        family = {supervisor} | descendants(supervisor)
        victims = [p for p in family if p == supervisor] if what == "supervisor" else \
            [p for p in family if comm(p).startswith(what)]
        assert victims, f"no {what} process among the gateway's {[(p, comm(p)) for p in family]}"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    # Whatever died, the rest of the gateway follows it (parent-death signals, the supervisor's
    # watch); only then can a new one start.
    assert wait_until(lambda: not Path(f"/proc/{supervisor}").exists()
                      or comm(supervisor) in ("", "zombie"), 15), f"the gateway outlived its {what}"


def test_running_workers_in_every_mode_survive_gateway_restarts_and_crashes(site_env, own_gateway):
    gw = own_gateway
    workers = {mode: Poller(site_env.site, site_env.node, gw.ticket, mode, site_env.http_url) for mode in MODES}
    try:
        for w in workers.values():
            assert wait_until(lambda w=w: w.ok_since(0), 30), f"{w.mode}: never up: {w.stderr} {w.polls}"
        assert all(w.cmd_alive() for w in workers.values())
        measured: dict[str, list[float]] = {mode: [] for mode in MODES}
        for what in ("stop", "supervisor", "ocserv-main", "slirp4netns", "vpnp-gw-relay"):
            _kill(gw, what)
            gone = time.time()
            time.sleep(3.5)  # every worker notices, and polls a few times without a gateway
            gw.start()
            returned = time.time()
            for mode, w in workers.items():  # meanwhile, polls failed at once: none hung
                stamps = [t for t, _, _ in w.polls if gone + 1.0 < t < returned]
                gaps = [b - a for a, b in zip(stamps, stamps[1:])]
                assert stamps and max(gaps, default=0) < 2.5, f"{mode} after {what}: polls hung: {stamps}"
            for mode, w in workers.items():
                assert wait_until(lambda w=w: w.ok_since(returned), RECOVERY_LIMIT + 2), \
                    f"{mode} after {what}: no DNS+HTTP since start returned; polls {w.polls[-8:]}, stderr {w.stderr}"
                took = w.ok_since(returned)
                assert took <= RECOVERY_LIMIT, f"{mode} after {what}: took {took:.1f} s"
                measured[mode].append(took)
        for mode, w in workers.items():
            assert w.cmd_alive(), f"{mode}: CMD ended or was replaced: {w.stderr}"
        # What an operator sees: each worker, its transport, its traffic and its reconnections.
        shown = gw.command("status", "--json")
        assert shown.returncode == 0, shown.stderr
        rows = {row["worker"]: row for row in json.loads(shown.stdout)["workers"]}
        for mode, w in workers.items():
            row = rows.get(f"vpnp-{w.proc.pid}")
            assert row, f"{mode} worker missing from gateway status: {rows}"
            assert row["transport"] == mode and row["node"] == site_env.node.addr, row
            assert row["bytes_in"] > 0 and row["bytes_out"] > 0, row
            assert row["reconnections"] == (0 if mode == "relay-only" else 5), row
        for mode in ("relay", "tunnel"):  # one line per drop and one per return, nothing else
            lines = [ln for ln in workers[mode].stderr if ln.startswith("vpn-provider: tunnel")]
            assert sum("lost" in ln for ln in lines) == 5 and sum("back via" in ln for ln in lines) == 5, lines
        print("recovery after start returned (s):", {m: [round(t, 2) for t in v] for m, v in measured.items()})
    finally:
        for w in workers.values():
            w.stop()


def test_a_worker_whose_gateway_never_returns_ends_loudly(site_env, own_gateway):
    """--reconnect-timeout: without a gateway for that long, CMD gets SIGTERM and says why."""
    gw = own_gateway
    done = {}

    def run():
        done["r"] = site_env.exec_("sleep", "120", ticket=gw.ticket,
                                   extra=("--tcp", "tunnel", "--reconnect-timeout", "3"), timeout=90)
    runner = threading.Thread(target=run)
    runner.start()
    assert wait_until(lambda: any(comm(p) == "sleep" for p in site_env.site.user_pids()), 20)
    _kill(gw, "stop")
    started = time.monotonic()
    runner.join(60)
    assert not runner.is_alive()
    r = done["r"]
    assert r.returncode == 128 + signal.SIGTERM or r.returncode == -signal.SIGTERM, (r.returncode, r.stderr)
    assert "no gateway took the tunnel back within 3 s" in r.stderr, r.stderr
    assert time.monotonic() - started < 15


def test_a_transfer_through_the_tunnel_fails_soon_after_the_gateway_goes(site_env, own_gateway):
    """No hang: the keeper resets the tunnel's TCP connections when the tunnel drops."""
    gw = own_gateway
    proc = site_env.site.popen_user(site_env.node, [
        VP, "exec", "--ticket", str(gw.ticket), "--tcp", "tunnel", "--",
        "curl", "-sS", "--limit-rate", "2M", "-o", "/dev/null", f"{site_env.http_url}/big.bin"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: any(comm(p) == "curl" for p in site_env.site.user_pids()), 20)
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()
        _kill(gw, "stop")
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=40)
        assert time.monotonic() - stopped < 30
        assert proc.returncode != 0, "a cut transfer looked complete"
        assert "tunnel to" in err and "lost" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
