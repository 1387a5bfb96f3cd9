"""A site without the distribution's VPN packages, on the simulated site: a gateway whose host has
no ocserv, slirp4netns or pasta comes up with the relay alone, and a plain `exec` on a node
without openconnect chooses relay-only by itself. Hosts lack a program here the way a real
login or compute node does: it is not there (/dev/null bound over every copy, Site.as_user)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.site

GATEWAY_HOST_LACKS = ("ocserv", "occtl", "slirp4netns", "pasta", "passt", "gcc", "cc")
NODE_LACKS = ("openconnect", "gcc", "cc")
FETCH = 'curl -sS -f {url}/big.bin | sha256sum | cut -d" " -f1'


def _fetch_by_name(site_env, ticket, hide=NODE_LACKS, extra=()):
    return site_env.exec_("sh", "-c", FETCH.format(url=site_env.http_url), ticket=ticket, extra=extra, hide=hide)


def test_a_gateway_without_ocserv_or_an_egress_runs_the_relay_alone(site_env, start_gateway):
    gw = start_gateway("gw-relay-alone", hide=GATEWAY_HOST_LACKS)
    assert "the relay alone, TCP and DNS: ocserv and occtl are not installed on this host" in gw.started.stdout
    ticket = gw.ticket
    assert json.loads(ticket.read_text())["tunnel"] is False
    assert not (gw.state / "ocpasswd").exists()  # nothing of the tunnel's, and no openssl needed

    fetched = _fetch_by_name(site_env, ticket, hide=())  # this node has openconnect: no use for it
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == site_env.big_sha
    assert "transport relay-only (TCP and DNS only): the gateway offers no tunnel" in fetched.stderr

    forced = site_env.exec_("true", ticket=ticket, extra=("--tcp", "tunnel"))
    assert forced.returncode == 125
    assert forced.stderr == ("vpn-provider: VPN tunnel failed: --tcp tunnel: the gateway offers no tunnel "
                             "(it runs the relay alone); leave --tcp out, or pass --tcp relay-only\n")

    check = site_env.vp(site_env.node, "check", "--ticket", str(ticket), "--dns-name", "www.sim.test",
                        timeout=90, hide=NODE_LACKS)
    rows = {ln.split("  ")[0]: ln for ln in check.stdout.splitlines()}
    assert check.returncode == 0, check.stdout
    assert " ok " in rows["transports"]
    assert "the relay alone (TCP and DNS); exec takes relay-only" in rows["transports"]
    assert " ok " in rows["relay-only worker"] and " ok " in rows["DNS through the relay (www.sim.test)"]

    status = gw.command("status", "--json")  # on the gateway's host, which lacks the packages
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["relay"]["encryption"] == "AES-128-GCM"
    gw.stop()
    assert site_env.leftovers() == set()


def test_a_plain_exec_on_a_node_without_openconnect_takes_relay_only(site_env):
    """The site's full gateway (tunnel and relay); the node has no openconnect."""
    fetched = _fetch_by_name(site_env, site_env.ticket)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == site_env.big_sha
    assert fetched.stderr.strip() == ("vpn-provider: transport relay-only (TCP and DNS only): "
                                      "openconnect is not installed on this node")
    assert site_env.leftovers() == set()


def test_a_plain_exec_on_a_node_with_openconnect_takes_the_tunnel_and_says_nothing(site_env):
    fetched = site_env.exec_("sh", "-c", "ip -o link show vpn0 >/dev/null && " + FETCH.format(url=site_env.http_url))
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == site_env.big_sha
    assert fetched.stderr == ""
