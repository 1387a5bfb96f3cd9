"""The destination policy (policy.py) for the tunnel: what VPN clients send through ocserv is
filtered in the gateway's namespace as the relay filters what it is asked to connect to.

    table inet vpnp_policy {
      chain forward { type filter hook forward priority 0;
        meta iiftype != none accept      # only packets from ocserv's tun devices, the clients
        meta oiftype none accept         # worker to worker: within the VPN, not beyond the gateway
        ip daddr 169.254.0.0/16 goto refuse0 ...          # always denied (policy.ALWAYS_DENIED)
        ip daddr <pushed resolver> udp|tcp dport 53 accept  # the DNS the gateway itself hands out
        ip daddr 10.0.2.0/24 goto refuseN                  # slirp4netns' aliases of the login node
        ip daddr <login node address> tcp|udp|sctp dport <own port> goto ...
        <each --deny> goto ...;  <each --allow> accept;  goto refuse-not-allowed (with --allow)
      }
      chain input { type filter hook input priority 0;   # to the namespace's own addresses
        meta iiftype != none accept;  tcp|udp|sctp dport <own port> goto ... }
      chain refuseN { limit rate 20/second log group 1 prefix "<reason>"
                      meta l4proto tcp reject with tcp reset;  reject with icmpx admin-prohibited }
    }

A refused TCP connection gets a reset and anything else an ICMP "administratively prohibited",
so it fails at once. Each refusal is sent (rate-limited by the kernel) to NFLOG group 1 with its
reason as the prefix; the supervisor reads that group (``DenialLog``) on a socket opened inside
the namespace, and logs worker (its VPN address) and destination.

Built over netlink with pyroute2, as worker/redirect.py builds its rule: no nft binary is
needed, and nftables (not iptables) because one ``inet`` table covers IPv4 and IPv6 alike (the
namespace forwards IPv6 where the login node has it) and each refusal can jump to a chain that
names its reason.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Sequence

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWRULE, nft_rule_msg
from pyroute2.nftables.expressions import genex, verdict
from pyroute2.nftables.main import NFTables

from .. import proc
from ..policy import ALWAYS_DENIED, Network, Policy, Rule
from .credentials import write_file

TABLE = "vpnp_policy"
NAT6_TABLE = "vpnp_nat6"  # family ip6, not inet: an inet nat chain needs Linux 5.2, RHEL 8 has 4.18
IPV4_IN_IPV6 = (ipaddress.ip_network("::ffff:0:0/96"), ipaddress.ip_network("::/96"))  # mapped, compatible
LOG_GROUP = 1  # NFLOG groups belong to a network namespace: the gateway's has only ours
LOG_RATE = 20  # log messages per second and reason at most (the supervisor logs fewer still)
PORT_PROTOCOLS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP)  # what has ports
_PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_SCTP: "sctp",
                   socket.IPPROTO_ICMP: "icmp", socket.IPPROTO_ICMPV6: "icmpv6"}

_NFPROTO_INET = 1
_NFPROTO = {4: socket.AF_INET, 6: socket.AF_INET6}  # NFPROTO_IPV4/6 equal AF_INET/6
_REG1, _REG_VERDICT = 1, 0
_NETWORK_HEADER, _TRANSPORT_HEADER = 1, 2
_DST_OFFSET = {4: 16, 6: 24}
_DPORT_OFFSET = 2
_META_IIFTYPE, _META_OIFTYPE, _META_NFPROTO, _META_L4PROTO = 8, 9, 15, 16
_ARPHRD_NONE = 0xFFFE  # a tun device (IFF_TUN): what ocserv gives each client
_CMP_EQ, _CMP_NEQ, _CMP_GTE, _CMP_LTE = 0, 1, 5, 3
_NF_ACCEPT, _NFT_GOTO = 1, -4
_REJECT_TCP_RST, _REJECT_ICMPX, _ICMPX_ADMIN_PROHIBITED = 1, 2, 3
_LIMIT_PER_SECOND, _LIMIT_PACKETS = 1, 0


class _RuleMsg(nft_rule_msg):
    """pyroute2 sends NFTA_LOG_GROUP as 32 bits; the kernel reads 16 (and warns about the rest)."""

    class nft_expr(nft_rule_msg.nft_expr):
        class nft_log(nft_rule_msg.nft_expr.nft_log):
            nla_map = tuple((name, "be16" if name == "NFTA_LOG_GROUP" else kind)
                            for name, kind in nft_rule_msg.nft_expr.nft_log.nla_map)


def _value(raw: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", raw)]}


def _cmp(op: int, raw: bytes) -> dict:
    return genex("cmp", {"sreg": _REG1, "op": op, "data": _value(raw)})


def _meta(key: int) -> dict:
    return genex("meta", {"dreg": _REG1, "key": key})


def _daddr_in(network: Network) -> list:
    """The packet is IPv4 or IPv6 as ``network`` is, and goes to it."""
    size = network.max_prefixlen // 8
    exprs = [_meta(_META_NFPROTO), _cmp(_CMP_EQ, bytes([_NFPROTO[network.version]])),
             genex("payload", {"dreg": _REG1, "base": _NETWORK_HEADER, "offset": _DST_OFFSET[network.version],
                               "len": size})]
    if network.prefixlen < network.max_prefixlen:
        exprs.append(genex("bitwise", {"sreg": _REG1, "dreg": _REG1, "len": size,
                                       "mask": _value(network.netmask.packed), "xor": _value(bytes(size))}))
    return exprs + [_cmp(_CMP_EQ, network.network_address.packed)]


def _dport_in(protocol: int, low: int, high: int) -> list:
    exprs = [_meta(_META_L4PROTO), _cmp(_CMP_EQ, bytes([protocol])),
             genex("payload", {"dreg": _REG1, "base": _TRANSPORT_HEADER, "offset": _DPORT_OFFSET, "len": 2})]
    if low == high:
        return exprs + [_cmp(_CMP_EQ, struct.pack("!H", low))]
    # Ports are loaded big-endian, so comparing bytes compares numbers.
    return exprs + [_cmp(_CMP_GTE, struct.pack("!H", low)), _cmp(_CMP_LTE, struct.pack("!H", high))]


def _matches(rule: Rule, protocols: Sequence[int] = PORT_PROTOCOLS) -> list[list]:
    """One nftables rule body per alternative: nftables has no "or" without sets."""
    if not rule.ports:
        return [_daddr_in(rule.network)]
    return [_dport_in(proto, low, high) + _daddr_in(rule.network)
            for proto in protocols for low, high in rule.ports]


def _goto(chain: str) -> list:
    return [genex("immediate", {"dreg": _REG_VERDICT, "data": {"attrs": [("NFTA_DATA_VERDICT", {"attrs": [
        ("NFTA_VERDICT_CODE", _NFT_GOTO), ("NFTA_VERDICT_CHAIN", chain)]})]}})]


def _refusal(reason: str) -> list[list]:
    """The body of a chain that logs (rate-limited) and refuses: a reset for TCP, else ICMP."""
    return [[genex("limit", {"rate": LOG_RATE, "unit": _LIMIT_PER_SECOND, "burst": LOG_RATE,
                             "type": _LIMIT_PACKETS, "flags": 0}),
             genex("log", {"group": LOG_GROUP, "prefix": reason[:127]})],
            [_meta(_META_L4PROTO), _cmp(_CMP_EQ, bytes([socket.IPPROTO_TCP])),
             genex("reject", {"type": _REJECT_TCP_RST})],
            [genex("reject", {"type": _REJECT_ICMPX, "icmp_code": _ICMPX_ADMIN_PROHIBITED})]]


@dataclasses.dataclass
class Ruleset:
    """The rules (each a list of expressions) of the forward and input chains, and the
    refusal chains they jump to, one per reason."""
    policy: Policy
    host_addresses: Sequence[str] = ()
    resolvers: Sequence[str] = ()
    egress_aliases: Sequence[str] = ()
    forward: list[list] = dataclasses.field(init=False, default_factory=list)
    input: list[list] = dataclasses.field(init=False, default_factory=list)
    reasons: list[str] = dataclasses.field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        iif_not_tun = [_meta(_META_IIFTYPE), _cmp(_CMP_NEQ, struct.pack("=H", _ARPHRD_NONE))]
        oif_tun = [_meta(_META_OIFTYPE), _cmp(_CMP_EQ, struct.pack("=H", _ARPHRD_NONE))]
        self.forward = [iif_not_tun + verdict(_NF_ACCEPT), oif_tun + verdict(_NF_ACCEPT)]
        for network in ALWAYS_DENIED:
            self._refuse(Rule(network), f"{network} is never reachable through the gateway")
        # IPv4 dressed as IPv6: the egress' host socket would deliver it as IPv4, past every
        # IPv4 rule below (the relay unmaps such addresses before its checks instead).
        for network in IPV4_IN_IPV6:
            self._refuse(Rule(network), f"{network} (IPv4 inside IPv6) is never reachable through the tunnel")
        for resolver in self.resolvers:
            dns = Rule(ipaddress.ip_network(resolver), ports=((53, 53),))
            self.forward += [m + verdict(_NF_ACCEPT)
                             for m in _matches(dns, (socket.IPPROTO_UDP, socket.IPPROTO_TCP))]
        for alias in self.egress_aliases:
            self._refuse(Rule(ipaddress.ip_network(alias)), f"{alias} is the login node itself (egress network)")
        own_port = "the gateway's own port"
        for address in self.host_addresses:
            for port in self.policy.own_ports:
                self._refuse(Rule(ipaddress.ip_network(address), ports=((port, port),)), own_port)
        # ocserv listens on every address of the namespace, which with pasta include a copy of
        # the login node's: a worker must not reach it from inside the tunnel either.
        self.input = [iif_not_tun + verdict(_NF_ACCEPT)]
        if self.policy.own_ports:
            goto = _goto(self._chain_for(own_port))
            self.input += [_dport_in(proto, port, port) + goto
                           for proto in PORT_PROTOCOLS for port in self.policy.own_ports]
        for rule in self.policy.deny:
            self._refuse(rule, f"denied by --deny {rule}")
        if self.policy.allow:
            for rule in self.policy.allow:
                self.forward += [m + verdict(_NF_ACCEPT) for m in _matches(rule)]
            self._refuse(None, "not in any --allow")

    def _refuse(self, rule: Rule | None, reason: str) -> None:
        goto = _goto(self._chain_for(reason))
        self.forward += [m + goto for m in _matches(rule)] if rule else [goto]

    def _chain_for(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return self.refusal_chain(reason)

    def refusal_chain(self, reason: str) -> str:
        return f"refuse{self.reasons.index(reason)}"


def install(policy: Policy, host_addresses: Sequence[str] = (), *, resolvers: Sequence[str] = (),
            egress_aliases: Sequence[str] = (), masquerade_ipv6: bool = False) -> None:
    """Filter what VPN clients send through this namespace (the gateway's; call it inside).

    ``host_addresses``: the login node's own addresses, where ``policy.own_ports`` are refused
    (the namespace cannot list them: they lie beyond the egress). ``resolvers``: the DNS servers
    pushed to clients, whose port 53 stays open whatever --allow says, as the relay's DNS does.
    ``egress_aliases``: networks the egress maps onto the login node itself (slirp4netns'
    10.0.2.0/24: .2 stands for its loopback, .3 for its resolver), refused but for DNS to
    ``resolvers``: what a worker reaches there is not up to the egress' options and version.
    ``masquerade_ipv6``: clients' IPv6 leaves from the namespace's own address (the egresses
    answer neighbour solicitations for that one alone; IPv4 has proxy ARP).
    Raises OSError if the kernel refuses any of it.
    """
    rules = Ruleset(policy, host_addresses, resolvers, egress_aliases)
    nft = NFTables(nfgen_family=_NFPROTO_INET)
    try:
        nft.table("add", name=TABLE)
        for reason in rules.reasons:
            chain = rules.refusal_chain(reason)
            nft.chain("add", table=TABLE, name=chain)
            for body in _refusal(reason):
                _add_rule(nft, chain, body)
        for hook, bodies in (("forward", rules.forward), ("input", rules.input)):
            nft.chain("add", table=TABLE, name=hook, type="filter", hook=hook, priority=0)
            for body in bodies:
                _add_rule(nft, hook, body)
    except NetlinkError as e:
        raise OSError(e.code, f"nftables: {os.strerror(e.code)}") from None
    finally:
        nft.close()
    if masquerade_ipv6:
        _masquerade_ipv6()


def ipv6_masquerade_refused() -> str:
    """Why this kernel refuses the IPv6 masquerade (in a throwaway user+net namespace), or ""
    if it takes it: asked before ocserv.conf is written, so that a kernel without IPv6 NAT
    gives an IPv4-only tunnel rather than no gateway."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        why = b""
        try:
            from .. import linux
            linux.enter_user_namespace(inner_uid=0, inner_gid=0, flags=linux.CLONE_NEWNET)
            _masquerade_ipv6()
        except BaseException as e:  # any failure is the answer
            why = (str(e) or type(e).__name__).encode()[:300]
        os.write(w, why)
        os._exit(0)
    os.close(w)
    try:
        why = proc.read_message(r, 10.0)
    finally:
        os.close(r)
    if why is None:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "no answer within 10 s" if why is None else why.decode(errors="replace").strip()


def _masquerade_ipv6() -> None:
    """What clients send by IPv6 leaves from the namespace's own address (what leaves by a
    device other than a client's)."""
    nft = NFTables(nfgen_family=socket.AF_INET6)  # NFPROTO_IPV6
    try:
        nft.table("add", name=NAT6_TABLE)
        nft.chain("add", table=NAT6_TABLE, name="postrouting", type="nat", hook="postrouting", priority=100)
        nft._command(_RuleMsg, {"add": NFT_MSG_NEWRULE}, "add", {
            "table": NAT6_TABLE, "chain": "postrouting",
            "expressions": [_meta(_META_OIFTYPE), _cmp(_CMP_NEQ, struct.pack("=H", _ARPHRD_NONE)),
                            genex("masq", {})]})
    except NetlinkError as e:
        raise OSError(e.code, f"nftables (IPv6 masquerade): {os.strerror(e.code)}") from None
    finally:
        nft.close()


def _add_rule(nft: NFTables, chain: str, body: list) -> None:
    # nft.rule() would build pyroute2's own message class, with its 32-bit log group.
    nft._command(_RuleMsg, {"add": NFT_MSG_NEWRULE}, "add", {"table": TABLE, "chain": chain, "expressions": body})


def login_node_addresses() -> list[str]:
    """This host's addresses (IPv4 and IPv6) that are not always denied anyway; call it in the
    host's network namespace."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = (a.get_attr("IFA_ADDRESS") for a in ipr.get_addr())
        addresses = {ipaddress.ip_address(a) for a in found if a}
    return sorted(str(a) for a in addresses if not any(a in net for net in ALWAYS_DENIED))


# -- NFLOG: reading the refusals ------------------------------------------------------------
NETLINK_NETFILTER = 12
_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_PACKET, _NFULNL_MSG_CONFIG = 0, 1
_NFULA_CFG_CMD, _NFULA_CFG_MODE, _NFULA_CFG_QTHRESH = 1, 2, 4
_NFULNL_CFG_CMD_BIND, _NFULNL_COPY_PACKET = 1, 2
_NFULA_PAYLOAD, _NFULA_PREFIX = 9, 10
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLA_TYPE_MASK = 0x3FFF
_COPY_BYTES = 64  # the IPv4 or IPv6 header and the ports are all we read


@dataclasses.dataclass(frozen=True)
class Denial:
    worker: str  # the client's VPN address: `gateway status` names the worker behind it
    destination: str
    protocol: str
    reason: str

    def __str__(self) -> str:
        return f"tunnel: refused {self.worker} to {self.destination} ({self.protocol}): {self.reason}"


def open_denial_log(group: int = LOG_GROUP) -> socket.socket:
    """A socket that receives the refusals logged in this network namespace (call it there;
    the socket keeps its namespace wherever it is passed). Raises OSError if binding fails."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        attrs = (_nla(_NFULA_CFG_CMD, bytes([_NFULNL_CFG_CMD_BIND]))
                 + _nla(_NFULA_CFG_MODE, struct.pack("!IBx", _COPY_BYTES, _NFULNL_COPY_PACKET))
                 # Each refusal at once, not batched by the hundred or for a second.
                 + _nla(_NFULA_CFG_QTHRESH, struct.pack("!I", 1)))
        header = struct.pack("!BBH", socket.AF_UNSPEC, 0, group)  # nfgenmsg; res_id: the group
        body = header + attrs
        sock.send(struct.pack("=IHHII", 16 + len(body), _NFNL_SUBSYS_ULOG << 8 | _NFULNL_MSG_CONFIG,
                              _NLM_F_REQUEST | _NLM_F_ACK, 1, 0) + body)
        reply = sock.recv(4096)
        if struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, 16)[0]
            if code:
                raise OSError(code, f"binding NFLOG group {group}: {errno.errorcode.get(code, code)}")
    except BaseException:
        sock.close()
        raise
    return sock


