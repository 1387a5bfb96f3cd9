"""Send the namespace's outgoing TCP to a local port: one nftables rule, set over netlink.

    table ip vpnp { chain out { type nat hook output priority -100;
        meta l4proto tcp tcp dport 53 accept
        meta l4proto tcp ip daddr != 127.0.0.0/8 ip daddr != <each excluded net> redirect to :PORT } }

With a tunnel, DNS over TCP stays in it, beside DNS over UDP: the pushed resolver may be one
that only the gateway's namespace can reach (slirp4netns' 10.0.2.3). In relay-only mode there
is no first rule: the resolver is the helper's, on 127.0.0.1, and other port 53 is plain TCP.

Runs inside the worker's namespace, where our user namespace gives us CAP_NET_ADMIN; no nft or
iptables binary is needed. The relay helper finds each connection's real destination with
SO_ORIGINAL_DST (``native/node_helper.c``).
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
_IPV4_DST_OFFSET = 16
_TRANSPORT_HEADER = 2
_TCP_DPORT_OFFSET = 2
_NF_ACCEPT = 1


def _value(raw: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", raw)]}


def _daddr_not_in(net: ipaddress.IPv4Network) -> list:
    # The destination is reloaded for each network because bitwise overwrites the register.
    exprs = [genex("payload", {"dreg": _REG1, "base": _NETWORK_HEADER, "offset": _IPV4_DST_OFFSET, "len": 4})]
    if net.prefixlen < 32:
        exprs.append(genex("bitwise", {"sreg": _REG1, "dreg": _REG1, "len": 4,
                                       "mask": _value(net.netmask.packed), "xor": _value(bytes(4))}))
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


def redirect_rule(port: int, exclude: list[ipaddress.IPv4Network]) -> list:
    """The rule's nftables expressions (pyroute2 form)."""
    exprs = _is_tcp()
    for net in [ipaddress.IPv4Network("127.0.0.0/8"), *exclude]:
        exprs += _daddr_not_in(net)
    exprs += [genex("immediate", {"dreg": _REG1, "data": _value(struct.pack("!H", port))}),
              # The flag must be given as a set: an empty flag word would cancel the port.
              genex("redir", {"reg_proto_min": _REG1, "flags": {"NF_NAT_RANGE_PROTO_SPECIFIED"}})]
    return exprs


@contextlib.contextmanager
def _nftables():
    nft = NFTables(nfgen_family=socket.AF_INET)  # NFPROTO_IPV4: "table ip"
    try:
        yield nft
    finally:
        nft.close()


def install_redirect(port: int, exclude: list[ipaddress.IPv4Network], *, dns_stays: bool = True) -> None:
    """Redirect outgoing TCP (except to loopback and ``exclude``) to 127.0.0.1:``port``.
    ``dns_stays``: leave TCP to port 53 alone (there is a tunnel for it to follow)."""
    with _nftables() as nft:
        nft.table("add", name=TABLE)
        nft.chain("add", table=TABLE, name=CHAIN, type="nat", hook="output", priority=_NAT_DST_PRIORITY)
        if dns_stays:
            nft.rule("add", table=TABLE, chain=CHAIN, expressions=[dns_stays_rule()])
        nft.rule("add", table=TABLE, chain=CHAIN, expressions=[redirect_rule(port, exclude)])


def redirect_installed() -> bool:
    """Whether this namespace sends its TCP to the relay."""
    with _nftables() as nft:
        return any(t.get_attr("NFTA_TABLE_NAME") == TABLE for t in nft.get_tables())


def remove_redirect() -> None:
    """Undo install_redirect (when the helper that should serve the port is gone)."""
    with _nftables() as nft:
        nft.table("del", name=TABLE)
