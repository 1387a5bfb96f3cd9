"""The relay's handshake: mutual proof of the ticket's secret, then one destination.

    client -> server   MAGIC, client nonce (16)
    server -> client   server nonce (16), HMAC(key, "S" | cn | sn)
    client -> server   HMAC(key, "C" | cn | sn | request),
                       request = verb (1) | IPv4 (4) | port (2) | worker (4)
                       (version 1's request, still accepted, had no worker: it reads as 0)
    server -> client   status (1); on OK the connection carries the flow's bytes from here on

Two implementations speak it: this module (the gateway's relay, and ``check``'s probe) and
``native/node_helper.c`` (the worker's helper).

The secret never crosses the wire, and a recorded handshake is useless because each side's
proof covers the other side's fresh nonce. The flow's bytes are not encrypted: they are what
the application sends (root://, https://), as they would be between the login node and the
Internet. Use the tunnel transport where the site network between nodes must not see them.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
import socket
import struct
import time
from typing import NamedTuple

MAGIC = b"VPNP-RELAY/2\n"
_REQUESTS = {MAGIC: struct.Struct("!c4sHI"), b"VPNP-RELAY/1\n": struct.Struct("!c4sH")}
HANDSHAKE_DEADLINE = 5.0  # seconds for a whole handshake, not per read: no slow-drip clients
DEST_CONNECT_TIMEOUT = 15.0  # the gateway's connect to a destination; the client waits longer
NONCE = 16
MAC = 32
_REQUEST = _REQUESTS[MAGIC]


class Verb(bytes, enum.Enum):
    CONNECT = b"C"
    PING = b"P"  # checks reachability and the secret; carries no flow
    DNS = b"D"  # a DNS-over-TCP stream to the gateway's own resolver (the address is ignored)
    PRESENT = b"W"  # a worker's idle connection for its whole life, so the gateway lists it


class Request(NamedTuple):
    verb: Verb
    dest: tuple[str, int]
    worker: int  # the worker's number on its node (exec's pid), for the gateway's status


class Status(enum.IntEnum):
    OK = 0
    REFUSED = 1
    UNREACHABLE = 2
    TIMED_OUT = 3
    FORBIDDEN = 4  # a destination the gateway will not connect to (its own loopback, say)


class HandshakeError(Exception):
    """The peer is not a relay, or does not know the secret."""


def worker_name(number: int) -> str:
    """How the gateway's status names a worker: its number on its node (exec's pid)."""
    return f"vpnp-{number}"


def relay_key(secret: str) -> bytes:
    return hashlib.sha256(b"vpn-provider relay v1\0" + secret.encode()).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes, or HandshakeError; ``deadline`` is a time.monotonic() value."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeError("handshake took too long")
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def client_handshake(sock: socket.socket, key: bytes, verb: Verb,
                     dest: tuple[str, int] = ("0.0.0.0", 0), worker: int = 0) -> Status:
    """Run the client side on a connected socket; return the server's status."""
    cn = os.urandom(NONCE)
    sock.sendall(MAGIC + cn)
    answer = recv_exact(sock, NONCE + MAC)
    sn, server_mac = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(server_mac, _mac(key, b"S", cn, sn)):
        raise HandshakeError("the relay does not know this ticket's secret (a different gateway?)")
    request = _REQUEST.pack(verb.value, socket.inet_aton(dest[0]), dest[1], worker)
    sock.sendall(_mac(key, b"C", cn, sn, request) + request)
    try:
        return Status(recv_exact(sock, 1)[0])
    except ValueError:
        raise HandshakeError("the relay answered with an unknown status") from None


def server_handshake(sock: socket.socket, key: bytes) -> Request:
    """Run the server side; return the verified request. The caller sends the status."""
    deadline = time.monotonic() + HANDSHAKE_DEADLINE
    hello = recv_exact(sock, len(MAGIC) + NONCE, deadline)
    layout = _REQUESTS.get(hello[:len(MAGIC)])  # every version's magic has the same length
    if layout is None:
        raise HandshakeError("not a relay client (or a version this gateway does not speak)")
    cn, sn = hello[len(MAGIC):], os.urandom(NONCE)
    sock.sendall(sn + _mac(key, b"S", cn, sn))
    proof = recv_exact(sock, MAC + layout.size, deadline)
    client_mac, request = proof[:MAC], proof[MAC:]
    if not hmac.compare_digest(client_mac, _mac(key, b"C", cn, sn, request)):
        raise HandshakeError("wrong secret")
    verb, addr, port, *worker = layout.unpack(request)
    try:
        return Request(Verb(verb), (socket.inet_ntoa(addr), port), worker[0] if worker else 0)
    except ValueError:
        raise HandshakeError(f"unknown verb {verb!r}") from None
