"""The relay's record layer: each direction of a flow is a sequence of AES-128-GCM records.

    record = type (1) | length (3, big-endian, of the plaintext) | ciphertext | tag (16)

The 4-byte header is the associated data, so type and length are authenticated too. Each
direction has its own traffic secret from the handshake (protocol.py); its records are numbered
from 0, and the nonce is 4 zero bytes and the record number (8, big-endian), as in TLS 1.3's
record layer. Every EPOCH_RECORDS records the traffic secret moves on (HKDF-Expand), long
before AES-GCM's per-key limit (RFC 8446 5.5: 2^24.5 records of 16 KiB; ours are up to 64 KiB).

A direction ends with an END record (no plaintext): the end of a stream is authenticated, so a
stream cut by anyone, or a truncated one, is told from a complete one. A DATA record after END,
a bad tag, a length over MAX_PLAINTEXT or a TCP end without END are all errors.

The cipher, HMAC and HKDF come from the `cryptography` package (OpenSSL) here, and from
OpenSSL's libcrypto in the node helper (native/relay_crypto.c).
"""
from __future__ import annotations

import enum
import socket
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

HEADER = struct.Struct("!B3s")
TAG = 16
KEY = 16  # AES-128
SECRET = 32  # a direction's traffic secret (SHA-256 sized)
MAX_PLAINTEXT = 64 * 1024
EPOCH_RECORDS = 1 << 20  # 64 GiB of full records per key


class RecordType(enum.IntEnum):
    DATA = 1
    END = 2


class RecordError(Exception):
    """A record that does not verify, or a stream that ends without its END record."""


def _expand(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, b"vpnp " + label).derive(secret)


class _Direction:
    def __init__(self, traffic_secret: bytes):
        self._secret, self._number = traffic_secret, 0
        self._aead = AESGCM(_expand(traffic_secret, b"key", KEY))

    def position(self) -> tuple[bytes, int]:
        """The current traffic secret and the number of the next record: where another
        implementation of this direction (native_pump.py) goes on from."""
        return self._secret, self._number

    def _next_nonce(self) -> bytes:
        nonce = bytes(4) + self._number.to_bytes(8, "big")
        self._number += 1
        if self._number % EPOCH_RECORDS == 0:
            self._secret = _expand(self._secret, b"next", SECRET)
            self._aead = AESGCM(_expand(self._secret, b"key", KEY))
        return nonce


class Sealer(_Direction):
    def seal(self, plaintext: bytes | memoryview, kind: RecordType = RecordType.DATA) -> bytes:
        out = bytearray(HEADER.size + len(plaintext) + TAG)
        self.seal_into(plaintext, memoryview(out), kind)
        return bytes(out)

    def seal_into(self, plaintext: bytes | memoryview, out: memoryview, kind: RecordType = RecordType.DATA) -> int:
        """Write the record to ``out`` (at least 4 + len(plaintext) + 16 bytes); return its size.
        The pumps' path: no allocation per record."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError("record too long")
        size = HEADER.size + len(plaintext) + TAG
        HEADER.pack_into(out, 0, kind, len(plaintext).to_bytes(3, "big"))
        self._aead.encrypt_into(self._next_nonce(), plaintext, out[:HEADER.size], out[HEADER.size:size])
        return size

    def end(self) -> bytes:
        return self.seal(b"", RecordType.END)


class Opener(_Direction):
    def __init__(self, traffic_secret: bytes):
        super().__init__(traffic_secret)
        self.ended = False

    @staticmethod
    def body_size(header: bytes | memoryview) -> int:
        """How many bytes follow this header; RecordError for a header that cannot be ours."""
        kind, length = HEADER.unpack(header)
        size = int.from_bytes(length, "big")
        if kind not in (RecordType.DATA, RecordType.END) or size > MAX_PLAINTEXT:
            raise RecordError("not a relay record (a different protocol, or altered on the way)")
        return size + TAG

    def open(self, header: bytes | memoryview, body: bytes | memoryview) -> bytes:
        """The plaintext of a DATA record, or b'' for END (and ``ended`` is set)."""
        out = bytearray(len(body) - TAG)
        return bytes(memoryview(out)[:self.open_into(header, body, memoryview(out))])

    def open_into(self, header: bytes | memoryview, body: bytes | memoryview, out: memoryview) -> int:
        """Write the plaintext to ``out`` (at least len(body) - 16 bytes); return its size."""
        if self.ended:
            raise RecordError("data after the end of the stream")
        size = len(body) - TAG
        if size < 0:
            raise RecordError("a record shorter than its tag")
        try:
            self._aead.decrypt_into(self._next_nonce(), body, header, out[:size])
        except InvalidTag:
            raise RecordError("a record failed authentication (altered on the way)") from None
        if header[0] == RecordType.END:
            if size:
                raise RecordError("an end record with data")
            self.ended = True
        return size


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean TCP end before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise RecordError("the stream was cut inside a record")
        got += n
    return True


def recv_record(sock: socket.socket, opener: Opener) -> bytes:
    """One record's plaintext (b'' for END); RecordError if the TCP stream ends first."""
    header = bytearray(HEADER.size)
    if not recv_exactly(sock, memoryview(header)):
        raise RecordError("the stream was cut (no end record)")
    body = bytearray(opener.body_size(header))
    recv_exactly(sock, memoryview(body))
    return opener.open(header, body)
