"""Move a flow's bytes between two TCP sockets, both directions.

Where vpn_provider/_relay_pump.so was built, a flow is pumped in C by the node helper's own code
(native_pump.py), one thread per flow; what follows describes the Python pump, kept for installs
without it, and the rules both keep.

A sealed flow (the default) opens the node's records (records.py) one way and seals the
destination's bytes the other way, 64 KiB at a time. A plain flow (the gateway's opt-out)
splices: splice(2) moves pages from one socket's receive queue through a pipe into the other
socket, so user space never touches the data; Python only loops once per chunk.
An end of stream one way becomes shutdown(SHUT_WR) the other way (half-closes pass through; a
sealed flow's node side ends with an END record); a reset or error either way, and on a sealed
flow a TCP end without END, resets both sides, so no application mistakes a broken transfer
for a complete one.

The same holds when the process carrying the flow dies (SIGTERM from `gateway stop`, SIGKILL):
both sockets keep SO_LINGER {on, 0} for the flow's whole life, so the kernel closes them with a
reset, not a FIN that would pass for a clean end. Only a flow whose two directions both ended
cleanly gets its linger cleared and a plain close, so data still queued is delivered.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import threading
import time
from typing import Callable

from . import native_pump
from .records import HEADER, MAX_PLAINTEXT, TAG, Opener, RecordError, Sealer, recv_exactly

# Per pipe. Linux caps a user's pipe buffers at 64 MiB in all (fs.pipe-user-pages-soft) and
# then shrinks every new pipe of that user, the job's own included: 256 KiB x 2 pipes x 2
# hosts leaves room for over a hundred concurrent flows.
CHUNK = 256 * 1024
SIOCATMARK = 0x8905  # linux/sockios.h
SEAL_BATCH = 4  # records per read on a sealed flow (see _seal_one_way)
# The link between node and login node: a flow whose link died must end, with a reset to the
# application, well within a minute. Idle, keepalives find a dead peer in 15 + 3 x 5 = 30 s.
LINK_KEEPALIVE = ((socket.TCP_KEEPIDLE, 15), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 3))
# With data unacknowledged keepalives stay silent and retransmissions would go on for about
# 15 minutes (tcp_retries2): TCP_USER_TIMEOUT ends the flow after 30 s without an ACK.
LINK_USER_TIMEOUT_MS = 30_000
# The destination is a server on the Internet (or the login node's resolver). No user timeout
# there: it also aborts a live peer that keeps its window shut (measured: a reader that pauses),
# and a server may legitimately not read for minutes. Keepalives find a vanished one in ~2 min.
DEST_KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 6))
# How often the link sockets' windows are looked at (see _Watch); well inside the user timeout.
WATCH_INTERVAL = 5.0
_TCP_INFO_SND_WND = 228  # offset of tcpi_snd_wnd in struct tcp_info (Linux >= 5.4)
# Flow threads only splice; the default 8 MiB stack reservation would cap the flow count.
threading.stack_size(256 * 1024)


def _sees_peer_window() -> bool:
    """Whether TCP_INFO reports the peer's window; without it a zero window cannot be told from
    a dead link, and no user timeout is set (see LINK_USER_TIMEOUT_MS)."""
    try:
        with socket.socket() as s:
            return len(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)) >= _TCP_INFO_SND_WND + 4
    except (OSError, AttributeError):
        return False


_USER_TIMEOUT = LINK_USER_TIMEOUT_MS if hasattr(socket, "TCP_USER_TIMEOUT") and _sees_peer_window() else 0


def tune(sock: socket.socket, *, link: bool) -> None:
    """No Nagle delay (small requests, XRootD's, must not wait), keepalives, and on ``link``
    sockets (node to login node) the time-outs that end a flow whose link died."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # urgent data: see _splice_one_way
    for option, value in LINK_KEEPALIVE if link else DEST_KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    if link and _USER_TIMEOUT:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT)


def _set_linger(sock: socket.socket, on: bool) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", int(on), 0))
    except OSError:
        pass


def reset_on_close(sock: socket.socket) -> None:
    """From now on, closing ``sock`` (also by the kernel, when this process dies) sends a reset."""
    _set_linger(sock, True)


def reset(sock: socket.socket) -> None:
    """Close with RST, so the peer sees the failure instead of a clean end of stream."""
    _set_linger(sock, True)
    sock.close()


def close_cleanly(sock: socket.socket) -> None:
    """Close with a FIN after whatever is still queued (undoes reset_on_close)."""
    _set_linger(sock, False)
    sock.close()


def _splice_one_way(src: socket.socket, dst: socket.socket, moved: list[int], way: int) -> None:
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
                moved[way] += len(data)
                continue
            moved[way] += n
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


def _open_one_way(src: socket.socket, dst: socket.socket, moved: list[int], way: int, opener: Opener) -> None:
    """Records from the node to plaintext for the destination, until the END record."""
    header = memoryview(bytearray(HEADER.size))
    body = memoryview(bytearray(MAX_PLAINTEXT + TAG))
    plaintext = memoryview(bytearray(MAX_PLAINTEXT))
    while not opener.ended:
        if not recv_exactly(src, header):
            raise RecordError("the node's stream was cut (no end record)")
        size = opener.body_size(header)
        recv_exactly(src, body[:size])
        n = opener.open_into(header, body[:size], plaintext)
        dst.sendall(plaintext[:n])
        moved[way] += n


