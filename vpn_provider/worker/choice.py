"""The transport a worker takes when none was asked for: the best that this node and this
gateway allow, in order: the full-IP tunnel plus the relay, then relay-only, then, where user
namespaces are off, the preload fallback."""
from __future__ import annotations

import logging
import os

from .. import linux, proc
from ..ticket import Ticket
from ..transport import Transport
from . import PRELOAD_LIBRARY

log = logging.getLogger(__name__)


def tunnel_unavailable(ticket: Ticket) -> str:
    """Why this worker cannot have the tunnel here, or "" if it can."""
    if not ticket.tunnel:
        return "the gateway offers no tunnel (it runs the relay alone)"
    if not proc.installed("openconnect"):
        return "openconnect is not installed on this node"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"/dev/net/tun cannot be opened ({e.strerror})"
    if not PRELOAD_LIBRARY.exists():
        return f"the tun preload library {PRELOAD_LIBRARY.name} is missing (an install without a compiler)"
    return ""


def namespaces_unavailable() -> str:
    """Why this node gives us no user namespace (off, or forbidden by AppArmor), or ""."""
    allowed, why = linux.user_namespaces_allowed()
    return "" if allowed else f"user namespaces are off on this node ({why})"


def decide(ticket: Ticket) -> tuple[Transport, str]:
    """The transport for this node and gateway, and why the tunnel is not to be had ("" if it
    is). Where the ticket names no relay, the tunnel is all there is: its own error then says
    what is missing."""
    if not ticket.relay_port:
        return Transport.RELAY, tunnel_unavailable(ticket)
    why = namespaces_unavailable()
    if why:
        return Transport.PRELOAD, why
    why = tunnel_unavailable(ticket)
    return (Transport.RELAY_ONLY if why else Transport.RELAY), why


def choose(ticket: Ticket) -> Transport:
    """decide(), said in one line when the job gets less than the full-IP tunnel (TCP and DNS
    only); the usual choice only with -v."""
    transport, why = decide(ticket)
    if transport is Transport.PRELOAD:
        log.warning("transport preload (TCP and DNS only, for dynamically linked programs): %s", why)
    elif transport is Transport.RELAY_ONLY:
        log.warning("transport relay-only (TCP and DNS only): %s", why)
    else:
        log.info("transport: relay (the full-IP tunnel%s)", ", TCP through the relay" if ticket.relay_port else "")
    return transport
