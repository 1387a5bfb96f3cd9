"""The tunnel's destination policy (gateway/forward_policy.py) against the real kernel.

A throwaway user namespace holds three network namespaces of its own: the worker's (a tun
device, vpn0, with a VPN address), the gateway's (a tun device, vpns0, as ocserv makes one
per client, forwarding to an egress veth) and "the world" behind the egress, with listening
sockets on the addresses a worker must or must not reach. A thread copies packets between the
two tun devices, as openconnect and ocserv do. No traffic leaves these namespaces.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time

import pytest

from test_redirect import _in_namespace
from vpn_provider import linux
from vpn_provider.gateway import forward_policy
from vpn_provider.policy import Policy

WORKER = "100.64.0.5"
LOGIN_NODE = "198.19.20.1"  # the login node's own address, seen from the gateway beyond the egress
WORLD = ("169.254.169.254", "198.18.10.1", "198.18.11.1", LOGIN_NODE, "10.0.2.3")
TCP_PORTS, UDP_PORT = (53, 80, 1094, 8443), 53
SLIRP = {"host_addresses": [LOGIN_NODE], "resolvers": ["10.0.2.3"], "egress_aliases": ["10.0.2.0/24"]}
GATEWAY = "10.0.2.100"  # the gateway namespace's own address on the egress
OCSERV_PORT = 8443
REFUSED_WITHIN = 1.0  # seconds: a refusal must not look like a time-out


def _netns() -> int:
    return os.open("/proc/self/ns/net", os.O_RDONLY)


def _copy(src: int, dst: int) -> None:
    try:
        while True:
            os.write(dst, os.read(src, 65536))
    except OSError:
        pass


def _world(gateway_ns: int) -> None:
    """In a new network namespace: the egress' far side (10.0.2.2) with every WORLD address,
    TCP listeners on TCP_PORTS and UDP echoes on UDP_PORT."""
    from pyroute2 import IPRoute
    linux.unshare(linux.CLONE_NEWNET)
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for address in WORLD:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=32)
        ipr.link("add", ifname="world", kind="veth", peer="egress")
        ipr.link("set", index=ipr.link_lookup(ifname="egress")[0], net_ns_fd=gateway_ns)
        world = ipr.link_lookup(ifname="world")[0]
        ipr.addr("add", index=world, address="10.0.2.2", prefixlen=24)
        ipr.link("set", index=world, state="up")
        ipr.route("add", dst="100.64.0.0/16", gateway="10.0.2.100")
    for port in TCP_PORTS:
        socket.create_server(("0.0.0.0", port)).detach()  # the backlog completes handshakes
    for address in WORLD:  # one socket each, so that each answers from the address asked
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind((address, UDP_PORT))
        threading.Thread(target=_echo, args=(echo,), daemon=True).start()


def _echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def _worker() -> int:
    """In a new network namespace: vpn0 with the worker's address and the default route."""
    from pyroute2 import IPRoute
    linux.unshare(linux.CLONE_NEWNET)
    tun = linux.create_tun("vpn0")
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        vpn0 = ipr.link_lookup(ifname="vpn0")[0]
        ipr.addr("add", index=vpn0, address=WORKER, prefixlen=32)
        ipr.link("set", index=vpn0, state="up")
        ipr.route("add", dst="0.0.0.0/0", oif=vpn0)
    return tun