def _seal_one_way(src: socket.socket, dst: socket.socket, moved: list[int], way: int, sealer: Sealer) -> None:
    """The destination's bytes as records to the node; the END record is the caller's (Flow).
    One read takes what is queued, up to SEAL_BATCH records' worth, and one send carries all of
    them: the per-call costs, not the copies, are what a Python pump pays for."""
    plaintext = memoryview(bytearray(SEAL_BATCH * MAX_PLAINTEXT))
    records = memoryview(bytearray(SEAL_BATCH * (HEADER.size + MAX_PLAINTEXT + TAG)))
    while n := src.recv_into(plaintext):
        size = 0
        for start in range(0, n, MAX_PLAINTEXT):
            size += sealer.seal_into(plaintext[start:min(n, start + MAX_PLAINTEXT)], records[size:])
        dst.sendall(records[:size])
        moved[way] += n


class _Watch:
    """TCP_USER_TIMEOUT also aborts a live peer whose window stays shut that long (the kernel
    counts zero-window probes as unanswered; measured on 6.18): a reader on the node that pauses
    for 30 s would lose its flow. So while a link socket's peer window is 0 the user timeout is
    off, and on again once it opens. A dead link then shows an open window (the last one the
    peer advertised), and the user timeout ends the flow. One thread for all flows."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flows: set[Flow] = set()
        self._thread: threading.Thread | None = None

    def add(self, flow: "Flow") -> None:
        with self._lock:
            self._flows.add(flow)
            if self._thread is None:
                try:
                    thread = threading.Thread(target=self._run, name="relay-watch", daemon=True)
                    thread.start()
                    self._thread = thread
                except RuntimeError:  # no thread to be had now: flows run unpaced, try again later
                    pass

    def discard(self, flow: "Flow") -> None:
        with self._lock:  # the watcher holds this while it touches a flow's socket
            self._flows.discard(flow)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            with self._lock:
                for flow in self._flows:
                    flow._pace_user_timeout()


_watch = _Watch()


class Flow:
    """Both directions of one relayed connection; closes both sockets when both are done.
    ``link`` (one of the two, or None) is the socket to the node: its user timeout is paced.
    With ``session`` (sealed), ``a`` is the node's side: records come in and go out there.
    ``moved``: bytes from a to b, and from b to a, so far (each written by one pump only).
    ``native``: pump in C (native_pump.py) if it is there (None), always, or never.
    ``fault``: once it ended, why the node's records were wrong, if they were (C pump only)."""

    def __init__(self, a: socket.socket, b: socket.socket, link: socket.socket | None = None,
                 on_end: Callable[["Flow"], None] | None = None, session=None, native: bool | None = None):
        self.a, self.b, self.link, self.on_end = a, b, link, on_end
        self.session = session
        self.native = native_pump.available() if native is None else native
        self.moved = native_pump.Counters() if self.native else [0, 0]
        self.fault: str | None = None
        for s in (a, b):  # the caller should have done this at accept/connect already
            reset_on_close(s)
        self._lock = threading.Lock()
        self._running = 2
        self._failed = False
        self._window_shut = False

    def run(self) -> None:
        """Pump until both directions end; the calling thread carries one of them, or both."""
        if self.native:
            self._run_native()
            return
        if self.link is not None and _USER_TIMEOUT:
            _watch.add(self)  # before any direction can end, and with it discard the flow
        try:
            threading.Thread(target=self._direction, args=(self.b, self.a, 1), daemon=True).start()
        except RuntimeError:  # no thread to be had: refuse the flow rather than hang it
            _watch.discard(self)
            reset(self.a)
            reset(self.b)
            if self.on_end:
                self.on_end(self)
            return
        self._direction(self.a, self.b, 0)

    def _run_native(self) -> None:
        paced = self.link.fileno() if self.link is not None and _USER_TIMEOUT else -1
        if self.session is None:
            native_pump.pump_plain(self.a, self.b, paced, self.moved)
        else:
            self.fault = native_pump.pump_sealed(self.a, self.b, self.session.sealer, self.session.opener, paced,
                                                 self.moved)
        if self.on_end:
            self.on_end(self)

    def _direction(self, src: socket.socket, dst: socket.socket, way: int) -> None:
        try:
            if self.session is None:
                _splice_one_way(src, dst, self.moved, way)
            elif way == 0:
                _open_one_way(src, dst, self.moved, way, self.session.opener)
            else:
                _seal_one_way(src, dst, self.moved, way, self.session.sealer)
            with self._lock:
                failed = self._failed
            # An end of stream after a failure is our own SHUT_RD (see _fail): pass nothing on.
            if not failed:
                if self.session is not None and way == 1:
                    dst.sendall(self.session.sealer.end())
                dst.shutdown(socket.SHUT_WR)
        except (OSError, RecordError):
            self._fail()
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            _watch.discard(self)
            for s in (self.a, self.b):
                reset(s) if self._failed else close_cleanly(s)
            if self.on_end:
                self.on_end(self)

    def _fail(self) -> None:
        """Wake the other direction without sending anything: a FIN now would tell a healthy
        peer the stream ended cleanly before our RST arrives."""
        with self._lock:
            self._failed = True
        for s in (self.a, self.b):
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def _pace_user_timeout(self) -> None:
        """Called by the watcher only (see _Watch)."""
        try:
            info = self.link.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SND_WND + 4)
            shut = struct.unpack_from("I", info, _TCP_INFO_SND_WND)[0] == 0
            if shut != self._window_shut:
                self.link.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0 if shut else _USER_TIMEOUT)
                self._window_shut = shut
        except (OSError, struct.error):  # a socket in trouble: its flow is ending anyway
            pass
