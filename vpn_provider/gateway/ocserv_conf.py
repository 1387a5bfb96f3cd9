"""Render ocserv.conf for a gateway that runs as root *inside* an unprivileged user namespace."""
from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class OcservSettings:
    port: int
    pool: ipaddress.IPv4Network
    dns: tuple[str, ...]
    server_cert: Path
    server_key: Path
    passwd_file: Path
    run_dir: Path
    mtu: int = 1400
    max_clients: int = 1024
    pool6: ipaddress.IPv6Network | None = None  # None: the tunnel carries IPv4 alone


def render(s: OcservSettings) -> str:
    lines = [
        f'auth = "plain[passwd={s.passwd_file}]"',
        f"tcp-port = {s.port}",
        f"udp-port = {s.port}",  # DTLS: the egress forwards UDP of the same port
        f"server-cert = {s.server_cert}",
        f"server-key = {s.server_key}",
        f"socket-file = {s.run_dir / 'ocserv-sock'}",
        f"occtl-socket-file = {s.run_dir / 'occtl.sock'}",
        "use-occtl = true",
        f"pid-file = {s.run_dir / 'ocserv.pid'}",
        # No run-as-user/group or chroot: there is only one uid in our namespace. Our gid inside
        # is non-zero, which makes ocserv skip setgroups(), the call a user namespace forbids.
        "isolate-workers = false",
        f"max-clients = {s.max_clients}",
        "max-same-clients = 0",  # every worker logs in as the same user
        "rate-limit-ms = 0",  # a batch job starts many workers at once
        "max-ban-score = 0",  # workers share a node IP; one bad ticket must not ban the rest
        "keepalive = 30",
        "dpd = 30",
        "mobile-dpd = 60",
        "switch-to-tcp-timeout = 25",
        "try-mtu-discovery = false",
        f"mtu = {s.mtu}",
        'tls-priorities = "NORMAL:%SERVER_PRECEDENCE:-VERS-SSL3.0:-VERS-TLS1.0:-VERS-TLS1.1"',
        "auth-timeout = 40",
        "cookie-timeout = 300",
        "deny-roaming = false",
        "compression = false",  # ROOT files are already compressed
        "device = vpns",
        "predictable-ips = true",
        f"ipv4-network = {s.pool.network_address}",
        f"ipv4-netmask = {s.pool.netmask}",
        # One address per client: ocserv routes each to its client's device.
        *([f"ipv6-network = {s.pool6}", "ipv6-subnet-prefix = 128"] if s.pool6 else []),
        *(f"dns = {d}" for d in s.dns),
        "route = default",
        "ping-leases = false",
        "cisco-client-compat = true",
        "dtls-legacy = true",
        "log-level = 1",
    ]
    return "\n".join(lines) + "\n"
