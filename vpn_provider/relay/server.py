"""The gateway's end of the relay: runs as the user on the login node, in its own network.

    python -m vpn_provider.relay.server --listen-fd N     (the key arrives as hex on stdin)

For each authenticated client it connects to the requested destination (or, for a DNS stream,
to this host's resolver) and splices the two sockets. It refuses the login node's loopback, as slirp4netns' --disable-host-loopback does for
the tunnel: workers must not reach services bound to 127.0.0.1 on the login node. Anyone who
can reach the port can try a handshake, so handshakes are few at a time and short, and what
they cost in the log is bounded.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .. import linux
from .protocol import DEST_CONNECT_TIMEOUT, HandshakeError, Status, Verb, server_handshake
from .pump import Flow, close_cleanly, reset, reset_on_close, tune
from .workers import WorkerTable, serve_status

log = logging.getLogger("vpn_provider.relay")
PROCESS_NAME = "vpnp-gw-relay"
MAX_PENDING_HANDSHAKES = 64
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


def forbidden(host: str) -> bool:
    ip = ipaddress.IPv4Address(host)
    return ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255")


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


def open_destination(dest: tuple[str, int]) -> tuple[Status, socket.socket | None]:
    if forbidden(dest[0]):
        return Status.FORBIDDEN, None
    return _connect(dest, DEST_CONNECT_TIMEOUT)


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
    return open_destination(dest)


def handle(client: socket.socket, key: bytes, pending: threading.Semaphore,
           resolvers: tuple[str, ...] = (), table: WorkerTable | None = None) -> None:
    out = None
    reset_on_close(client)  # if we die from here on, the node sees a reset, never a clean end
    table = table or WorkerTable()
    try:
        try:
            node = client.getpeername()[0]
            verb, dest, worker = server_handshake(client, key)
        finally:
            pending.release()
        if verb is Verb.PRESENT:
            _stay(client, table, node, worker)
            return
        status, out = answer(verb, dest, resolvers)
        client.settimeout(10.0)
        client.sendall(bytes([status]))
        client.settimeout(None)
    except (HandshakeError, OSError) as e:
        quiet.warning("relay: refused a client: %s", e)
        reset(client)
        if out:
            reset(out)
        return
    if out is None:  # a PING, or a refusal: the status was the whole answer
        close_cleanly(client)
        return
    tune(client, link=True)
    tune(out, link=False)
    flow = Flow(client, out, link=client)
    table.add_flow(node, worker, flow)
    flow.run()


def _stay(client: socket.socket, table: WorkerTable, node: str, worker: int) -> None:
    """A worker's PRESENT connection: listed for as long as it lasts (the helper sends nothing;
    keepalives find a node that vanished)."""
    client.settimeout(10.0)
    client.sendall(bytes([Status.OK]))
    client.settimeout(None)
    tune(client, link=True)
    with table.present(node, worker):
        try:
            while client.recv(4096):
                pass
        except OSError:
            pass
    reset(client)


def serve(listener: socket.socket, key: bytes, resolvers: tuple[str, ...] = (),
          table: WorkerTable | None = None) -> None:
    pending = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
    table = table or WorkerTable()
    while True:
        try:
            client, _ = listener.accept()
        except OSError as e:  # EMFILE and friends: note it, breathe, go on
            if e.errno in (errno.EBADF, errno.EINVAL):  # the listener is closed: nothing to serve
                return
            quiet.warning("relay: accept failed: %s", e)
            time.sleep(0.1)
            continue
        if not pending.acquire(blocking=False):
            reset(client)  # a flood of unfinished handshakes: turn the newcomer away
            continue
        try:
            threading.Thread(target=handle, args=(client, key, pending, resolvers, table), daemon=True).start()
        except RuntimeError:  # no thread to be had
            pending.release()
            reset(client)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vpn_provider.relay.server")
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--resolver", action="append", default=[], help="IPv4 resolver for DNS streams")
    ap.add_argument("--status-socket", type=Path, default=None, help="Unix socket that answers with the "
                    "workers' table as JSON (gateway status)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    linux.set_process_name(PROCESS_NAME)
    linux.raise_open_file_limit()  # every flow holds six descriptors; 1024 would stop us near 170
    # SIGTERM (`gateway stop`) must kill at once, even if our parent ignored it: the kernel then
    # resets every flow (see pump), and no application takes a cut stream for a whole one.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    key = bytes.fromhex(sys.stdin.readline().strip())
    sys.stdin.close()
    listener = socket.socket(fileno=args.listen_fd)
    table = WorkerTable()
    if args.status_socket:
        status_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        args.status_socket.unlink(missing_ok=True)
        status_listener.bind(str(args.status_socket))
        status_listener.listen(16)
        threading.Thread(target=serve_status, args=(status_listener, table), daemon=True).start()
    try:
        serve(listener, key, tuple(args.resolver), table)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
