"""The relay's handshake: proof of the ticket's secret both ways, fresh keys, then one request.

    client -> server   MAGIC | cn (16) | ce (32)
    server -> client   MAGIC | mode (1) | sn (16) | se (32) | HMAC(mac_key, "server" | th)
    client -> server   HMAC(mac_key, "client" | th) | a record: the request
                       request = verb (1) | address (16, IPv6; IPv4 as ::ffff:a.b.c.d) | port (2) | worker (4)
    server -> client   a record: status (1); on OK the flow's bytes follow

cn, sn are random nonces and ce, se ephemeral X25519 public keys. th is the SHA-256 of both
hellos (the server's without its HMAC). The key schedule, a pre-shared key with ephemeral
Diffie-Hellman as in TLS 1.3's psk_dhe_ke:

    c2s (32) | s2c (32) | mac_key (32) = HKDF-SHA256(ikm = X25519(ce, se), salt = relay key,
                                                     info = "vpnp relay 3" | th)

So only holders of the ticket's secret can complete a handshake, neither side can be replayed
(each proof covers the other side's fresh key), and recorded flows stay secret even if the
ticket leaks later. c2s and s2c are the two directions' traffic secrets for records.py.

``mode`` is the gateway's choice, covered by both proofs so no one on the way can downgrade it:
SEALED (the default) carries the flow's bytes in records; PLAIN (the gateway's explicit
opt-out, --plain-relay) carries them as they are after the status record, for the kernel to
splice. The request and status are records in either mode.

A side that gets another version's MAGIC sends its own and closes, so the other side can say
which versions differ. Two implementations speak this: this module (the gateway's relay and
``check``) and the node helper (``native/relay_crypto.c``).
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import time
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import VPNError
from .records import SECRET, Opener, RecordError, Sealer, recv_record

PROTOCOL = b"VPNP-RELAY/"
MAGIC = PROTOCOL + b"3\n"
# Seconds for a whole handshake, not per read: no slow-drip client holds a slot for long. Generous,
# because on a node starting hundreds of workers at once on two cores a client's handshake is
# measured in seconds (5 s was too short); a flood is held off by the relay's caps, not by these.
HANDSHAKE_DEADLINE = 30.0
FIRST_BYTES_DEADLINE = 10.0  # for the client's hello: an idle connection holds a descriptor only so long
DEST_CONNECT_TIMEOUT = 15.0  # the gateway's connect to a destination; the client waits longer
NONCE = 16
PUBLIC = 32  # an X25519 public key
MAC = 32
CLIENT_HELLO = len(MAGIC) + NONCE + PUBLIC
SERVER_HELLO = len(MAGIC) + 1 + NONCE + PUBLIC + MAC
REQUEST = struct.Struct("!c16sHI")


class Verb(bytes, enum.Enum):
    CONNECT = b"C"
    PING = b"P"  # checks reachability and the secret; carries no flow
    DNS = b"D"  # a DNS-over-TCP stream to the gateway's own resolver (the address is ignored)
    PRESENT = b"W"  # a worker's idle connection for its whole life, so the gateway lists it


class Mode(bytes, enum.Enum):
    SEALED = b"S"
    PLAIN = b"P"


class Request(NamedTuple):
    verb: Verb
    dest: tuple[str, int]
    worker: int  # the worker's number on its node (exec's pid), for the gateway's status


class Status(enum.IntEnum):
    OK = 0
    REFUSED = 1
    UNREACHABLE = 2
    TIMED_OUT = 3
    FORBIDDEN = 4  # a destination the gateway's policy refuses (its own loopback, say)


class HandshakeError(VPNError):
    """The peer is not a relay, speaks another version, or does not know the secret."""


class Session(NamedTuple):
    """What a finished handshake leaves: the sending and receiving halves of the record layer."""
    mode: Mode
    sealer: Sealer
    opener: Opener


def worker_name(number: int) -> str:
    """How the gateway's status names a worker: its number on its node (exec's pid)."""
    return f"vpnp-{number}"


def relay_key(secret: str) -> bytes:
    return hashlib.sha256(b"vpn-provider relay v1\0" + secret.encode()).digest()


def check_magic(magic: bytes, peer: str) -> None:
    if magic == MAGIC:
        return
    if magic.startswith(PROTOCOL):
        theirs = magic[len(PROTOCOL):].strip().decode("ascii", "replace")
        raise HandshakeError(f"the {peer} speaks relay protocol {theirs}, this side "
                             f"{MAGIC[len(PROTOCOL):].strip().decode()}: run the same vpn-provider "
                             "version on the login node and the compute nodes")
    raise HandshakeError(f"the {peer} is not a vpn-provider relay")


def pack_request(verb: Verb, dest: tuple[str, int], worker: int) -> bytes:
    ip = ipaddress.ip_address(dest[0])
    address = ip.packed if ip.version == 6 else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed
    return REQUEST.pack(verb.value, address, dest[1], worker)


def unpack_request(data: bytes) -> Request:
    if len(data) != REQUEST.size:
        raise HandshakeError("a request of the wrong size")
    verb, address, port, worker = REQUEST.unpack(data)
    ip = ipaddress.IPv6Address(address)
    try:
        return Request(Verb(verb), (str(ip.ipv4_mapped or ip), port), worker)
    except ValueError:
        raise HandshakeError(f"unknown verb {verb!r}") from None


class _KeySchedule:
    def __init__(self):
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def derive(self, key: bytes, peer_public: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes]:
        """(c2s, s2c, mac_key)"""
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:  # a low-order point: no key agreement
            raise HandshakeError("a bad key share") from None
        th = hashlib.sha256(transcript).digest()
        okm = HKDF(hashes.SHA256(), 3 * SECRET, salt=key, info=b"vpnp relay 3" + th).derive(shared)
        self.th = th
        return okm[:SECRET], okm[SECRET:2 * SECRET], okm[2 * SECRET:]


def _proof(mac_key: bytes, side: bytes, th: bytes) -> bytes:
    return hmac.new(mac_key, side + th, hashlib.sha256).digest()


class ServerHandshake:
    """The gateway's side, step by step, so a non-blocking loop can drive many at once:
    read MAGIC, then the rest of CLIENT_HELLO for ``answer``, then PROOF_SIZE for ``verify``."""

    PROOF_SIZE = MAC + 4 + REQUEST.size + 16  # the proof, then one record holding the request

    def __init__(self, key: bytes, mode: Mode = Mode.SEALED):
        self.key, self.mode = key, mode
        self._keys = _KeySchedule()

    def answer(self, hello: bytes) -> bytes:
        check_magic(hello[:len(MAGIC)], "client")
        cn_ce = hello[len(MAGIC):]
        server_hello = MAGIC + self.mode.value + os.urandom(NONCE) + self._keys.public
        c2s, s2c, self._mac_key = self._keys.derive(self.key, cn_ce[NONCE:], hello + server_hello)
        self.session = Session(self.mode, Sealer(s2c), Opener(c2s))
        return server_hello + _proof(self._mac_key, b"server", self._keys.th)

    def verify(self, proof: bytes) -> Request:
        if not hmac.compare_digest(proof[:MAC], _proof(self._mac_key, b"client", self._keys.th)):
            raise HandshakeError("wrong secret")
        record = memoryview(proof)[MAC:]
        try:
            self.session.opener.body_size(record[:4])
            return unpack_request(self.session.opener.open(record[:4], record[4:]))
        except RecordError as e:
            raise HandshakeError(str(e)) from None

    def status(self, status: "Status") -> bytes:
        return self.session.sealer.seal(bytes([status]))


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


def client_handshake(sock: socket.socket, key: bytes, verb: Verb, dest: tuple[str, int] = ("::", 0),
                     worker: int = 0) -> tuple[Status, Session]:
    """Run the client side on a connected socket; return the server's status and the session."""
    keys = _KeySchedule()
    hello = MAGIC + os.urandom(NONCE) + keys.public
    sock.sendall(hello)
    magic = recv_exact(sock, len(MAGIC))
    check_magic(magic, "gateway")
    rest = recv_exact(sock, SERVER_HELLO - len(MAGIC))
    try:
        mode = Mode(rest[:1])
    except ValueError:
        raise HandshakeError("the gateway offered an unknown mode") from None
    server_hello = magic + rest[:-MAC]
    c2s, s2c, mac_key = keys.derive(key, server_hello[-PUBLIC:], hello + server_hello)
    if not hmac.compare_digest(rest[-MAC:], _proof(mac_key, b"server", keys.th)):
        raise HandshakeError("the relay does not know this ticket's secret (a different gateway?)")
    session = Session(mode, Sealer(c2s), Opener(s2c))
    sock.sendall(_proof(mac_key, b"client", keys.th) + session.sealer.seal(pack_request(verb, dest, worker)))
    try:
        answer = recv_record(sock, session.opener)
        return Status(answer[0]), session
    except (RecordError, IndexError, ValueError) as e:
        raise HandshakeError(f"the relay's answer: {e or 'unknown status'}") from None


def server_handshake(sock: socket.socket, key: bytes, mode: Mode = Mode.SEALED) -> tuple[Request, ServerHandshake]:
    """The server side on a blocking socket (tests; the relay drives ServerHandshake itself).
    The caller sends ``handshake.status(...)``."""
    deadline = time.monotonic() + HANDSHAKE_DEADLINE
    handshake = ServerHandshake(key, mode)
    magic = recv_exact(sock, len(MAGIC), deadline)
    try:
        check_magic(magic, "client")
    except HandshakeError:
        sock.sendall(MAGIC)
        raise
    sock.sendall(handshake.answer(magic + recv_exact(sock, CLIENT_HELLO - len(MAGIC), deadline)))
    return handshake.verify(recv_exact(sock, ServerHandshake.PROOF_SIZE, deadline)), handshake
