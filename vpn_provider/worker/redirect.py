"""Send the namespace's outgoing TCP to a local port: one nftables rule per family, set over
netlink.

    table ip vpnp { chain out { type nat hook output priority -100;
        meta l4proto tcp tcp dport 53 accept
        meta l4proto tcp ip daddr != 127.0.0.0/8 ip daddr != <each excluded net> redirect to :PORT } }
    table ip6 vpnp { chain out { type nat hook output priority -100;
        meta l4proto tcp ip6 daddr != ::1 ip6 daddr != <each excluded net> redirect to :PORT6 } }

With a tunnel, DNS over TCP stays in it, beside DNS over UDP: the pushed resolver may be one
that only the gateway's namespace can reach (slirp4netns' 10.0.2.3). In relay-only mode there
is no first rule: the resolver is the helper's, on 127.0.0.1, and other port 53 is plain TCP.
IPv6 has no port 53 rule: the tunnel carries no IPv6, so all IPv6 TCP goes to the relay (the
redirect sends it to ::1, where the helper has a second listener).

Runs inside the worker's namespace, where our user namespace gives us CAP_NET_ADMIN; no nft or
iptables binary is needed. The relay helper finds each connection's real destination with
SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST (``native/node_helper.c``).
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

from pyroute2.nftables.expressions import genex, verdict
from pyroute2.nftables.main import NFTables

TABLE, CHAIN = "vpnp", "out"
_REG1 = 1
_NETWORK_HEADER = 1
_META_L4PROTO = 16
_CMP_EQ, _CMP_NEQ = 0, 1
_NAT_DST_PRIORITY = -100
_DST_OFFSET = {4: 16, 6: 24}  # of the destination address in the IPv4 and IPv6 headers
_LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}  # NFPROTO_IPV4 ("table ip"), NFPROTO_IPV6 ("table ip6")
_TRANSPORT_HEADER = 2
_TCP_DPORT_OFFSET = 2
_NF_ACCEPT = 1


def _value(raw: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", raw)]}


def _daddr_not_in(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list:
    # The destination is reloaded for each network because bitwise overwrites the register.
    size = len(net.network_address.packed)
    exprs = [genex("payload", {"dreg": _REG1, "base": _NETWORK_HEADER, "offset": _DST_OFFSET[net.version],
                               "len": size})]
    if net.prefixlen < net.max_prefixlen:
        exprs.append(genex("bitwise", {"sreg": _REG1, "dreg": _REG1, "len": size,
                                       "mask": _value(net.netmask.packed), "xor": _value(bytes(size))}))
    exprs.append(genex("cmp", {"sreg": _REG1, "op": _CMP_NEQ, "data": _value(net.network_address.packed)}))
    return exprs


def _is_tcp() -> list:
    return [genex("meta", {"dreg": _REG1, "key": _META_L4PROTO}),
            genex("cmp", {"sreg": _REG1, "op": _CMP_EQ, "data": _value(bytes([socket.IPPROTO_TCP]))})]


def dns_stays_rule() -> list:
    """TCP to port 53 is accepted unchanged (so it follows the routes: the tunnel)."""
    return [*_is_tcp(),
            genex("payload", {"dreg": _REG1, "base": _TRANSPORT_HEADER, "offset": _TCP_DPORT_OFFSET, "len": 2}),
            genex("cmp", {"sreg": _REG1, "op": _CMP_EQ, "data": _value(struct.pack("!H", 53))}),
            *verdict(_NF_ACCEPT)]


def redirect_rule(port: int, exclude: list, version: int = 4) -> list:
    """The rule's nftables expressions (pyroute2 form); ``exclude``: networks of ``version``."""
    exprs = _is_tcp()
    for net in [_LOOPBACK[version], *exclude]:
        exprs += _daddr_not_in(net)
    exprs += [genex("immediate", {"dreg": _REG1, "data": _value(struct.pack("!H", port))}),
              # The flag must be given as a set: an empty flag word would cancel the port.
              genex("redir", {"reg_proto_min": _REG1, "flags": {"NF_NAT_RANGE_PROTO_SPECIFIED"}})]
    return exprs


@contextlib.contextmanager
def _nftables(version: int = 4):
    nft = NFTables(nfgen_family=_FAMILY[version])
    try:
        yield nft
    finally:
        nft.close()


def install_redirect(port: int, exclude: list, *, dns_stays: bool = True, version: int = 4) -> None:
    """Redirect outgoing TCP of IP ``version`` (except to loopback and ``exclude``, networks of
    that version) to 127.0.0.1:``port``, or [::1]:``port``.
    ``dns_stays``: leave TCP to port 53 alone (there is a tunnel for it to follow)."""
    with _nftables(version) as nft:
        nft.table("add", name=TABLE)
        nft.chain("add", table=TABLE, name=CHAIN, type="nat", hook="output", priority=_NAT_DST_PRIORITY)
        if dns_stays:
            nft.rule("add", table=TABLE, chain=CHAIN, expressions=[dns_stays_rule()])
        nft.rule("add", table=TABLE, chain=CHAIN, expressions=[redirect_rule(port, exclude, version)])


def _has_table(version: int) -> bool:
    with _nftables(version) as nft:
        return any(t.get_attr("NFTA_TABLE_NAME") == TABLE for t in nft.get_tables())


def redirect_installed() -> bool:
    """Whether this namespace sends its (IPv4) TCP to the relay."""
    return _has_table(4)


def remove_redirect() -> None:
    """Undo install_redirect, both families (when the helper that should serve the ports is gone)."""
    for version in (4, 6):
        if _has_table(version):
            with _nftables(version) as nft:
                nft.table("del", name=TABLE)
