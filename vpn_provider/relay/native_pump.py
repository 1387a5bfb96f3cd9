"""The gateway's end of a flow pumped in C: ``vpn_provider/_relay_pump.so`` (native/relay_pump.c),
the node helper's own pumps, loaded with ctypes. A call lets go of the GIL and carries both
directions of the flow in the calling thread until it ends; the sockets are its to close.

The sealed Python pump (pump.py) costs the gateway clearly more CPU per GB than this one
(docs/benchmarks.md). The Python pump stays for installs without the library (an sdist built
without a compiler); `gateway status` says which one runs.
"""
from __future__ import annotations

import ctypes
import socket
from pathlib import Path

from .records import SECRET, Opener, Sealer

LIBRARY = Path(__file__).resolve().parent.parent / "_relay_pump.so"
_WHY_SIZE = 256
Counters = ctypes.c_uint64 * 2


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        return None
    lib.vpnp_pump_sealed.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_char_p,
                                     ctypes.c_uint64, ctypes.c_int, Counters, ctypes.c_char_p, ctypes.c_size_t]
    lib.vpnp_pump_sealed.restype = ctypes.c_int
    lib.vpnp_pump_plain.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, Counters]
    lib.vpnp_pump_plain.restype = None
    return lib


_lib = _load()


def available() -> bool:
    return _lib is not None


def describe() -> str:
    """Which pump carries the flows, for `gateway status`."""
    if available():
        return "native (_relay_pump.so)"
    return f"Python: {LIBRARY.name} is missing (built by a C compiler at install); more CPU per GB"


def pump_plain(a: socket.socket, b: socket.socket, paced: int, moved: Counters) -> None:
    """Splice until both directions end (moved[0]: a to b); closes both sockets. ``paced``: the
    descriptor of the link socket whose user timeout follows its peer's window, or -1."""
    _lib.vpnp_pump_plain(a.detach(), b.detach(), paced, moved)


def pump_sealed(node: socket.socket, destination: socket.socket, sealer: Sealer, opener: Opener, paced: int,
                moved: Counters) -> str | None:
    """Open the node's records to the destination and seal its bytes back, going on from the
    handshake's record numbers (moved[0]: the node's bytes delivered to the destination);
    closes both sockets. None, or why the node's records were at fault (the flow was reset)."""
    send_secret, send_number = sealer.position()
    receive_secret, receive_number = opener.position()
    assert len(send_secret) == len(receive_secret) == SECRET
    why = ctypes.create_string_buffer(_WHY_SIZE)
    failed = _lib.vpnp_pump_sealed(destination.detach(), node.detach(), send_secret, send_number, receive_secret,
                                   receive_number, paced, moved, why, _WHY_SIZE)
    return why.value.decode(errors="replace") if failed else None
