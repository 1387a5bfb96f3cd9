"""Egress backends for the gateway namespace, selected by name or automatically."""
from __future__ import annotations

import logging

from ..errors import GatewayError
from .base import Egress, Forward, listen_forwards
from .pasta import Pasta
from .slirp import Slirp4netns

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "CHOICES", "Egress", "Forward", "listen_forwards", "select"]

BACKENDS: dict[str, type[Egress]] = {"slirp4netns": Slirp4netns, "pasta": Pasta}
CHOICES = ("auto", *BACKENDS)


def select(name: str) -> type[Egress]:
    """``auto`` takes pasta only where its version is known fast, else slirp4netns."""
    if name != "auto":
        backend = BACKENDS[name]
        ok, why = backend.is_supported()
        if not ok:
            raise GatewayError(f"egress {name} unusable: {why}")
        return backend
    order = [Pasta, Slirp4netns] if Pasta.is_supported()[0] and Pasta.is_fast() else [Slirp4netns, Pasta]
    reasons = []
    for backend in order:
        ok, why = backend.is_supported()
        if ok:
            if backend is Pasta and not Pasta.is_fast():
                log.warning("egress pasta (%s): this pasta release is much slower than slirp4netns through the "
                            "tunnel (docs/benchmarks.md); install slirp4netns for its full speed", reasons[0])
            return backend
        log.info("egress %s rejected: %s", backend.name, why)
        reasons.append(why)
    raise GatewayError("no egress backend: " + "; ".join(reasons),
                       "install slirp4netns (Debian package slirp4netns)")
