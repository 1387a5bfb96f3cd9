"""Configure the worker's namespace with pyroute2: lo, the tun device, routes, and DNS."""
from __future__ import annotations

import ipaddress
import os
import socket
import tempfile

from pyroute2 import IPRoute

from .. import linux
from .redirect import redirect_installed
from .vpnc_env import TunnelParams

# Unix sockets through which glibc would resolve names on the *host's* network, not ours.
# Only the sockets are masked: /etc/resolv.conf may be a symlink into /run/systemd/resolve.
RELAY_ONLY_DUMMY_ADDRESS = "192.0.0.8"  # RFC 7600
_TCP_TABLE = 100  # relay-only: the routing table (and rule priority) for TCP; the namespace is ours
_HOST_RESOLVER_SOCKETS = ("/run/nscd/socket", "/var/run/nscd/socket",
                          "/run/systemd/resolve/io.systemd.Resolve")


def configure_links(p: TunnelParams) -> None:
    """Address, MTU and routes of the tun device; idempotent, so the same call configures the
    namespace at the start and again after the keeper brings the tunnel back (the gateway may
    then have handed out another address)."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        tun = ipr.link_lookup(ifname=p.tundev)[0]
        ipr.link("set", index=tun, mtu=p.mtu, state="up")
        relayed = redirect_installed()
        for old in ipr.get_addr(index=tun, family=socket.AF_INET):
            address, prefixlen = old.get_attr("IFA_ADDRESS"), old["prefixlen"]
            if (address, prefixlen) != (str(p.address.ip), p.address.network.prefixlen):
                ipr.addr("del", index=tun, address=address, prefixlen=prefixlen)
                if relayed:
                    # Relayed connections keep the old address as their source, and the relay
                    # still carries them: the helper's replies must stay local, not go to vpn0.
                    ipr.addr("replace", index=lo, address=address, prefixlen=32)
        ipr.addr("replace", index=tun, address=str(p.address.ip), prefixlen=p.address.network.prefixlen)
        _forget_unused_old_addresses(ipr, lo)
        if p.split_include:
            for net in p.split_include:
                ipr.route("replace", dst=str(net), oif=tun)
        else:
            ipr.route("replace", dst="0.0.0.0/0", oif=tun, family=socket.AF_INET)


def _forget_unused_old_addresses(ipr, lo: int) -> None:
    """Old tunnel addresses kept on lo (above) go once no TCP connection uses them."""
    in_use = {flow["idiag_src"] for flow in linux.tcp_connections()}
    for a in ipr.get_addr(index=lo, family=socket.AF_INET):
        address = a.get_attr("IFA_ADDRESS")
        if a["prefixlen"] == 32 and address not in in_use and address != RELAY_ONLY_DUMMY_ADDRESS \
                and not address.startswith("127."):
            ipr.addr("del", index=lo, address=address, prefixlen=32)


def take_tunnel_down(tundev: str, *, all_tcp: bool) -> int:
    """The gateway is gone: down goes the tun device, and with it its routes, so new connections
    fail at once ("Network is unreachable") instead of waiting. TCP connections the tunnel
    carried are reset (a transfer must fail, not hang): all of them with ``all_tcp``, else those
    to the VPN's own network and to port 53 (the relay carries the rest, and they live on).
    Returns how many were reset. Raises OSError if the kernel cannot reset connections
    (no CONFIG_INET_DIAG_DESTROY); the device is down by then."""
    with IPRoute() as ipr:
        tun = ipr.link_lookup(ifname=tundev)[0]
        local = [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                 for a in ipr.get_addr(index=tun, family=socket.AF_INET)]
        ipr.link("set", index=tun, state="down")
    pools = [iface.network for iface in local]
    addresses = {str(iface.ip) for iface in local}

    def carried_by_tunnel(flow) -> bool:
        if flow["idiag_src"] not in addresses:
            return False
        return all_tcp or flow["idiag_dport"] == 53 or any(
            ipaddress.IPv4Address(flow["idiag_dst"]) in net for net in pools)
    return linux.reset_tcp_connections(carried_by_tunnel)


def rewrite_resolv_conf(text: str) -> None:
    """Replace the content of the resolv.conf bind-mounted by ``install_resolv_conf`` (we are in
    the worker's mount namespace; the file is ours)."""
    with open("/etc/resolv.conf", "w") as f:
        f.write(text)


def route_tcp_to_loopback() -> None:
    """Relay-only mode: no tun device. TCP still needs a route for connect() to get as far as
    the nftables redirect: through lo, by a rule for TCP alone. Everything else meets an
    unreachable default route, so UDP and ICMP fail at once ("No route to host") instead of
    waiting out a time-out. Without a source address the kernel would pick 0.0.0.0, and a
    redirected connection would then handshake but never deliver a byte."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        # glibc's AI_ADDRCONFIG counts no loopback address: without one other IPv4 address,
        # an IPv4-only lookup (wget -4) finds nothing. 192.0.0.8 is the IPv4 dummy address.
        ipr.addr("add", index=lo, address=RELAY_ONLY_DUMMY_ADDRESS, prefixlen=32)
        ipr.route("add", dst="0.0.0.0/0", oif=lo, prefsrc="127.0.0.1", table=_TCP_TABLE, family=socket.AF_INET)
        ipr.route("add", dst="0.0.0.0/0", type="unreachable", family=socket.AF_INET)
        ipr.rule("add", table=_TCP_TABLE, priority=_TCP_TABLE, FRA_IP_PROTO=socket.IPPROTO_TCP,
                 family=socket.AF_INET)


def resolv_conf_text(p: TunnelParams | None) -> str:
    """For the tunnel's pushed resolvers; ``None``: the relay helper's resolver on 127.0.0.1."""
    lines = [f"nameserver {d}" for d in p.dns] if p else ["nameserver 127.0.0.1"]
    if p and p.search_domain:
        lines.append(f"search {p.search_domain}")
    # One fast retry instead of glibc's 5 s default, so a lost datagram cannot stall a job.
    lines.append("options timeout:2 attempts:3")
    return "\n".join(lines) + "\n"


def install_resolv_conf(text: str) -> None:
    """Bind-mount our resolv.conf over /etc/resolv.conf in this mount namespace.

    The source file is unlinked right after mounting: the mount keeps it alive, and nothing is
    left on disk when the namespace goes away.
    """
    fd, path = tempfile.mkstemp(prefix="vpn-provider-resolv.", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        linux.bind_mount(path, "/etc/resolv.conf")
    finally:
        os.unlink(path)
    for sock in _HOST_RESOLVER_SOCKETS:
        if os.path.exists(sock):
            fd, empty = tempfile.mkstemp(prefix="vpn-provider-mask.")
            os.close(fd)
            try:
                linux.bind_mount(empty, sock)  # connecting to a regular file fails at once
            finally:
                os.unlink(empty)
