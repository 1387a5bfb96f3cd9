"""Typed settings of one gateway. Everything lives in ``state_dir``; two gateways need two dirs."""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from ..egress import CHOICES
from ..egress.slirp import Slirp4netns
from ..policy import Policy, PolicyError
from ..ticket import Endpoint

DEFAULT_LISTEN = "0.0.0.0:8443"
# CGNAT space: rarely used inside HPC sites, so it seldom shadows a real destination.
DEFAULT_POOL = "100.64.0.0/16"
# Workers' IPv6 addresses in the tunnel, where the login node has IPv6: unique-local (RFC 4193,
# global ID "vpnp"), masqueraded to the egress' address on the way out, so never seen outside.
TUNNEL_IPV6_POOL = ipaddress.IPv6Network("fd76:706e:7001::/64")
# /30 holds ocserv's own address and one worker; a pool wider than /8 would take a large part
# of the IPv4 Internet away from workers (their routes to it would lead into the pool).
POOL_PREFIXES = range(8, 31)
# slirp4netns --configure puts the gateway's namespace on libslirp's /24 around its guest
# address; a pool there would shadow the egress' own router and DNS forwarder (pasta has none).
SLIRP_NETWORK = ipaddress.IPv4Interface(f"{Slirp4netns.guest_addr}/24").network
# Networks a pool must not overlap: their addresses cannot serve as a worker's own.
POOL_CONFLICTS = (("'this network'", ipaddress.IPv4Network("0.0.0.0/8")),
                  ("loopback", ipaddress.IPv4Network("127.0.0.0/8")),
                  ("link-local", ipaddress.IPv4Network("169.254.0.0/16")),
                  ("multicast", ipaddress.IPv4Network("224.0.0.0/4")),
                  ("reserved space and the limited broadcast", ipaddress.IPv4Network("240.0.0.0/4")),
                  ("slirp4netns' egress network", SLIRP_NETWORK))


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    state_dir: Path
    listen: Endpoint = Endpoint.parse(DEFAULT_LISTEN)
    dns: tuple[str, ...] = ()  # empty: the host's resolv.conf
    pool: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_POOL)
    egress: str = "auto"
    advertise: tuple[Endpoint, ...] = ()  # empty: every non-loopback address of this host
    mtu: int = 1400
    relay: bool = True  # the TCP relay beside the tunnel (see vpn_provider.relay)
    #: The full-IP tunnel (ocserv and an egress): None offers it where this host has both, and
    #: runs the relay alone where not; False never offers it (--no-tunnel).
    tunnel: bool | None = None
    relay_port: int = 0  # 0: the listen port + 1
    #: Shared by every gateway that should be in one ticket (see registry.py); None: state_dir.
    credentials_dir: Path | None = None
    plain_relay: bool = False  # the relay carries flows unencrypted: an explicit opt-out
    allow: tuple[str, ...] = ()  # destination policy rules, CIDR[:PORTS] (see policy.py)
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.egress not in CHOICES:
            raise ValueError(f"egress must be one of {', '.join(CHOICES)}")
        self._check_pool()
        for d in self.dns:
            ip = ipaddress.ip_address(d)
            if ip.version != 4:
                raise ValueError(f"--dns {d}: only IPv4 resolvers are supported (the tunnel is IPv4)")
            unusable = ("unspecified" if ip.is_unspecified else "loopback" if ip.is_loopback
                        else "multicast" if ip.is_multicast else "reserved" if ip.is_reserved else "")
            if unusable:
                raise ValueError(f"--dns {d}: not a resolver workers can reach ({unusable} address); "
                                 "name a resolver's own address, or omit --dns to use this host's")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"--mtu {self.mtu}: outside 576..9000")
        if not 0 <= self.relay_port < 65536:
            raise ValueError(f"--relay-port {self.relay_port}: not a port number")
        if self.tunnel is False and not self.relay:
            raise ValueError("--no-tunnel with --no-relay: the gateway would offer workers nothing")
        if self.relay and self.relay_endpoint.port == self.listen.port:
            raise ValueError(f"--relay-port {self.relay_port}: must differ from the listen port")
        try:
            self.policy
        except PolicyError as e:
            raise ValueError(f"--allow/--deny {e}") from None

    def _check_pool(self) -> None:
        pool, remedy = self.pool, f"choose a private range such as the default {DEFAULT_POOL}"
        if pool.prefixlen not in POOL_PREFIXES:
            size = "too small" if pool.prefixlen > POOL_PREFIXES[-1] else "too large"
            raise ValueError(f"--pool {pool}: {size} (allowed: /{POOL_PREFIXES[0]} to /{POOL_PREFIXES[-1]}); {remedy}")
        for name, network in POOL_CONFLICTS:
            if pool.overlaps(network) and not (network == SLIRP_NETWORK and self.egress == "pasta"):
                raise ValueError(f"--pool {pool}: overlaps {name} ({network}); {remedy}")

    def warnings(self) -> list[str]:
        """Settings that work but are probably a mistake (the CLI prints each as one line)."""
        try:
            loopback = ipaddress.ip_address(self.listen.host).is_loopback
        except ValueError:
            loopback = self.listen.host == "localhost"
        if loopback:  # not an error: fine for a test on one host, or behind an ssh tunnel
            return [f"--listen {self.listen} is a loopback address, which compute nodes cannot reach; "
                    f"listen on an address they can (default {DEFAULT_LISTEN})"]
        return []

    @property
    def relay_endpoint(self) -> Endpoint:
        default = self.listen.port + 1 if self.listen.port < 65535 else self.listen.port - 1
        return Endpoint(self.listen.host, self.relay_port or default)

    @property
    def policy(self) -> Policy:
        own = (self.listen.port, self.relay_endpoint.port) if self.relay else (self.listen.port,)
        return Policy.from_args(self.allow, self.deny, own_ports=own)

    @property
    def credentials(self) -> Path:
        return self.credentials_dir or self.state_dir

    @property
    def ticket_path(self) -> Path:
        return self.credentials / "ticket.json"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    def cli_args(self) -> list[str]:
        """The ``gateway run`` options that rebuild this config."""
        args = ["--state-dir", str(self.state_dir), "--listen", str(self.listen),
                "--pool", str(self.pool), "--egress", self.egress, "--mtu", str(self.mtu)]
        if self.dns:
            args += ["--dns", ",".join(self.dns)]
        args += ["--relay-port", str(self.relay_endpoint.port)] if self.relay else ["--no-relay"]
        for a in self.advertise:
            args += ["--advertise", str(a)]
        if self.credentials_dir:
            args += ["--credentials", str(self.credentials_dir)]
        if self.plain_relay:
            args.append("--plain-relay")
        if self.tunnel is False:
            args.append("--no-tunnel")
        return args + self.policy.cli_args()


def host_resolvers(resolv_conf: str = "/etc/resolv.conf", *, loopback: bool = False) -> list[str]:
    """IPv4 nameservers of this host. Loopback ones only if asked: tunnel clients cannot reach
    our 127.0.0.1, but the relay, which runs here, can."""
    try:
        text = Path(resolv_conf).read_text()
    except OSError:
        return []
    found = re.findall(r"^\s*nameserver\s+(\S+)", text, flags=re.M)
    out = []
    for ns in found:
        try:
            ip = ipaddress.ip_address(ns.split("%")[0])
        except ValueError:
            continue
        if ip.version == 4 and (loopback or not ip.is_loopback):
            out.append(str(ip))
    return out
