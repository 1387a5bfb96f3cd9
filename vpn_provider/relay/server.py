"""The gateway's end of the relay: runs as the user on the login node, in its own network.

    python -m vpn_provider.relay.server --listen-fd N     (the key arrives as hex on stdin)

For each authenticated client it connects to the requested destination (or, for a DNS stream,
to this host's resolver) and carries the flow (pump.py): sealed records to and from the node,
or, with --plain (the gateway's opt-out), spliced bytes. It refuses the login node's loopback,
as slirp4netns' --disable-host-loopback does for the tunnel: workers must not reach services
bound to 127.0.0.1 on the login node. Anyone who can reach the port can try a handshake, so
handshakes cost no thread (HandshakeLoop), are short, and what they cost in the log is bounded.
"""
from __future__ import annotations

import argparse
import collections
import errno
import logging
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .. import linux
from ..policy import Policy
from .protocol import (CLIENT_HELLO, DEST_CONNECT_TIMEOUT, FIRST_BYTES_DEADLINE, HANDSHAKE_DEADLINE, MAGIC,
                       HandshakeError, Mode, Request, ServerHandshake, Status, Verb, check_magic, worker_name)
from .records import MAX_PLAINTEXT
from . import native_pump
from .pump import Flow, close_cleanly, reset, reset_on_close, tune
from .workers import WorkerTable, serve_status

log = logging.getLogger("vpn_provider.relay")
PROCESS_NAME = "vpnp-gw-relay"
DNS_CONNECT_TIMEOUT = 1.5  # per resolver; the worker's resolver library gives up after 2 s
_ERRNO_STATUS = {errno.ECONNREFUSED: Status.REFUSED, errno.ENETUNREACH: Status.UNREACHABLE,
                 errno.EHOSTUNREACH: Status.UNREACHABLE, errno.ETIMEDOUT: Status.TIMED_OUT}


class QuietLog:
    """At most one line per ``interval`` seconds; the rest are counted, not written."""

    def __init__(self, interval: float = 10.0):
        self.interval, self._next, self._dropped = interval, 0.0, 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._dropped += 1
                return
            dropped, self._dropped, self._next = self._dropped, 0, now + self.interval
        log.warning(message + (f" ({dropped} more not shown)" if dropped else ""), *args)


quiet = QuietLog()
denied = QuietLog()  # apart, so a flood of strangers cannot hide the policy's refusals


def _connect(dest: tuple[str, int], timeout: float) -> tuple[Status, socket.socket | None]:
    try:
        out = socket.create_connection(dest, timeout=timeout)
    except socket.timeout:
        return Status.TIMED_OUT, None
    except OSError as e:
        return _ERRNO_STATUS.get(e.errno, Status.UNREACHABLE), None
    reset_on_close(out)  # if we die from here on, the destination sees a reset (see pump)
    out.settimeout(None)
    return Status.OK, out


def open_resolver(resolvers: tuple[str, ...]) -> tuple[Status, socket.socket | None]:
    """DNS over TCP to the first of the gateway's own resolvers that answers. Loopback ones are
    fine here: we connect, not the worker, and only ever to port 53."""
    status: Status = Status.UNREACHABLE
    for ip in resolvers:
        status, out = _connect((ip, 53), DNS_CONNECT_TIMEOUT)
        if out:
            return status, out
    return status, None


def answer(verb: Verb, dest: tuple[str, int], resolvers: tuple[str, ...]) -> tuple[Status, socket.socket | None]:
    if verb is Verb.PING:
        return Status.OK, None
    if verb is Verb.DNS:
        return open_resolver(resolvers)
    return _connect(dest, DEST_CONNECT_TIMEOUT)


class _Pending:
    """A connection that has not proven the secret yet: what it sent so far, and when it came."""
    __slots__ = ("sock", "peer", "since", "buf", "handshake")

    def __init__(self, sock: socket.socket, peer: tuple):
        self.sock, self.peer, self.since = sock, peer, time.monotonic()
        self.buf = bytearray()
        self.handshake: ServerHandshake | None = None

    def said(self, why: str) -> str:
        """``why`` it ended, or "" for a port probe (a worker choosing its gateway, a health
        check): closed or reset before a byte, which is no news for the log."""
        return why if self.buf or self.handshake else ""

    def wants(self) -> int:
        if self.handshake is None:
            return CLIENT_HELLO - len(self.buf)
        return ServerHandshake.PROOF_SIZE - len(self.buf)


