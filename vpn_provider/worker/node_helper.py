"""``exec``'s handle on the node's helper (``native/node_helper.c`` and ``native/tunnel_keeper.c``,
built as ``vpn_provider/_node_helper``): the worker's end of the TCP relay, and the keeper that
runs openconnect and brings the tunnel back after the gateway restarts.

The helper is forked while ``exec`` is still in the node's network namespace, so its sockets to
the gateway are the node's own; then it execs the native binary, which costs the worker little
memory (docs/benchmarks.md) for as long as the job runs. Messages on the control socket (SOCK_SEQPACKET):

    exec -> helper   "IP[,IP..] PORT KEYHEX WORKER"   check the relay (answer: "OK" | "NO reason");
                     the other gateways' relays are for when its gateway dies; WORKER: our pid
    exec -> helper   "T" ... + 5 fds           keep the tunnel (answer: "UP" NUL env | "DOWN why")
    exec -> helper   "L" ROLES + one fd a role  the namespace's sockets for the relay to serve:
                     C: a redirect's listener (127.0.0.1, [::1]); U, D: the resolver's UDP
                     socket and TCP listener (relay-only mode); A: a listener on the node's
                     loopback for preloaded programs (preload mode, native/preload_request.h)
"""
from __future__ import annotations

import dataclasses
import math
import os
import select
import signal
import socket
import sys
import time

from .. import linux, proc
from ..errors import TunnelError
from ..ticket import MAX_GATEWAYS, Endpoint
from . import HELPER_BINARY, NATIVE_REMEDY

_CTL_FD = 3
def helper_binary() -> str:
    if not os.access(HELPER_BINARY, os.X_OK):
        raise TunnelError(f"the node helper {HELPER_BINARY} is missing", NATIVE_REMEDY)
    return str(HELPER_BINARY)


@dataclasses.dataclass(frozen=True)
class KeeperSpec:
    """What the keeper needs to log in again on its own, to any of the ticket's gateways."""
    openconnect_argv: tuple[str, ...]  # without the gateway's URL
    gateways: tuple[Endpoint, ...]  # the one to try first, first
    secret: str = dataclasses.field(repr=False)
    tcp_mode: str  # passed on to the rejoin tool: which TCP flows the tunnel carries
    give_up_after: float  # seconds without a tunnel before CMD gets SIGTERM; 0: never
    attempt_timeout: float  # seconds one login may take
    log_is_scratch: bool  # the log lives in memory: keep only the latest attempt's
    preload: str  # the shim that hands openconnect our tun device
    worker: str  # the worker's name in the gateway's status (openconnect's --local-hostname)

    def message(self, python: str, pythonpath: str, ld_library_path: str) -> bytes:
        """``python`` and ``pythonpath``: how the keeper runs the rejoin tool (exec's interpreter
        and import path); ``ld_library_path``: exec's, for it and for openconnect."""
        fields = ["T", str(math.ceil(self.give_up_after)), str(max(1, math.ceil(self.attempt_timeout))),
                  self.tcp_mode, python, pythonpath, ld_library_path, self.secret,
                  "1" if self.log_is_scratch else "0", self.preload, self.worker, str(len(self.gateways))]
        for gw in self.gateways:
            fields += [ipv4_of(gw), str(gw.port), f"https://{gw}/"]
        fields += self.openconnect_argv
        return "\0".join(fields).encode()


