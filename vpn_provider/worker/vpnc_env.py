"""Parse the environment openconnect hands its script into one typed record (vpnc-script API)."""
from __future__ import annotations

import dataclasses
import ipaddress


@dataclasses.dataclass(frozen=True)
class TunnelParams:
    tundev: str
    address: ipaddress.IPv4Interface
    mtu: int
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    search_domain: str
    split_include: tuple[ipaddress.IPv4Network, ...]  # empty: full tunnel (default route)
    gateway: str
    address6: ipaddress.IPv6Interface | None = None  # where the gateway's tunnel carries IPv6


def _split_networks(env: dict[str, str]) -> tuple[ipaddress.IPv4Network, ...]:
    count = int(env.get("CISCO_SPLIT_INC", "0") or 0)
    nets = []
    for i in range(count):
        addr = env.get(f"CISCO_SPLIT_INC_{i}_ADDR")
        masklen = env.get(f"CISCO_SPLIT_INC_{i}_MASKLEN")
        if addr and masklen:
            nets.append(ipaddress.IPv4Network(f"{addr}/{masklen}", strict=False))
    return tuple(nets)


def parse(env: dict[str, str]) -> TunnelParams:
    """Raise ValueError naming the variable if something we need is missing or malformed."""
    def need(key: str) -> str:
        value = env.get(key, "").strip()
        if not value:
            raise ValueError(f"openconnect gave no {key}")
        return value

    address = need("INTERNAL_IP4_ADDRESS")
    masklen = env.get("INTERNAL_IP4_NETMASKLEN") or "32"
    return TunnelParams(
        tundev=need("TUNDEV"),
        address=ipaddress.IPv4Interface(f"{address}/{masklen}"),
        mtu=int(env.get("INTERNAL_IP4_MTU") or 1400),
        dns=tuple(ipaddress.ip_address(d) for d in env.get("INTERNAL_IP4_DNS", "").split()),
        search_domain=env.get("CISCO_DEF_DOMAIN", "").strip(),
        split_include=_split_networks(env),
        gateway=env.get("VPNGATEWAY", ""),
        address6=_address6(env),
    )


def _address6(env: dict[str, str]) -> ipaddress.IPv6Interface | None:
    """INTERNAL_IP6_NETMASK is the address with its prefix; ocserv gives each client a /128."""
    with_prefix = env.get("INTERNAL_IP6_NETMASK", "").strip()
    address = env.get("INTERNAL_IP6_ADDRESS", "").strip()
    if "/" in with_prefix:
        return ipaddress.IPv6Interface(with_prefix)
    return ipaddress.IPv6Interface(f"{address}/128") if address else None


def parse_nul_separated(blob: bytes) -> dict[str, str]:
    """``env -0`` output to a dict."""
    out = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out
