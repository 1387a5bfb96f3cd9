"""vpn-provider: a user-level VPN that lets workers on air-gapped HPC compute nodes reach the Internet.

Public API (imported lazily, so ``vpn-provider exec`` starts fast on compute nodes)::

    from vpn_provider import Gateway, GatewayConfig, Ticket, Transport, run, vpn_command, exec_in_vpn
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VPNError": ".errors",
    "Gateway": ".gateway.control",
    "GatewayConfig": ".gateway.config",
    "Endpoint": ".ticket",
    "Ticket": ".ticket",
    "Transport": ".transport",
    "run": ".worker.api",
    "vpn_command": ".worker.api",
    "exec_in_vpn": ".worker.tunnel",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'vpn_provider' has no attribute {name!r}")
