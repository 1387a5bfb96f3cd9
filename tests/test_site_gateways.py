"""Several gateways, one ticket (issue 8): two login hosts each run a gateway with shared
credentials; workers spread over both and move to the other within 5 s when theirs dies. Real
ocserv, openconnect, slirp4netns and dnsmasq on a site of its own (two login hosts, two nodes)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import VP, _site_skip_reason, comm, wait_until
from polling import Poller, descendants

pytestmark = pytest.mark.site

FAILOVER_LIMIT = 5.0


@pytest.fixture
def two_login_site():
    reason = _site_skip_reason()
    if reason:
        pytest.skip(reason)
    from vpn_provider.sim import services
    from vpn_provider.sim.site import Site
    prior_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)  # an ordinary compute node (see conftest)
    site = Site(nodes=2, logins=2).build()
    try:
        root = services.docroot(site)
        (root / "hello.txt").write_text("hello\n")
        services.start_dns(site)
        yield site, services.start_http(site, root)
    finally:
        site.close()
        os.chmod("/dev/net/tun", prior_mode)


def _clients(site, login, state) -> int:
    """Workers with a tunnel session at this gateway."""
    done = site.run_user(login, [VP, "gateway", "status", "--state-dir", str(state), "--json"])
    assert done.returncode == 0, done.stderr
    return sum(w["vpn_ip"] != "" for w in json.loads(done.stdout)["workers"])


def test_two_gateways_share_one_ticket_spread_workers_and_take_over(two_login_site):
    site, http_url = two_login_site
    shared = site.home / "vpn"
    states = [site.home / f"gw-{login.ns}" for login in site.logins]
    for login, state in zip(site.logins, states):
        done = site.run_user(login, [VP, "gateway", "start", "--state-dir", str(state), "--credentials", str(shared)])
        assert done.returncode == 0, done.stderr
    ticket = shared / "ticket.json"
    listed = json.loads(ticket.read_text())["gateways"]
    assert {f"{login.addr}:8443" for login in site.logins} <= set(listed), listed

    # Twelve workers with a tunnel (so each is a client of one ocserv) and two relay-only ones.
    modes = ["relay", "tunnel"] * 6 + ["relay-only"] * 2
    workers = [Poller(site, site.nodes[i % 2], ticket, mode, http_url) for i, mode in enumerate(modes)]
    try:
        for w in workers:
            assert wait_until(lambda w=w: w.ok_since(0), 60), f"{w.mode}: never up: {w.stderr} {w.polls}"
        spread = [_clients(site, login, state) for login, state in zip(site.logins, states)]
        assert sum(spread) == 12 and min(spread) > 0, f"workers per gateway: {spread}"

        supervisor = int((states[0] / "gateway.pid").read_text())
        family = {supervisor} | descendants(supervisor)
        for pid in family:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        for w in workers:
            assert wait_until(lambda w=w: w.ok_since(killed + 0.5), FAILOVER_LIMIT + 3), \
                f"{w.mode}: no DNS+HTTP after the first gateway died: {w.polls[-6:]} {w.stderr}"
            took = w.ok_since(killed + 0.5) + 0.5
            assert took <= FAILOVER_LIMIT, f"{w.mode}: took {took:.1f} s"
        assert wait_until(lambda: _clients(site, site.logins[1], states[1]) == 12, 10)
        assert all(w.cmd_alive() for w in workers)
        moved = [w for w in workers if any("back via" in ln for ln in w.stderr)]
        assert moved and all(f"{site.logins[1].addr}:8443" in "".join(w.stderr) for w in moved)
    finally:
        for w in workers:
            w.stop()
        site.run_user(site.logins[1], [VP, "gateway", "stop", "--state-dir", str(states[1])])
    assert wait_until(lambda: not site.user_pids(), 15), [(p, comm(p)) for p in site.user_pids()]


def test_gateways_sharing_credentials_must_agree_on_the_relay_port(two_login_site):
    site, _ = two_login_site
    shared = site.home / "vpn"
    first = site.run_user(site.logins[0], [VP, "gateway", "start", "--state-dir", str(site.home / "a"),
                                           "--credentials", str(shared)])
    assert first.returncode == 0, first.stderr
    try:
        second = site.run_user(site.logins[1], [VP, "gateway", "start", "--state-dir", str(site.home / "b"),
                                                "--credentials", str(shared), "--relay-port", "9999"])
        assert second.returncode == 1
        assert len(second.stderr.strip().splitlines()) == 1 and "relay port" in second.stderr, second.stderr
    finally:
        site.run_user(site.logins[0], [VP, "gateway", "stop", "--state-dir", str(site.home / "a")])
    assert wait_until(lambda: not site.user_pids(), 15)
