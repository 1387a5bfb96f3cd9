"""The worker namespace's nftables redirect, against the real kernel: in a throwaway user+net
namespace (the tier that needs user namespaces; no site, no traffic leaves the namespace)."""
from __future__ import annotations

import ipaddress
import errno
import json
import os
import socket
import struct
from pathlib import Path

import pytest

from vpn_provider import linux

pytestmark = pytest.mark.userns  # the tier that needs unprivileged user namespaces


def _in_namespace(probe) -> dict:
    """Run ``probe()`` in a child inside a new user+net namespace; return what it returned."""
    ok, why = linux.user_namespaces_allowed()
    if not ok:
        pytest.skip(f"this kernel refuses unprivileged user namespaces: {why}")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            linux.enter_user_namespace(inner_uid=os.getuid(), inner_gid=os.getgid(), flags=linux.CLONE_NEWNET)
            result = probe()
        except BaseException as e:  # report, never return into pytest
            result = {"error": repr(e)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going: SO_ORIGINAL_DST, a struct sockaddr_in (what
    the native helper reads, in C)."""
    raw = sock.getsockopt(socket.SOL_IP, 80, 16)
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


def _probe_redirect() -> dict:
    from pyroute2 import IPRoute
    from vpn_provider.worker.redirect import install_redirect
    with IPRoute() as ipr:  # every address routes to lo, so nothing can leave the namespace
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.route("add", dst="0.0.0.0/0", oif=lo, family=socket.AF_INET)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(1)
    install_redirect(listener.getsockname()[1], exclude=[ipaddress.IPv4Network("100.64.0.0/16")])
    seen = {}
    for host, port in (("198.18.10.1", 1094), ("198.18.10.1", 53), ("100.64.0.9", 80)):
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect((host, port))
            conn, _ = listener.accept()
            seen[f"{host}:{port}"] = "%s:%d" % original_destination(conn)
            conn.close()
        except OSError as e:
            seen[f"{host}:{port}"] = type(e).__name__
        s.close()
    return seen


def test_outgoing_tcp_is_redirected_except_dns_and_the_pool():
    seen = _in_namespace(_probe_redirect)
    assert "error" not in seen, seen["error"]
    assert seen["198.18.10.1:1094"] == "198.18.10.1:1094"  # reached our listener, destination known
    assert seen["198.18.10.1:53"] != "198.18.10.1:53"  # DNS over TCP follows the routes instead
    assert seen["100.64.0.9:80"] != "100.64.0.9:80"  # other workers stay in the tunnel


def test_the_namespace_tells_whether_its_tcp_goes_to_the_relay():
    """What the keeper's rejoin asks when the tunnel drops: without the redirect, the tunnel
    carried every TCP connection and all of them are reset."""
    def probe():
        from vpn_provider.worker.redirect import install_redirect, redirect_installed, remove_redirect
        before = redirect_installed()
        install_redirect(5555, exclude=[])
        during = redirect_installed()
        remove_redirect()
        return {"seen": [before, during, redirect_installed()]}
    result = _in_namespace(probe)
    assert "error" not in result, result["error"]
    assert result["seen"] == [False, True, False]


def original_destination6(sock: socket.socket) -> tuple[str, int]:
    """IP6T_SO_ORIGINAL_DST (also 80, at the IPv6 level): a struct sockaddr_in6."""
    raw = sock.getsockopt(socket.IPPROTO_IPV6, 80, 28)
    port, addr = struct.unpack_from("!H4x16s", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, addr), port


def _probe_ipv6() -> dict:
    """The worker's IPv6 set-up (tunnel._redirect_ipv6's steps), then where connections go."""
    from pyroute2 import IPRoute
    from vpn_provider.worker import netconfig
    from vpn_provider.worker.redirect import install_redirect
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    # AI_ADDRCONFIG before and after: without an IPv6 address beside ::1, no AAAA is asked for.
    lookup = lambda: socket.getaddrinfo("::1", 80, socket.AF_INET6, socket.SOCK_STREAM, 0,  # noqa: E731
                                        socket.AI_ADDRCONFIG) and "found"
    # A node whose sysctls turn IPv6 off may pass that on to new namespaces: we turn it back on.
    Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").write_text("1")
    seen = {"enabled": netconfig.enable_ipv6({"lo"}), "before": _outcome(lookup)}
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    listener.settimeout(1)
    ours = ipaddress.IPv6Network(f"{netconfig.RELAY_IPV6_ADDRESS}/128")
    install_redirect(listener.getsockname()[1], exclude=[ours], dns_stays=False, version=6)
    netconfig.route_ipv6_tcp_to_loopback("lo")
    seen["after"] = _outcome(lookup)
    for host, port in (("2001:db8:10::1", 80), ("2001:db8:10::1", 53), (netconfig.RELAY_IPV6_ADDRESS, 80)):
        s = socket.socket(socket.AF_INET6)
        s.settimeout(1)
        try:
            s.connect((host, port))
            conn, _ = listener.accept()
            seen[f"[{host}]:{port}"] = "[%s]:%d" % original_destination6(conn)
            s.sendall(b"up")
            conn.sendall(b"down")
            seen[f"[{host}]:{port} bytes"] = [conn.recv(2).decode(), s.recv(4).decode()]
            conn.close()
        except OSError as e:
            seen[f"[{host}]:{port}"] = type(e).__name__
        s.close()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        seen["udp"] = _outcome(lambda: udp.sendto(b"x", ("2001:db8:10::1", 123)) and "sent")
    return seen


def _outcome(action) -> str:
    try:
        return action()
    except OSError as e:
        return type(e).__name__


def test_outgoing_ipv6_tcp_reaches_the_listener_with_its_destination_and_nothing_else_leaves():
    seen = _in_namespace(_probe_ipv6)
    assert "error" not in seen, seen["error"]
    assert seen["enabled"] is True
    # glibc's AI_ADDRCONFIG counts no ::1: only the unique-local address lets AAAA records through
    assert seen["before"] == "gaierror" and seen["after"] == "found"
    assert seen["[2001:db8:10::1]:80"] == "[2001:db8:10::1]:80"
    assert seen["[2001:db8:10::1]:80 bytes"] == ["up", "down"]  # a source address that works both ways
    assert seen["[2001:db8:10::1]:53"] == "[2001:db8:10::1]:53"  # no tunnel for IPv6 DNS to follow
    assert seen["[fd76:706e:7000::1]:80"] == "ConnectionRefusedError"  # our own address: not redirected
    assert seen["udp"] == "OSError"  # ENETUNREACH at once, not a datagram into the void


def test_removing_the_redirect_removes_both_families():
    def probe():
        from vpn_provider.worker.redirect import _has_table, install_redirect, remove_redirect
        install_redirect(5555, exclude=[])
        install_redirect(5556, exclude=[], dns_stays=False, version=6)
        during = [_has_table(4), _has_table(6)]
        remove_redirect()
        return {"seen": [*during, _has_table(4), _has_table(6)]}
    result = _in_namespace(probe)
    assert "error" not in result, result["error"]
    assert result["seen"] == [True, True, False, False]


def _reset_both_families() -> dict:
    """A TCP connection of each family over loopback, and one IPv4 connection of a dual-stack
    socket (listed as ::ffff:127.0.0.1); reset all but the IPv4 one: what each owner sees."""
    from pyroute2 import IPRoute
    from vpn_provider.worker import netconfig
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    netconfig.enable_ipv6({"lo"})
    listeners = {"v4": socket.create_server(("127.0.0.1", 0)),
                 "v6": socket.create_server(("::1", 0), family=socket.AF_INET6),
                 "mapped": socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)}
    clients = {"v4": socket.create_connection(("127.0.0.1", listeners["v4"].getsockname()[1])),
               "v6": socket.create_connection(("::1", listeners["v6"].getsockname()[1])),
               "mapped": socket.create_connection(("127.0.0.1", listeners["mapped"].getsockname()[1]))}
    accepted = {name: listener.accept()[0] for name, listener in listeners.items()}
    listed_v6 = sorted({netconfig._unmapped(f["idiag_src"]) for f in linux.tcp_connections()
                        if f["idiag_family"] == socket.AF_INET6})
    spared = clients["v4"].getsockname()[1]
    aborted = linux.reset_tcp_connections(lambda flow: flow["idiag_sport"] != spared
                                          and flow["idiag_dport"] != spared)
    seen = {"aborted": aborted}
    for name, sock in clients.items():
        sock.settimeout(2)
        try:
            sock.send(b"x")
            seen[name] = "open" if accepted[name].recv(1) == b"x" else "ended"
        except OSError as e:
            seen[name] = errno.errorcode.get(e.errno, str(e))
    seen["ipv6_sockets_listed_as"] = listed_v6
    return seen


def test_tcp_connections_of_both_families_can_be_reset():
    """The tunnel's loss resets what it carried (netconfig.take_tunnel_down), IPv6 too."""
    result = _in_namespace(_reset_both_families)
    assert "error" not in result, result["error"]
    assert result["v4"] == "open", result
    assert result["v6"] != "open" and result["mapped"] != "open", result
    assert result["ipv6_sockets_listed_as"] == ["127.0.0.1", "::1"], result  # unmapped for comparisons
