"""Move a flow's bytes between two TCP sockets inside the kernel, both directions.

splice(2) moves pages from one socket's receive queue through a pipe into the other socket,
so user space never touches the data; Python only loops once per chunk (up to 1 MiB), not
per packet. Half-closes pass through (EOF one way becomes shutdown(SHUT_WR) the other way),
and an error in either direction resets both.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import threading

CHUNK = 1 << 20
_HAS_SPLICE = hasattr(os, "splice")  # Python >= 3.10


def tune(sock: socket.socket) -> None:
    """No Nagle delay on the relay's own sockets: small requests (XRootD's) must not wait."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def reset(sock: socket.socket) -> None:
    """Close with RST, so the peer sees the failure instead of a clean end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _splice_one_way(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:  # above /proc/sys/fs/pipe-max-size: the default 64 KiB still works
            pass
        while True:
            n = os.splice(src.fileno(), w, CHUNK, flags=os.SPLICE_F_MOVE)
            if n == 0:
                return
            while n:
                n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
    finally:
        os.close(r)
        os.close(w)


def _copy_one_way(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return
        dst.sendall(view[:n])


_one_way = _splice_one_way if _HAS_SPLICE else _copy_one_way


class Flow:
    """Both directions of one relayed connection; closes both sockets when both are done."""

    def __init__(self, a: socket.socket, b: socket.socket):
        self.a, self.b = a, b
        self._lock = threading.Lock()
        self._running = 2
        self._failed = False

    def run(self) -> None:
        """Pump until both directions end; the calling thread carries one of them."""
        threading.Thread(target=self._direction, args=(self.b, self.a), daemon=True).start()
        self._direction(self.a, self.b)

    def _direction(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            _one_way(src, dst)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._failed = True
            for s in (self.a, self.b):  # wake the other direction
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            for s in (self.a, self.b):
                reset(s) if self._failed else s.close()