def _gateway() -> None:
    """Back in the gateway's namespace: ocserv's tun toward the worker, the egress toward the world."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        vpns0 = ipr.link_lookup(ifname="vpns0")[0]
        ipr.link("set", index=vpns0, state="up")
        ipr.route("add", dst=f"{WORKER}/32", oif=vpns0)
        egress = ipr.link_lookup(ifname="egress")[0]
        ipr.addr("add", index=egress, address="10.0.2.100", prefixlen=24)
        ipr.link("set", index=egress, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.0.2.2")
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


def _probe(kind: str, host: str, port: int) -> list:
    """[outcome, seconds] of one TCP connect, or one UDP datagram and its echo."""
    t0 = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        if kind == "udp":
            s.send(b"ping")
            s.recv(100)
        outcome = "ok"
    except socket.timeout:
        outcome = "timeout"
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
    return [outcome, round(time.monotonic() - t0, 3)]


def _lab(policy: Policy | None, probes: list[str], **install_args) -> dict:
    """In the throwaway user namespace: build the three namespaces, install ``policy`` (None:
    none at all), run each probe ("tcp host:port" or "udp host:port") from the worker, and
    return the outcomes and the refusals the log socket received."""
    gateway_ns = _netns()
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return {"skip": "/dev/net/tun is not usable here"}
    client_tun = linux.create_tun("vpns0")
    _world(gateway_ns)
    linux.setns(gateway_ns)
    worker_tun = _worker()
    worker_ns = _netns()
    linux.setns(gateway_ns)
    _gateway()
    socket.create_server(("0.0.0.0", OCSERV_PORT)).detach()  # ocserv's port, inside the gateway's namespace
    if policy is not None:
        forward_policy.install(policy, **install_args)
    denial_log = forward_policy.open_denial_log()
    for src, dst in ((worker_tun, client_tun), (client_tun, worker_tun)):
        threading.Thread(target=_copy, args=(src, dst), daemon=True).start()
    linux.setns(worker_ns)  # the probes' sockets are the worker's
    outcomes = {}
    for probe in probes:
        kind, _, where = probe.partition(" ")
        host, port = where.rsplit(":", 1)
        outcomes[probe] = _probe(kind, host, int(port))
    denial_log.settimeout(0.5)
    denials = []
    try:
        while True:
            denials += [str(d) for d in forward_policy.parse_denials(denial_log.recv(65536))]
    except socket.timeout:
        pass
    return {"outcomes": outcomes, "denials": denials}


def _run(policy: Policy | None, expected: dict[str, str], **install_args) -> dict:
    result = _in_namespace(lambda: _lab(policy, list(expected), **install_args))
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, result["error"]
    got = {probe: outcome for probe, (outcome, _) in result["outcomes"].items()}
    assert got == expected
    slow = {probe: took for probe, (outcome, took) in result["outcomes"].items()
            if outcome != "ok" and took > REFUSED_WITHIN}
    assert not slow, f"refusals must be immediate: {slow}"
    return result


REFUSED, FILTERED = "ECONNREFUSED", "EHOSTUNREACH"  # a TCP reset; ICMP administratively prohibited


@pytest.mark.userns
def test_without_a_policy_the_worker_reaches_every_destination_of_the_other_tests():
    everything = {f"tcp {host}:{port}": "ok" for host in WORLD for port in TCP_PORTS}
    everything.update({f"udp {host}:{UDP_PORT}": "ok" for host in WORLD})
    everything.update({"tcp 10.0.2.2:80": "ok", f"tcp {GATEWAY}:{OCSERV_PORT}": "ok"})
    _run(None, everything)


@pytest.mark.userns
def test_default_policy_refuses_link_local_the_gateways_own_ports_and_the_egress_aliases_at_once():
    result = _run(Policy(own_ports=(OCSERV_PORT,)), {
        "tcp 169.254.169.254:80": REFUSED,
        "udp 169.254.169.254:53": FILTERED,
        f"tcp {LOGIN_NODE}:8443": REFUSED,  # the gateway's own port on the login node
        f"tcp {GATEWAY}:{OCSERV_PORT}": REFUSED,  # and inside the gateway's namespace (ocserv's)
        f"tcp {LOGIN_NODE}:80": "ok",  # its other services are not the gateway's business
        "tcp 198.18.10.1:8443": "ok",  # another host's 8443 is fine
        "tcp 10.0.2.2:80": REFUSED,  # slirp4netns' address of the login node's loopback
        "tcp 10.0.2.3:80": REFUSED,  # slirp4netns' resolver alias, on a port that is not DNS
        "tcp 10.0.2.3:53": "ok",  # the pushed resolver stays reachable, over TCP and UDP
        "udp 10.0.2.3:53": "ok",
    }, **SLIRP)
    denials = result["denials"]
    assert (f"tunnel: refused {WORKER} to 169.254.169.254:80 (tcp): "
            "169.254.0.0/16 is never reachable through the gateway") in denials, denials
    assert f"tunnel: refused {WORKER} to {LOGIN_NODE}:8443 (tcp): the gateway's own port" in denials, denials
    assert f"tunnel: refused {WORKER} to 169.254.169.254:53 (udp): " \
           "169.254.0.0/16 is never reachable through the gateway" in denials, denials


@pytest.mark.userns
def test_deny_refuses_a_network_or_some_of_its_ports():
    result = _run(Policy.from_args(deny=["198.18.11.0/24", "198.18.10.1:1000-2000"]), {
        "tcp 198.18.11.1:80": REFUSED,
        "udp 198.18.11.1:53": FILTERED,
        "tcp 198.18.10.1:1094": REFUSED,
        "tcp 198.18.10.1:80": "ok",
    }, **SLIRP)
    assert f"tunnel: refused {WORKER} to 198.18.10.1:1094 (tcp): denied by --deny 198.18.10.1/32:1000-2000" \
        in result["denials"], result["denials"]


@pytest.mark.userns
def test_allow_refuses_everything_else_but_the_pushed_dns():
    result = _run(Policy.from_args(allow=["198.18.10.1:1094"]), {
        "tcp 198.18.10.1:1094": "ok",
        "tcp 198.18.10.1:80": REFUSED,
        "udp 198.18.10.1:53": FILTERED,
        "tcp 198.18.11.1:1094": REFUSED,
        "tcp 10.0.2.3:53": "ok",
        "udp 10.0.2.3:53": "ok",
    }, **SLIRP)
    assert f"tunnel: refused {WORKER} to 198.18.11.1:1094 (tcp): not in any --allow" in result["denials"]


# -- pure: what the rules and the log reader make of their input -------------------------------

def _nflog_message(payload: bytes, prefix: bytes) -> bytes:
    def nla(kind, data):
        return struct.pack("=HH", 4 + len(data), kind) + data + bytes(-len(data) % 4)
    body = struct.pack("!BBH", socket.AF_INET6, 0, 1) + nla(10, prefix + b"\0") + nla(9, payload)
    return struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def test_a_logged_ipv6_packet_names_worker_destination_and_reason():
    ipv6 = (bytes([0x60, 0, 0, 0, 0, 20, socket.IPPROTO_TCP, 64]) + socket.inet_pton(socket.AF_INET6, "fd00::5")
            + socket.inet_pton(socket.AF_INET6, "2001:db8::7") + struct.pack("!HH", 40000, 443))
    (denial,) = forward_policy.parse_denials(_nflog_message(ipv6, b"not in any --allow"))
    assert str(denial) == "tunnel: refused fd00::5 to [2001:db8::7]:443 (tcp): not in any --allow"


def test_allow_rules_end_in_a_refusal_and_port_rules_cover_every_protocol_with_ports():
    baseline = len(forward_policy.Ruleset(Policy()).forward)
    rules = forward_policy.Ruleset(Policy.from_args(allow=["198.18.10.1:1094,2000-2010"]))
    assert len(rules.forward) == baseline + 2 * len(forward_policy.PORT_PROTOCOLS) + 1  # two port ranges
    assert rules.reasons[-1] == "not in any --allow"
    assert len(rules.forward[-1]) == 1  # the final refusal is unconditional: a bare goto


def test_ipv4_inside_ipv6_is_refused_by_the_tunnels_policy():
    """::ffff:169.254.169.254 would leave by the egress' host socket as IPv4, past the IPv4 rules."""
    rules = forward_policy.Ruleset(Policy(), host_addresses=["198.19.20.1"])
    assert any("::ffff:0:0/96" in reason for reason in rules.reasons), rules.reasons
    assert any("::/96" in reason for reason in rules.reasons), rules.reasons


def _install_with_ipv6_masquerade() -> dict:
    linux.unshare(linux.CLONE_NEWNET)
    forward_policy.install(Policy(), masquerade_ipv6=True)
    from pyroute2.nftables.main import NFTables
    with NFTables(nfgen_family=socket.AF_INET6) as nft:
        tables = [t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables()]
    return {"ip6_tables": tables}


@pytest.mark.userns
def test_the_ipv6_masquerade_table_is_accepted_by_this_kernel():
    result = _in_namespace(_install_with_ipv6_masquerade)
    assert "error" not in result, result["error"]
    assert forward_policy.NAT6_TABLE in result["ip6_tables"], result


@pytest.mark.userns
def test_the_gateway_asks_the_kernel_about_ipv6_masquerade_before_it_relies_on_it():
    """The same answer as the table itself gets (the test above): this kernel takes it."""
    ok, why = linux.user_namespaces_allowed()
    if not ok:
        pytest.skip(f"this kernel refuses unprivileged user namespaces: {why}")
    assert forward_policy.ipv6_masquerade_refused() == ""
