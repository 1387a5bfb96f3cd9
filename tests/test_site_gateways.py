"""Several gateways, one ticket (issue 8): two login hosts each run a gateway with shared
credentials; workers spread over both and move to the other within 5 s when theirs dies. Real
ocserv, openconnect, slirp4netns and dnsmasq on a site of its own (two login hosts, two nodes)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import VP, comm, gateway_ports, own_site, wait_until
from polling import Poller, descendants

pytestmark = pytest.mark.site

FAILOVER_LIMIT = 5.0


@pytest.fixture
def two_login_site():
    from vpn_provider.sim import services
    with own_site(nodes=2, logins=2) as site:
        root = services.docroot(site)
        (root / "hello.txt").write_text("hello\n")
        services.start_dns(site)
        yield site, services.start_http(site, root)


def test_two_gateways_share_one_ticket_spread_workers_and_take_over(two_login_site, start_gateway):
    site, http_url = two_login_site
    shared = site.home / "vpn"
    # On the default listen address: each login host is a host of its own.
    gateways = [start_gateway(f"gw-{login.ns}", "--credentials", str(shared), site=site, host=login, listen=False)
                for login in site.logins]
    ticket = shared / "ticket.json"
    listed = json.loads(ticket.read_text())["gateways"]
    assert {f"{login.addr}:8443" for login in site.logins} <= set(listed), listed

    # Twelve workers with a tunnel (so each is a client of one ocserv) and two relay-only ones.
    modes = ["relay", "tunnel"] * 6 + ["relay-only"] * 2
    workers = [Poller(site, site.nodes[i % 2], ticket, mode, http_url) for i, mode in enumerate(modes)]
    try:
        for w in workers:
            assert wait_until(lambda w=w: w.ok_since(0), 60), f"{w.mode}: never up: {w.stderr} {w.polls}"
        spread = [gw.tunnel_clients() for gw in gateways]
        assert sum(spread) == 12 and min(spread) > 0, f"workers per gateway: {spread}"

        supervisor = gateways[0].pid
        family = {supervisor} | descendants(supervisor)
        for pid in family:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        for w in workers:
            assert wait_until(lambda w=w: w.ok_since(killed + 0.5), FAILOVER_LIMIT + 3), \
                f"{w.mode}: no DNS+HTTP after the first gateway died: {w.polls[-6:]} {w.stderr}"
            took = w.ok_since(killed + 0.5) + 0.5
            assert took <= FAILOVER_LIMIT, f"{w.mode}: took {took:.1f} s"
        assert wait_until(lambda: gateways[1].tunnel_clients() == 12, 10)
        assert all(w.cmd_alive() for w in workers)
        moved = [w for w in workers if any("back via" in ln for ln in w.stderr)]
        assert moved and all(f"{site.logins[1].addr}:8443" in "".join(w.stderr) for w in moved)
    finally:
        for w in workers:
            w.stop()
        gateways[1].stop()
    assert wait_until(lambda: not site.user_pids(), 15), [(p, comm(p)) for p in site.user_pids()]


def test_gateways_sharing_credentials_must_agree_on_the_relay_port(two_login_site, start_gateway):
    site, _ = two_login_site
    shared = site.home / "vpn"
    first = start_gateway("a", "--credentials", str(shared), site=site, listen=False)
    _, other_relay_port = gateway_ports()
    second = site.run_user(site.logins[1], [VP, "gateway", "start", "--state-dir", str(site.home / "b"),
                                            "--credentials", str(shared), "--relay-port", str(other_relay_port)])
    assert second.returncode == 1
    assert len(second.stderr.strip().splitlines()) == 1 and "relay port" in second.stderr, second.stderr
    first.stop()
    assert wait_until(lambda: not site.user_pids(), 15)