class NodeHelper:
    """The node's helper process. ``relay``/``key``: the relay to check and use (None: tunnel
    only); ``alternatives``: the other gateways' relays, on the same port, for when it dies."""

    def __init__(self, relay: Endpoint | None, key: bytes | None, *, alternatives: tuple[Endpoint, ...] = ()):
        self.relay = relay
        binary = helper_binary()
        _within_limit(1 + len(alternatives))
        addresses = ",".join(ipv4_of(r) for r in (relay, *alternatives)) if relay else ""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            parent_end.close()
            _become_helper(binary, child_end)
        child_end.close()
        self._ctl = parent_end
        self._stash: list[bytes] = []
        if relay and key:
            # The key travels on the socketpair: never in argv or in an environment.
            # Our pid names the worker at the gateway (status): CMD will keep it.
            self._ctl.send(f"{addresses} {relay.port} {key.hex()} {os.getpid()}".encode())

    def _await(self, tags: tuple[bytes, ...], timeout: float) -> bytes | None:
        """The next message that starts with one of ``tags`` (others are kept for later);
        b'' if the helper is gone, None on time-out."""
        for i, msg in enumerate(self._stash):
            if msg.startswith(tags):
                return self._stash.pop(i)
        deadline = time.monotonic() + max(0.0, timeout)
        # poll, not select(): exec may inherit enough descriptors to number ours above 1023.
        readable = select.poll()
        readable.register(self._ctl, select.POLLIN)
        while True:
            if not readable.poll(math.ceil(max(0.0, deadline - time.monotonic()) * 1000)):
                return None
            msg = self._ctl.recv(1 << 20)
            if not msg or msg.startswith(tags):
                return msg
            self._stash.append(msg)

    def verdict(self, timeout: float) -> str:
        """'' when the relay is usable, else the reason (a time-out is a reason too)."""
        msg = self._await((b"OK", b"NO"), timeout)
        if msg is None:
            return f"relay {self.relay}: no answer within {timeout:g} s"
        if msg == b"OK":
            return ""
        return msg[3:].decode(errors="replace") or f"relay {self.relay}: the helper exited"

    def keep_tunnel(self, spec: KeeperSpec, python: str, *, tun_fd: int, log_fd: int,
                    namespaces: list[int]) -> None:
        """Hand the keeper the tun device, openconnect's log and the worker's user, network and
        mount namespaces; it starts openconnect at once."""
        _within_limit(len(spec.gateways))
        pythonpath = os.pathsep.join(p for p in sys.path if p)
        message = spec.message(python, pythonpath, os.environ.get("LD_LIBRARY_PATH", ""))
        socket.send_fds(self._ctl, [message], [tun_fd, log_fd, *namespaces])

    def tunnel_report(self, timeout: float) -> bytes | str | None:
        """openconnect's report (env -0) once the first tunnel is up; a str saying how openconnect
        ended if it did first; None on time-out."""
        msg = self._await((b"UP\0", b"DOWN"), timeout)
        if msg is None:
            return None
        if msg.startswith(b"UP\0"):
            return msg[3:]
        return msg[5:].decode(errors="replace") or "the node helper exited"

    def hand_over(self, redirected: list[socket.socket],
                  resolver: tuple[socket.socket, socket.socket] | None = None) -> None:
        """Give the helper the namespace's sockets: the redirects' listeners (IPv4, and IPv6 if
        the namespace has it), in relay-only mode also the resolver's UDP socket and TCP
        listener; from now on it serves alone. Raises OSError if the helper is gone."""
        self._serve(b"C" * len(redirected) + (b"UD" if resolver else b""), [*redirected, *(resolver or ())])

    def serve_programs(self, listeners: list[socket.socket]) -> None:
        """Give the helper its listeners for preloaded programs (127.0.0.1, and [::1] if the node
        has it); from now on it serves alone. Raises OSError if the helper is gone."""
        self._serve(b"A" * len(listeners), listeners)

    def _serve(self, roles: bytes, sockets: list[socket.socket]) -> None:
        try:
            socket.send_fds(self._ctl, [b"L" + roles], [s.fileno() for s in sockets])
        finally:
            for s in sockets:
                s.close()
            self._ctl.close()

    def detach(self) -> None:
        """Set-up is over without a relay to serve: the helper goes on keeping the tunnel."""
        self._ctl.close()

    def abandon(self) -> None:
        """End the helper now: CMD must not inherit a child it does not know about."""
        self._ctl.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _within_limit(count: int) -> None:
    if count > MAX_GATEWAYS:
        raise TunnelError(f"the ticket names {count} gateway addresses; a worker takes at most {MAX_GATEWAYS}",
                          "advertise fewer addresses per gateway (gateway --advertise)")


def ipv4_of(endpoint: Endpoint) -> str:
    """The helper takes IPv4 addresses; a ticket may name the login node by host name."""
    try:
        return socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError) as e:
        raise TunnelError(f"gateway {endpoint}: no IPv4 address ({getattr(e, 'strerror', None) or e})",
                          "advertise the login node by an IPv4 address (gateway --advertise)") from None


def _become_helper(binary: str, ctl: socket.socket) -> None:
    try:
        linux.die_with_parent()
        # Out of CMD's process group: a Ctrl-C meant for CMD must not take every TCP
        # connection of the job with it.
        os.setpgid(0, 0)
        os.chdir("/")  # hold no job directory busy
        devnull = os.open(os.devnull, os.O_RDWR)
        # Never hold CMD's stdin or stdout open, nor anything else exec inherited (a wrapper's
        # pipes); stderr is the job's, so a flow the relay could not open is reported where
        # users look.
        proc.exec_placed([binary], {0: devnull, 1: devnull, 2: 2, _CTL_FD: ctl.fileno()}, env={})
    except BaseException:  # never return into exec's code
        pass
    os._exit(127)
