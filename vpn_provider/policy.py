"""Where workers may connect through the gateway: one policy for the relay and the tunnel.

    --deny CIDR[:PORTS]    (repeatable) never these
    --allow CIDR[:PORTS]   (repeatable) only these, if any is given

PORTS is a port, a range (1094-1099) or a comma list of both; an IPv6 CIDR with ports is
written in brackets: [2001:db8::/32]:443. Always denied, whatever --allow says: the login node's
loopback, link-local networks (169.254.0.0/16 holds cloud metadata services with the login
node's credentials; fe80::/10), multicast, broadcast and unspecified addresses, and the
gateway's own ports on this host (a worker must not chain the relay through itself).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
ALWAYS_DENIED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "fe80::/10", "ff00::/8"))


class PolicyError(ValueError):
    """A rule that cannot be parsed; the message names it."""


@dataclasses.dataclass(frozen=True)
class Rule:
    network: Network
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; () means every port

    @classmethod
    def parse(cls, text: str) -> "Rule":
        where, ports = text, ""
        if text.startswith("["):
            where, _, rest = text[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise PolicyError(f"{text!r}: expected [IPv6-CIDR]:PORTS")
            ports = rest[1:]
        elif text.count(":") == 1:
            where, ports = text.split(":")
        try:
            network = ipaddress.ip_network(where, strict=False)
        except ValueError:
            raise PolicyError(f"{text!r} is not a CIDR "
                              "(like 192.0.2.0/24, 192.0.2.7:1094 or [2001:db8::/32]:443)") from None
        return cls(network, _parse_ports(text, ports) if ports else ())

    def matches(self, ip: Address, port: int) -> bool:
        return ip in self.network and (not self.ports or any(lo <= port <= hi for lo, hi in self.ports))

    def __str__(self) -> str:
        if not self.ports:
            return str(self.network)
        ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        return f"[{self.network}]:{ports}" if self.network.version == 6 else f"{self.network}:{ports}"


def _parse_ports(text: str, ports: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in ports.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo_port, hi_port = int(lo), int(hi or lo)
        except ValueError:
            raise PolicyError(f"{text!r}: {part!r} is not a port or a range of ports") from None
        if not 1 <= lo_port <= hi_port <= 65535:
            raise PolicyError(f"{text!r}: ports go from 1 to 65535, low to high")
        ranges.append((lo_port, hi_port))
    return tuple(ranges)


@dataclasses.dataclass(frozen=True)
class Policy:
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    own_ports: tuple[int, ...] = ()  # the gateway's own listening ports on this host

    @classmethod
    def from_args(cls, allow: list[str] | tuple[str, ...] = (), deny: list[str] | tuple[str, ...] = (),
                  own_ports: tuple[int, ...] = ()) -> "Policy":
        return cls(tuple(Rule.parse(r) for r in allow), tuple(Rule.parse(r) for r in deny), tuple(own_ports))

    def why_denied(self, host: str, port: int) -> str:
        """'' if a worker may connect to host:port, else the reason."""
        ip = ipaddress.ip_address(host)
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        for network in ALWAYS_DENIED:
            if ip in network:
                return f"{network} is never reachable through the gateway"
        if port in self.own_ports and _is_this_host(ip):
            return "the gateway's own port"
        for rule in self.deny:
            if rule.matches(ip, port):
                return f"denied by --deny {rule}"
        if self.allow and not any(rule.matches(ip, port) for rule in self.allow):
            return "not in any --allow"
        return ""

    def describe(self) -> str:
        parts = [f"allow only {', '.join(map(str, self.allow))}" if self.allow else "allow all"]
        if self.deny:
            parts.append(f"deny {', '.join(map(str, self.deny))}")
        parts.append("never loopback, link-local, multicast, broadcast, the gateway's own ports")
        return "; ".join(parts)

    def cli_args(self) -> list[str]:
        return [f"--allow={r}" for r in self.allow] + [f"--deny={r}" for r in self.deny]


def _is_this_host(ip: Address) -> bool:
    """Whether ``ip`` is one of this host's addresses: only those can be bound."""
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError:
            return False
    return True
