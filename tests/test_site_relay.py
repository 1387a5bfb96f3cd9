"""The TCP relay on the simulated site: the fallback to the tunnel when it cannot be used, a
gateway without it, and failures the application must see quickly."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import VP, comm, wait_until

pytestmark = pytest.mark.site


_COUNT_20MB_AND_TUN = ("curl -sS -f {url}/big.bin | head -c 20971520 | wc -c; "
                       "echo tun_rx_bytes=$(sed -n 's/^ *vpn0: *\\([0-9]*\\).*/\\1/p' /proc/net/dev)")



def _tun_rx(stdout: str) -> int:
    return int(re.search(r"tun_rx_bytes=(\d+)", stdout).group(1))


def test_unreachable_relay_falls_back_to_the_tunnel_with_one_warning(site_env, start_gateway):
    """A site firewall that lets the VPN port through but not the relay's must cost speed, not
    the job."""
    site = site_env.site
    gw = start_gateway("gw-relay-blocked")
    relay = gw.relay_port
    try:
        assert json.loads(gw.ticket.read_text())["relay_port"] == gw.port + 1
        site.drop(relay, "tcp")
        t0 = time.monotonic()
        done = site_env.exec_("sh", "-c", _COUNT_20MB_AND_TUN.format(url=site_env.http_url),
                              ticket=gw.ticket, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == "20971520"
        assert _tun_rx(done.stdout) > 20_000_000, "the data did not come through the tunnel"
        # (curl also complains: head closes the pipe after 20 MB)
        warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("vpn-provider:")]
        assert len(warnings) == 1 and "TCP goes through the tunnel" in warnings[0] and str(relay) in warnings[0]
        assert time.monotonic() - t0 < 15
        check = site_env.vp(site_env.node, "check", "--ticket", str(gw.ticket), "--dns-name", "www.sim.test",
                            timeout=90)
        assert check.returncode == 0, check.stdout  # a warning, not a failure: jobs still run
        line = next(ln for ln in check.stdout.splitlines() if ln.startswith(f"TCP relay 198.19.20.1:{relay}"))
        assert " warn " in line, line
        # relay-only has nothing to fall back to: a one-line error within the time-out
        t0 = time.monotonic()
        only = site_env.exec_("true", ticket=gw.ticket, extra=("--tcp", "relay-only", "--timeout", "4"))
        assert only.returncode == 125 and time.monotonic() - t0 < 8
        assert only.stderr.startswith(f"vpn-provider: VPN tunnel failed: relay 198.19.20.1:{relay}"), only.stderr
        assert len(only.stderr.splitlines()) == 1, only.stderr
    finally:
        site.drop(relay, "tcp", undo=True)
    gw.stop()
    assert site_env.leftovers() == set()


def test_gateway_without_relay_keeps_tcp_in_the_tunnel(site_env, start_gateway):
    site = site_env.site
    before = set(site.user_pids())
    gw = start_gateway("gw-no-relay", "--no-relay")
    assert json.loads(gw.ticket.read_text())["relay_port"] == 0
    names = {comm(pid) for pid in set(site.user_pids()) - before}
    assert "vpnp-gw-relay" not in names and "ocserv-main" in names
    done = site_env.exec_("sh", "-c", _COUNT_20MB_AND_TUN.format(url=site_env.http_url), ticket=gw.ticket,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "20971520" and _tun_rx(done.stdout) > 20_000_000
    assert "vpn-provider:" not in done.stderr
    only = site_env.exec_("true", ticket=gw.ticket, extra=("--tcp", "relay-only"))
    assert only.returncode == 125 and "runs no TCP relay" in only.stderr.splitlines()[0], only.stderr
    gw.stop()
    assert site_env.leftovers() == set()


def test_closed_port_through_the_relay_fails_fast(site_env):
    """Nothing listens on port 81 of the internet host: the application must get an error at
    once, not hang. Through the relay that error is a reset (the helper accepted the connection
    locally before the gateway found the port closed); through the tunnel it would be
    "connection refused" (curl's 7), so 56 also proves the relay carried the attempt."""
    done = site_env.exec_("sh", "-c", f"t0=$(date +%s); curl -sS -m 30 {site_env.http_url}:81/ ; rc=$?; "
                          "echo rc=$rc seconds=$(( $(date +%s) - t0 ))")
    assert done.returncode == 0, done.stderr
    rc, seconds = map(int, re.search(r"rc=(\d+) seconds=(\d+)", done.stdout).groups())
    assert rc == 56 and "reset" in done.stderr, done.stderr
    assert "TCP goes through the tunnel" not in done.stderr
    assert seconds <= 3
    assert site_env.leftovers() == set()


# AI_ADDRCONFIG ignores loopback addresses: relay-only's namespace must have another IPv4 one.
IPV4_ONLY_LOOKUP = ("python3 -c \"import socket; socket.getaddrinfo('www.sim.test', 80, socket.AF_INET, 0, 0, "
                    "socket.AI_ADDRCONFIG)\"")


# Relay-only carries no other UDP: sending some must fail at once (no route), not vanish.
UDP_OUT = ("python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
           "('198.18.10.1', 123))\" 2>/dev/null")


def test_relay_only_worker_is_one_small_process_and_leaves_nothing(site_env):
    """No openconnect: the worker's only companion is the native helper. What it alone holds
    is its anonymous memory (about 0.4 MB idle); its code, libcrypto's included, is file pages that
    every helper on the node shares (PSS 0.9 MB each with four workers, docs/benchmarks.md).
    When CMD ends, so does the helper."""
    site = site_env.site
    proc = site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--tcp", "relay-only",
                                           "--", "sh", "-c", f"getent hosts www.sim.test && {IPV4_ONLY_LOOKUP} && "
                                           f"! {UDP_OUT} && curl -sS -f -o /dev/null "
                                           f"{site_env.http_url}/big.bin && exec sleep 300"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: comm(proc.pid) == "sleep", 60), \
            proc.stderr.read() if proc.poll() is not None else "CMD never got to sleep"
        companions = {pid: comm(pid) for pid in set(site.user_pids()) - site_env.baseline - {proc.pid}}
        assert sorted(companions.values()) == ["vpnp-helper"], companions
        [helper] = companions
        own_kb = int(re.search(r"^Anonymous:\s+(\d+)", Path(f"/proc/{helper}/smaps_rollup").read_text(),
                               re.M).group(1))
        assert own_kb < 1024, f"the helper holds {own_kb} kB of its own"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert site_env.leftovers() == set()


def test_relay_only_needs_no_tun_device(site_env):
    """A node whose /dev/net/tun is 0600 cannot run the tunnel, but relay-only mode never opens
    it, and a plain exec takes it by itself. (Changes the machine's device mode for a moment: the
    suite runs one site at a time.)"""
    import os
    mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o600)
    try:
        only = site_env.exec_("curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{http_code}", f"{site_env.http_url}/",
                              extra=("--tcp", "relay-only"))
        assert only.returncode == 0 and only.stdout == "200", only.stderr
        tunnel = site_env.exec_("true", extra=("--tcp", "relay"))
        assert tunnel.returncode == 125 and len(tunnel.stderr.splitlines()) == 1, tunnel.stderr
        chosen = site_env.exec_("true")  # the transport left to exec: it takes what the node allows
        assert chosen.returncode == 0, chosen.stderr
        assert chosen.stderr == ("vpn-provider: transport relay-only (TCP and DNS only): "
                                 "/dev/net/tun cannot be opened (Permission denied)\n")
    finally:
        os.chmod("/dev/net/tun", mode)
    assert site_env.leftovers() == set()
