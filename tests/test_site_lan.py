"""The simulated site as a real cluster lays it out: compute nodes and login hosts on one LAN, the
login hosts alone on the upstream network. And the gateway on it: every node reaches it with the
default listen address, and `gateway stop` still works once its state dir is gone.

Each test builds its own site (not the session's `site_env`), so it can pick the layout."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VP, own_site, wait_until

pytestmark = pytest.mark.site

NAME_PORT = 7007  # each host of a test site answers a TCP connection here with its namespace's name

# Run as root in a host's namespace: send our namespace's name to whoever connects.
_NAME_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(sys.argv[3].encode())
"""

# Run as root in a host's namespace: who answers at each address (or why nobody does).
_ASK_NAMES = """
import errno, json, socket, sys, time
port, out = int(sys.argv[1]), {}
for addr in sys.argv[2:]:
    deadline = time.monotonic() + 5
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2) as s:
                out[addr] = s.recv(100).decode()
        except ConnectionRefusedError:  # that host's name server may still be starting
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            out[addr] = "refused"
        except TimeoutError:
            out[addr] = "timeout"
        except OSError as e:
            out[addr] = errno.errorcode.get(e.errno, str(e))
        break
print(json.dumps(out))
"""


def _serve_names(site, hosts) -> None:
    for host in hosts:
        site.start_service(host, [sys.executable, "-c", _NAME_SERVER, host.addr, str(NAME_PORT), host.ns],
                           f"names-{host.ns}")


def _ask(site, host, addrs) -> dict[str, str]:
    done = subprocess.run(site.as_root(host, [sys.executable, "-c", _ASK_NAMES, str(NAME_PORT), *addrs]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _lines_with(prefix: str, argv: list[str]) -> list[str]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if prefix in line]


def _traces(prefix: str) -> list[str]:
    """The site's namespaces, root-namespace interfaces and /etc/netns entries."""
    return (_lines_with(prefix, ["ip", "netns", "list"]) + _lines_with(prefix, ["ip", "-o", "link"])
            + [str(p) for p in Path("/etc").glob(f"netns/{prefix}*")])


def test_nodes_and_login_share_one_lan():
    from vpn_provider.sim.site import INET_ADDR, Site
    with Site(nodes=4) as site:
        assert [n.addr for n in site.nodes] == [f"198.19.20.{10 + i}" for i in range(4)]
        assert site.login.addr == "198.19.20.1" and site.logins == [site.login]
        _serve_names(site, [site.inet, site.login, *site.nodes])
        lan = [site.login, *site.nodes]
        for node in site.nodes:
            answers = _ask(site, node, [h.addr for h in lan if h != node] + [INET_ADDR])
            assert answers == {**{h.addr: h.ns for h in lan if h != node}, INET_ADDR: "ENETUNREACH"}, node.ns
        # The internet host is up and answers the login host: the nodes' failure above is the layout.
        assert _ask(site, site.login, [INET_ADDR]) == {INET_ADDR: site.inet.ns}


def test_two_login_hosts_reach_the_internet_and_every_node_reaches_both():
    from vpn_provider.sim.site import INET_ADDR, Site
    with Site(nodes=2, logins=2) as site:
        prefix = site.prefix
        assert [h.addr for h in site.logins] == ["198.19.20.1", "198.19.20.2"] and site.login == site.logins[0]
        _serve_names(site, [site.inet, *site.logins])
        for login in site.logins:
            assert _ask(site, login, [INET_ADDR]) == {INET_ADDR: site.inet.ns}, login.ns
            resolv = (Path("/etc/netns") / login.ns / "resolv.conf").read_text()
            assert f"nameserver {INET_ADDR}" in resolv
        for node in site.nodes:
            assert _ask(site, node, [h.addr for h in site.logins]) == {h.addr: h.ns for h in site.logins}, node.ns
        assert len(_lines_with(prefix, ["ip", "netns", "list"])) == 6  # switch, inet, 2 logins, 2 nodes
        assert _lines_with(prefix, ["ip", "-o", "link"]) == [], "the site put an interface into the root namespace"
    assert _traces(prefix) == [], "close() left something behind"


# These gateways listen on the default address (their sites are their own): each test stops its
# gateway itself, while its site is still up.
def _stop_and_check_nothing_left(gw) -> None:
    stopped = gw.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: not gw.site.user_pids(), 10), f"stop left processes: {gw.site.user_pids()}"


def test_gateway_with_default_listen_serves_every_node(start_gateway):
    with own_site(nodes=2) as site:
        gw = start_gateway("gw", site=site, listen=False)
        try:
            for node in site.nodes:
                done = site.run_user(node, [VP, "exec", "--ticket", str(gw.ticket), "--", "true"])
                assert done.returncode == 0, (node.ns, done.stderr)
        finally:
            _stop_and_check_nothing_left(gw)


def test_duplicate_host_address_is_listened_on_once(start_gateway):
    """The same address on two interfaces of the login host (as on some real login nodes) is
    reported once, and the gateway comes up on the default listen address."""
    from vpn_provider.sim.site import LOGIN_DOWN_ADDR, LOGIN_UP_ADDR
    from pyroute2 import NetNS
    with own_site(nodes=1) as site:
        with NetNS(site.login.ns) as ns:  # a port-less bridge stands in for a second NIC
            ns.link("add", ifname=f"{site.prefix}dup", kind="bridge")
            ns.addr("add", index=ns.link_lookup(ifname=f"{site.prefix}dup")[0], address=LOGIN_DOWN_ADDR,
                    prefixlen=32)
        listed = subprocess.run(site.as_root(site.login, ["ip", "-4", "-o", "addr"]), capture_output=True,
                                text=True, check=True).stdout
        assert listed.count(f" {LOGIN_DOWN_ADDR}/") == 2, listed
        seen = site.run_user(site.login, [str(Path(VP).parent / "python"), "-c",
                                          "from vpn_provider.gateway.supervisor import host_addresses as h; "
                                          "print(' '.join(h()))"])
        in_kernel_order = [line.split()[3].split("/")[0] for line in listed.splitlines() if " lo " not in line]
        assert seen.stdout.split() == list(dict.fromkeys(in_kernel_order)), seen.stderr
        assert sorted(seen.stdout.split()) == [LOGIN_UP_ADDR, LOGIN_DOWN_ADDR]
        gw = start_gateway("gw", site=site, listen=False)
        try:
            done = site.run_user(site.nodes[0], [VP, "exec", "--ticket", str(gw.ticket), "--", "true"])
            assert done.returncode == 0, done.stderr
        finally:
            _stop_and_check_nothing_left(gw)


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_stop_finds_the_gateway_after_its_state_dir_vanished(start_gateway, how):
    with own_site(nodes=1) as site:
        gw = start_gateway("gw", site=site, listen=False)
        state = gw.state
        try:
            pid = gw.pid
            if how == "removed":
                shutil.rmtree(state)
            else:
                state.rename(site.home / "gw-elsewhere")
            assert not state.exists()
            assert pid in site.user_pids()
        finally:
            _stop_and_check_nothing_left(gw)
        again = site.run_user(site.login, [VP, "gateway", "stop", "--state-dir", str(state)])
        assert again.returncode == 1 and "no gateway runs" in again.stderr
