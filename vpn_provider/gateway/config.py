"""Typed settings of one gateway. Everything lives in ``state_dir``; two gateways need two dirs."""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from ..egress import CHOICES
from ..ticket import Endpoint

DEFAULT_LISTEN = "0.0.0.0:8443"
# CGNAT space: rarely used inside HPC sites, so it seldom shadows a real destination.
DEFAULT_POOL = "100.64.0.0/16"


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
    relay_port: int = 0  # 0: the listen port + 1
    #: Shared by every gateway that should be in one ticket (see registry.py); None: state_dir.
    credentials_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.egress not in CHOICES:
            raise ValueError(f"egress must be one of {', '.join(CHOICES)}")
        if self.pool.prefixlen > 30:
            raise ValueError(f"pool {self.pool} is too small (need /30 or larger)")
        for d in self.dns:
            if ipaddress.ip_address(d).version != 4:
                raise ValueError(f"--dns {d}: only IPv4 resolvers are supported (the tunnel is IPv4)")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"mtu {self.mtu} outside 576..9000")
        if not 0 <= self.relay_port < 65536:
            raise ValueError(f"relay port {self.relay_port} is not a port number")
        if self.relay and self.relay_endpoint.port == self.listen.port:
            raise ValueError(f"relay port {self.relay_port} must differ from the listen port")

    @property
    def relay_endpoint(self) -> Endpoint:
        default = self.listen.port + 1 if self.listen.port < 65535 else self.listen.port - 1
        return Endpoint(self.listen.host, self.relay_port or default)

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
        return args


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
