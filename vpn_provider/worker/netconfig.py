"""Configure the worker's namespace with pyroute2: lo, the tun device, routes, and DNS."""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tempfile
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .. import linux
from .redirect import redirect_installed
from .vpnc_env import TunnelParams

log = logging.getLogger(__name__)

RELAY_ONLY_DUMMY_ADDRESS = "192.0.0.8"  # RFC 7600
# The IPv6 counterpart, in both modes: unique-local (RFC 4193), global ID "vpnp". Never routed.
RELAY_IPV6_ADDRESS = "fd76:706e:7000::1"
_IPV6_CONF = Path("/proc/sys/net/ipv6/conf")  # absent: a kernel without IPv6
# glibc's RFC 3484 precedences (gai.conf(5)), IPv4 raised from 10 to 100: see prefer_ipv4_in_lookups.
_PREFER_IPV4 = ("precedence ::1/128 50\nprecedence ::/0 40\nprecedence 2002::/16 30\n"
                "precedence ::/96 20\nprecedence ::ffff:0:0/96 100\n")
# The routing table (and rule priority) for TCP: IPv4's in relay-only mode, IPv6's in both.
_TCP_TABLE = 100  # the namespace is ours: no other table to collide with
# Unix sockets through which glibc would resolve names on the *host's* network, not ours.
# Only the sockets are masked: /etc/resolv.conf may be a symlink into /run/systemd/resolve.
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
        if p.address6 and not p.split_include:
            try:
                if enable_ipv6({p.tundev}):
                    _configure_ipv6(ipr, tun, p.address6)
            except Exception as e:  # NetlinkError, OSError: IPv4 carries on
                log.warning("IPv6 through the tunnel is off: %s", e)


def _configure_ipv6(ipr, tun: int, address6: ipaddress.IPv6Interface) -> None:
    """The tunnel's IPv6 address, and the default route by it as the source: UDP and ICMPv6
    (and, with --tcp tunnel, TCP) go through the tunnel. A previous tunnel's address goes
    (the relay's own, RELAY_IPV6_ADDRESS, stays: relayed connections use it)."""
    for old in ipr.get_addr(index=tun, family=socket.AF_INET6):
        address = old.get_attr("IFA_ADDRESS")
        if old["prefixlen"] == 128 and address not in (str(address6.ip), RELAY_IPV6_ADDRESS):
            ipr.addr("del", index=tun, address=address, prefixlen=128, family=socket.AF_INET6)
    ipr.addr("replace", index=tun, address=str(address6.ip), prefixlen=128, flags=IFA_F_NODAD,
             family=socket.AF_INET6)
    ipr.route("replace", dst="::/0", oif=tun, prefsrc=str(address6.ip), family=socket.AF_INET6)


def refuse_ipv6_tcp() -> None:
    """IPv6 TCP that the relay does not carry (--tcp tunnel, a relay that did not answer)
    fails at once ("Network is unreachable") instead of stalling in the tunnel, now or after a
    reconnection to a gateway that offers IPv6: libslirp sends IPv6 segments larger than a
    client's device takes, whatever MSS the client offers, the gateway's namespace cannot
    fragment IPv6, and libslirp ignores the "packet too big" it gets back (measured: a download
    got its headers, then no byte). A kernel without IPv6 needs none of this."""
    try:
        if not enable_ipv6({"lo"}):
            return
        with IPRoute() as ipr:
            ipr.route("replace", dst="::/0", type="unreachable", table=_TCP_TABLE, family=socket.AF_INET6)
            _route_tcp_by_own_table(ipr, socket.AF_INET6)
    except Exception as e:  # NetlinkError, OSError
        log.warning("IPv6 TCP may stall in the tunnel: %s", e)


def _unmapped(address: str) -> str:
    """An IPv4 connection of a dual-stack socket lists its addresses as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(address)
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def _forget_unused_old_addresses(ipr, lo: int) -> None:
    """Old tunnel addresses kept on lo (above) go once no TCP connection uses them."""
    in_use = {_unmapped(flow["idiag_src"]) for flow in linux.tcp_connections()}
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
        local = [ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                 for a in ipr.get_addr(index=tun) if a.get_attr("IFA_ADDRESS") != RELAY_IPV6_ADDRESS]
        ipr.link("set", index=tun, state="down")
    pools = [iface.network for iface in local]
    addresses = {str(iface.ip) for iface in local}

    def carried_by_tunnel(flow) -> bool:
        if _unmapped(flow["idiag_src"]) not in addresses:
            return False
        return all_tcp or flow["idiag_dport"] == 53 or any(
            ipaddress.ip_address(_unmapped(flow["idiag_dst"])) in net for net in pools)
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
        _route_tcp_by_own_table(ipr, socket.AF_INET)


def _route_tcp_by_own_table(ipr, family: int) -> None:
    """The rule that routes ``family``'s TCP by _TCP_TABLE (once: the callers may meet)."""
    if not any(r.get_attr("FRA_TABLE") == _TCP_TABLE for r in ipr.get_rules(family=family)):
        ipr.rule("add", table=_TCP_TABLE, priority=_TCP_TABLE, FRA_IP_PROTO=socket.IPPROTO_TCP, family=family)