class HandshakeLoop:
    """Every unauthenticated connection, in one thread: non-blocking reads, deadlines, and caps.

    A stranger who can reach the port can open connections and send nothing, or drip bytes.
    Each costs a descriptor and a few hundred bytes here, never a thread; it is dropped when its
    hello is not complete after FIRST_BYTES_DEADLINE, or its handshake after HANDSHAKE_DEADLINE.
    Past PER_SOURCE pending connections from one address (or MAX_PENDING in all) the oldest is
    dropped for the newcomer: a worker's handshake takes a round trip or two, a jam lasts, so the
    old ones are the stranger's. Workers share their node's address with whoever else runs
    there, which is why a cap on the source alone would let a neighbour lock a node out.
    Authenticated connections go to a thread of their own (``on_request``)."""

    PER_SOURCE = 512
    MAX_PENDING = 4096
    TICK = 0.25

    def __init__(self, listener: socket.socket, key: bytes, mode: Mode, on_request):
        self.listener, self.key, self.mode, self.on_request = listener, key, mode, on_request
        self.selector = selectors.DefaultSelector()
        self.pending: dict[socket.socket, _Pending] = {}  # oldest first
        self.per_source: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        while self.listener.fileno() >= 0:
            for key, _ in self.selector.select(self.TICK):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._read(self.pending.get(key.fileobj))
            self._expire(time.monotonic())

    def _accept(self) -> None:
        for _ in range(64):  # then let the pending ones move too
            try:
                sock, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EBADF, errno.EINVAL):  # the listener is closed
                    return
                quiet.warning("relay: accept failed: %s (open connections: %d pending, %d threads)",
                              e, len(self.pending), threading.active_count())
                if self.pending:  # free a descriptor for the next try
                    self._drop(next(iter(self.pending.values())), "")
                else:  # flows hold them all: breathe, or the ready listener would spin us
                    time.sleep(0.05)
                return
            reset_on_close(sock)  # if we die from here on, the node sees a reset, never a clean end
            sock.setblocking(False)
            source = peer[0]
            if self.per_source[source] >= self.PER_SOURCE:
                self._drop(next(p for p in self.pending.values() if p.peer[0] == source),
                           f"more than {self.PER_SOURCE} unfinished handshakes from this address")
            elif len(self.pending) >= self.MAX_PENDING:
                self._drop(next(iter(self.pending.values())), f"more than {self.MAX_PENDING} unfinished handshakes")
            self.pending[sock] = _Pending(sock, peer)
            self.per_source[source] += 1
            self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Pending | None) -> None:
        if conn is None:
            return
        try:
            data = conn.sock.recv(conn.wants())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, conn.said(e.strerror or str(e)))
            return
        if not data:
            self._drop(conn, conn.said("closed during the handshake"))
            return
        conn.buf += data
        try:
            if conn.handshake is None and len(conn.buf) >= len(MAGIC):
                check_magic(bytes(conn.buf[:len(MAGIC)]), "client")
            if conn.wants():
                return
            if conn.handshake is None:
                conn.handshake = ServerHandshake(self.key, self.mode)
                hello = conn.handshake.answer(bytes(conn.buf))
                conn.buf.clear()
                if conn.sock.send(hello) != len(hello):  # a fresh socket's buffer holds it all
                    raise HandshakeError("the client does not read")
                return
            request = conn.handshake.verify(bytes(conn.buf))
        except HandshakeError as e:
            if str(e).startswith("the client speaks"):
                _send_quietly(conn.sock, MAGIC)  # so the client can name the mismatch too
            self._drop(conn, str(e))
            return
        except OSError as e:
            self._drop(conn, e.strerror or str(e))
            return
        self._forget(conn)
        conn.sock.setblocking(True)
        try:
            threading.Thread(target=self.on_request, args=(conn.sock, conn.peer, conn.handshake, request),
                             daemon=True).start()
        except RuntimeError:  # no thread to be had
            quiet.warning("relay: no thread for %s's flow (%d threads)", _name(conn.peer), threading.active_count())
            reset(conn.sock)

    def _expire(self, now: float) -> None:
        for conn in list(self.pending.values()):
            if now - conn.since > HANDSHAKE_DEADLINE:
                self._drop(conn, "handshake took too long")
            elif conn.handshake is None and now - conn.since > FIRST_BYTES_DEADLINE:
                self._drop(conn, "no hello in time")

    def _forget(self, conn: _Pending) -> None:
        self.selector.unregister(conn.sock)
        del self.pending[conn.sock]
        self.per_source[conn.peer[0]] -= 1
        if not self.per_source[conn.peer[0]]:
            del self.per_source[conn.peer[0]]

    def _drop(self, conn: _Pending, why: str) -> None:
        self._forget(conn)
        if why:
            quiet.warning("relay: refused %s: %s", _name(conn.peer), why)
        reset(conn.sock)


def _name(peer: tuple) -> str:
    """host:port, or [host]:port for IPv6."""
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass


def serve_request(client: socket.socket, peer: tuple, handshake: ServerHandshake, request: Request,
                  resolvers: tuple[str, ...], table: WorkerTable, policy: Policy) -> None:
    """An authenticated client's request, in its own thread: answer it, then carry its flow."""
    verb, dest, worker = request
    node = peer[0]
    out = None
    try:
        if verb is Verb.PRESENT:
            _send_status(client, handshake, Status.OK)
            _stay(client, table, node, worker)
            return
        why = policy.why_denied(*dest) if verb is Verb.CONNECT else ""
        if why:
            denied.warning("relay: refused %s of %s to %s: %s", worker_name(worker), node, _name(dest), why)
            table.refused(why)
            status, out = Status.FORBIDDEN, None
        else:
            status, out = answer(verb, dest, resolvers)
        _send_status(client, handshake, status)
    except OSError as e:
        quiet.warning("relay: lost %s before its flow began: %s", _name(peer), e)
        reset(client)
        if out:
            reset(out)
        return
    if out is None:  # a PING, or a refusal: the status was the whole answer
        if verb is Verb.PING:  # and for `check`, where this gateway lets workers go
            _send_quietly(client, handshake.session.sealer.seal(policy.describe().encode()[:MAX_PLAINTEXT]))
        close_cleanly(client)
        return
    tune(client, link=True)
    tune(out, link=False)
    session = handshake.session if handshake.session.mode is Mode.SEALED else None
    flow = Flow(client, out, link=client, session=session)
    table.add_flow(node, worker, flow)
    flow.run()
    if flow.fault:
        quiet.warning("relay: records from %s: %s (the flow was reset)", _name(peer), flow.fault)


def _send_status(client: socket.socket, handshake: ServerHandshake, status: Status) -> None:
    client.settimeout(10.0)
    client.sendall(handshake.status(status))
    client.settimeout(None)


def _stay(client: socket.socket, table: WorkerTable, node: str, worker: int) -> None:
    """A worker's PRESENT connection: listed for as long as it lasts (the helper sends nothing;
    keepalives find a node that vanished)."""
    tune(client, link=True)
    with table.present(node, worker):
        try:
            while client.recv(4096):
                pass
        except OSError:
            pass
    reset(client)


def serve(listener: socket.socket, key: bytes, resolvers: tuple[str, ...] = (),
          table: WorkerTable | None = None, mode: Mode = Mode.SEALED, policy: Policy = Policy()) -> None:
    table = table or WorkerTable()

    def on_request(client, peer, handshake, request):
        serve_request(client, peer, handshake, request, resolvers, table, policy)
    HandshakeLoop(listener, key, mode, on_request).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vpn_provider.relay.server")
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--resolver", action="append", default=[], help="IPv4 resolver for DNS streams")
    ap.add_argument("--status-socket", type=Path, default=None, help="Unix socket that answers with the "
                    "workers' table as JSON (gateway status)")
    ap.add_argument("--plain", action="store_true", help="carry flows unencrypted (the gateway's opt-out)")
    ap.add_argument("--allow", action="append", default=[], help="CIDR[:PORTS] workers may reach (policy.py)")
    ap.add_argument("--deny", action="append", default=[], help="CIDR[:PORTS] workers may not reach")
    ap.add_argument("--own-port", action="append", type=int, default=[], help="the gateway's ports on this host")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    linux.set_process_name(PROCESS_NAME)
    linux.raise_open_file_limit()  # a flow holds 4 descriptors (6 if spliced); 1024 would stop us early
    # SIGTERM (`gateway stop`) must kill at once, even if our parent ignored it: the kernel then
    # resets every flow (see pump), and no application takes a cut stream for a whole one.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    linux.no_core_dumps()  # we hold the key (under the gateway this is inherited already)
    key = bytes.fromhex(sys.stdin.readline().strip())
    sys.stdin.close()
    listener = socket.socket(fileno=args.listen_fd)
    table = WorkerTable()
    mode = Mode.PLAIN if args.plain else Mode.SEALED
    policy = Policy.from_args(args.allow, args.deny, tuple(args.own_port))
    settings = {"encryption": "none (--plain-relay)" if args.plain else "AES-128-GCM", "policy": policy.describe(),
                "pump": native_pump.describe()}
    if not native_pump.available():
        log.warning("relay: %s", settings["pump"])
    if args.status_socket:
        status_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        args.status_socket.unlink(missing_ok=True)
        status_listener.bind(str(args.status_socket))
        status_listener.listen(16)
        threading.Thread(target=serve_status, args=(status_listener, table, settings), daemon=True).start()
    try:
        serve(listener, key, tuple(args.resolver), table, mode, policy)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
