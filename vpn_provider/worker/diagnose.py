"""Turn openconnect's log into one line a person can act on."""
from __future__ import annotations

import re

from ..errors import TunnelError
from . import NATIVE_REMEDY

# (pattern in openconnect's output, reason, remedy); first match wins.
_RULES: tuple[tuple[str, str, str], ...] = (
    (r"fingerprint\(s\) specified via --servercert match|certificate does not match",
     "the gateway's certificate does not match the ticket's pin",
     "use the ticket.json written by this gateway (it changes if the state dir is recreated)"),
    (r"Login failed|User input required in non-interactive mode|fgets \(stdin\)|Authentication failed",
     "the gateway rejected the ticket's user or secret",
     "copy a fresh ticket.json from the gateway's state dir"),
    (r"Connection refused",
     "connection refused", "is the gateway running, and is the ticket's address right?"),
    (r"No route to host|Network is unreachable|Host is unreachable",
     "no route to the gateway", "check that this node can reach the gateway's address"),
    (r"Connection timed out",
     "the gateway did not answer", "is a firewall dropping traffic to the gateway's port?"),
    (r"Name or service not known|Temporary failure in name resolution|getaddrinfo failed",
     "cannot resolve the gateway's host name", "put an IP address in the ticket"),
)


# The dynamic loader's line when a preload fails: openconnect then runs without the shim and
# fails much later, on a tun device it cannot create ("Unrecoverable I/O error").
_SHIM_NOT_LOADED = re.compile(r"object '([^']*)' from LD_PRELOAD cannot be preloaded \(([^)]*)\)")


def classify(log: str, endpoint: str) -> TunnelError:
    if m := _SHIM_NOT_LOADED.search(log):
        return TunnelError(f"openconnect could not load the tun preload library {m[1]} ({m[2]})", NATIVE_REMEDY)
    for pattern, reason, remedy in _RULES:
        if re.search(pattern, log):
            return TunnelError(f"{reason} ({endpoint})", remedy)
    last = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return TunnelError(f"openconnect failed ({endpoint}): {last[-1] if last else 'no output'}")