def enable_ipv6(links: set[str]) -> bool:
    """IPv6 on ``links`` (lo: ::1), even where the node's sysctls turn it off and new namespaces
    inherit that (net.core.devconf_inherit_init_net); False if this kernel has no IPv6."""
    if not _IPV6_CONF.exists():
        return False
    for link in links:
        switch = _IPV6_CONF / link / "disable_ipv6"
        if switch.read_text().strip() != "0":
            switch.write_text("0")  # ours to write: we hold CAP_NET_ADMIN in this namespace
    return True


def route_ipv6_tcp_to_loopback(home: str) -> None:
    """IPv6 TCP is relayed, in both modes: it gets a route, by a rule for TCP alone, so that
    connect() gets as far as the redirect; a ``local`` one, since the kernel turns an ordinary
    IPv6 route through lo into a reject route. Everything else takes the tunnel's IPv6 route
    where the gateway offers IPv6 (configure_links), and otherwise has no route, so UDP and
    ICMPv6 fail at once ("Network is unreachable").

    The unique-local address goes on ``home``, and with it AAAA records become visible:
    glibc's AI_ADDRCONFIG asks for them only when an IPv6 address other than ::1 exists. Its
    home is the tun device when there is one, since XRootD's client counts no address on a
    loopback device at all (with only an IPv4 one on the tun device it would resolve no AAAA);
    in relay-only mode it is lo (there is no other link, and XRootD then leaves it to glibc)."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        home_index = ipr.link_lookup(ifname=home)[0]
        if home != "lo":
            # The keeper takes the tun device down while the gateway is away; the relay, and
            # with it IPv6, goes on meanwhile.
            (_IPV6_CONF / home / "keep_addr_on_down").write_text("1")
        # No duplicate address detection: a tentative address would be no source for a moment.
        ipr.addr("add", index=home_index, address=RELAY_IPV6_ADDRESS, prefixlen=128, flags=IFA_F_NODAD)
        try:
            # Relayed connections take the unique-local address as their source, never the
            # tunnel's IPv6 address, which a reconnection may take away under them.
            ipr.route("add", dst="::/0", type="local", oif=lo, prefsrc=RELAY_IPV6_ADDRESS, table=_TCP_TABLE,
                      family=socket.AF_INET6)
            _route_tcp_by_own_table(ipr, socket.AF_INET6)
        except Exception:
            ipr.addr("del", index=home_index, address=RELAY_IPV6_ADDRESS, prefixlen=128)  # no AAAA then
            raise


def prefer_ipv4_in_lookups() -> None:
    """Relay-only mode: a name with both A and AAAA records gives its IPv4 address first. Without
    a tunnel, neither family has a route for glibc's UDP probe (RFC 6724 rule 1 cannot choose),
    so IPv6 would win on precedence, and where the login node has no IPv6 the relay resets the
    connection the application already saw accepted: it never tries IPv4. (With a tunnel, IPv4
    has that route and wins by rule 1.) A site's own precedence table is kept; without an
    /etc/gai.conf to mount over there is nothing to do."""
    try:
        text = Path("/etc/gai.conf").read_text()
    except OSError:
        return
    if not any(line.split()[:1] == ["precedence"] for line in text.splitlines()):
        _bind_mount_text(text + "\n" + _PREFER_IPV4, "/etc/gai.conf")


def resolv_conf_text(p: TunnelParams | None) -> str:
    """For the tunnel's pushed resolvers; ``None``: the relay helper's resolver on 127.0.0.1."""
    lines = [f"nameserver {d}" for d in p.dns] if p else ["nameserver 127.0.0.1"]
    if p and p.search_domain:
        lines.append(f"search {p.search_domain}")
    # One fast retry instead of glibc's 5 s default, so a lost datagram cannot stall a job.
    lines.append("options timeout:2 attempts:3")
    return "\n".join(lines) + "\n"


def install_resolv_conf(text: str) -> None:
    """Bind-mount our resolv.conf over /etc/resolv.conf in this mount namespace."""
    _bind_mount_text(text, "/etc/resolv.conf")
    for sock in _HOST_RESOLVER_SOCKETS:
        if os.path.exists(sock):
            fd, empty = tempfile.mkstemp(prefix="vpn-provider-mask.")
            os.close(fd)
            try:
                linux.bind_mount(empty, sock)  # connecting to a regular file fails at once
            finally:
                os.unlink(empty)


def _bind_mount_text(text: str, target: str) -> None:
    """Bind-mount a file holding ``text`` over ``target`` in this mount namespace. The source is
    unlinked right after mounting: the mount keeps it alive, and nothing is left on disk when the
    namespace goes away."""
    fd, path = tempfile.mkstemp(prefix=f"vpn-provider-{Path(target).stem}.", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        linux.bind_mount(path, target)
    finally:
        os.unlink(path)
