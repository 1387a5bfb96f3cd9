"""Move a flow's bytes between two TCP sockets inside the kernel, both directions.

splice(2) moves pages from one socket's receive queue through a pipe into the other socket,
so user space never touches the data; Python only loops once per chunk, not per packet.
An end of stream one way becomes shutdown(SHUT_WR) the other way (half-closes pass through);
a reset or error either way resets both sides, so no application mistakes a broken transfer
for a complete one.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import threading

# Per pipe. Linux caps a user's pipe buffers at 64 MiB in all (fs.pipe-user-pages-soft) and
# then shrinks every new pipe of that user, the job's own included: 256 KiB x 2 pipes x 2
# hosts leaves room for over a hundred concurrent flows.
CHUNK = 256 * 1024
SIOCATMARK = 0x8905  # linux/sockios.h
_HAS_SPLICE = hasattr(os, "splice")  # Python >= 3.10
# A relay socket whose peer vanished (a crashed or preempted node) is found within ~2 min.
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 6))
# Flow threads only splice; the default 8 MiB stack reservation would cap the flow count.
threading.stack_size(256 * 1024)


def tune(sock: socket.socket) -> None:
    """No Nagle delay (small requests, XRootD's, must not wait) and keepalives."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # urgent data: see _splice_one_way
    for option, value in _KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _linger_zero(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def reset(sock: socket.socket) -> None:
    """Close with RST, so the peer sees the failure instead of a clean end of stream."""
    _linger_zero(sock)
    sock.close()


def _splice_one_way(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:  # the user's pipe quota is spent: the default size still works
            pass
        while True:
            n = os.splice(src.fileno(), w, CHUNK, flags=os.SPLICE_F_MOVE)
            if n == 0:
                if not _at_urgent_mark(src):
                    return
                # splice stops at TCP's urgent mark and reads as an end of stream; recv steps
                # over it, and SO_OOBINLINE (tune) keeps the urgent byte in the stream.
                data = src.recv(4096)
                if not data:
                    return
                dst.sendall(data)
                continue
            while n:
                n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
    finally:
        os.close(r)
        os.close(w)


def _at_urgent_mark(sock: socket.socket) -> bool:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCATMARK, bytes(4)))[0] != 0
    except OSError:
        return False


def _copy_one_way(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(CHUNK)
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
        try:
            threading.Thread(target=self._direction, args=(self.b, self.a), daemon=True).start()
        except RuntimeError:  # no thread to be had: refuse the flow rather than hang it
            reset(self.a)
            reset(self.b)
            return
        self._direction(self.a, self.b)

    def _direction(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            _one_way(src, dst)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._fail()
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            for s in (self.a, self.b):
                reset(s) if self._failed else s.close()

    def _fail(self) -> None:
        """Wake the other direction without sending anything: a FIN now would tell a healthy
        peer the stream ended cleanly before our RST arrives."""
        self._failed = True
        for s in (self.a, self.b):
            _linger_zero(s)
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