def _nla(kind: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), kind) + data + bytes(-len(data) % 4)


def _attributes(data: bytes) -> dict[int, bytes]:
    found, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & _NLA_TYPE_MASK] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def parse_denials(data: bytes) -> list[Denial]:
    """The refusals in what one recv() on the log socket returned."""
    denials, offset = [], 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == _NFNL_SUBSYS_ULOG << 8 | _NFULNL_MSG_PACKET:
            attrs = _attributes(data[offset + 20:offset + length])  # after nlmsghdr and nfgenmsg
            packet = _describe(attrs.get(_NFULA_PAYLOAD, b""))
            if packet:
                reason = attrs.get(_NFULA_PREFIX, b"").split(b"\0")[0].decode(errors="replace")
                denials.append(Denial(*packet, reason=reason))
        offset += (length + 3) & ~3
    return denials


def _describe(packet: bytes) -> tuple[str, str, str] | None:
    """(source, destination, protocol) of an IP packet's first bytes."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        header, protocol = (packet[0] & 0xF) * 4, packet[9]
        source, dest = ipaddress.ip_address(packet[12:16]), ipaddress.ip_address(packet[16:20])
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        header, protocol = 40, packet[6]  # extension headers are not followed: no port then
        source, dest = ipaddress.ip_address(packet[8:24]), ipaddress.ip_address(packet[24:40])
    else:
        return None
    where = str(dest)
    if protocol in PORT_PROTOCOLS and len(packet) >= header + 4:
        port = struct.unpack_from("!H", packet, header + 2)[0]
        where = f"{dest}:{port}" if dest.version == 4 else f"[{dest}]:{port}"
    return str(source), where, _PROTOCOL_NAMES.get(protocol, f"protocol {protocol}")


class DenialLog(threading.Thread):
    """Logs the refusals from ``open_denial_log``'s socket (a line per 10 s at most, as the
    relay's refusals) and counts them per reason (``counts``), which it writes, at most once
    a second, to ``counts_path`` as JSON for ``gateway status`` (another process)."""

    WRITE_EVERY = 1.0

    def __init__(self, sock: socket.socket, counts_path: Path | None = None):
        super().__init__(daemon=True, name="tunnel-denials")
        from ..relay.server import QuietLog  # the relay's own rate limit
        self.sock, self.counts, self.counts_path = sock, collections.Counter(), counts_path
        self._quiet = QuietLog()
        self._written = -self.WRITE_EVERY
        self._unwritten = False

    def run(self) -> None:
        self.sock.settimeout(self.WRITE_EVERY)
        self._write()  # none yet: status shows 0, not "unknown"
        while True:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                data = b""
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped some; the rest still count
                    continue
                return  # the socket was closed: the gateway is going down
            for denial in parse_denials(data):
                self.counts[denial.reason] += 1
                self._unwritten = True
                self._quiet.warning("%s", denial)
            if self._unwritten and time.monotonic() - self._written >= self.WRITE_EVERY:
                self._write()

    def _write(self) -> None:
        if not self.counts_path:
            return
        try:
            scratch = self.counts_path.with_name(self.counts_path.name + ".new")
            scratch.unlink(missing_ok=True)
            write_file(scratch, json.dumps(dict(self.counts)).encode())
            scratch.replace(self.counts_path)
        except OSError as e:
            self._quiet.warning("cannot record the tunnel's refusals in %s: %s", self.counts_path, e)
        self._written, self._unwritten = time.monotonic(), False

