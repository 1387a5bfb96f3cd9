"""``exec``'s handle on the node's relay helper (``native/node_relay.c``, built as
``vpn_provider/_node_relay``).

The helper is forked while ``exec`` is still in the node's network namespace, so its sockets to
the gateway are the node's own; then it execs the native binary, which costs the worker about
1 MB for as long as the job runs.
"""
from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
from pathlib import Path

from .. import linux
from ..errors import TunnelError
from ..ticket import Endpoint

_CTL_FD = 3
BINARY = Path(__file__).resolve().parent.parent / "_node_relay"


def helper_binary() -> str:
    if not os.access(BINARY, os.X_OK):
        raise TunnelError("the relay helper vpn_provider/_node_relay is missing",
                          "reinstall vpn-provider (needs a C compiler), or use --tcp tunnel")
    return str(BINARY)


class RelayHelper:
    def __init__(self, relay: Endpoint, key: bytes):
        self.relay = relay
        binary = helper_binary()
        address = _ipv4_of(relay)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            parent_end.close()
            _become_helper(binary, child_end)
        child_end.close()
        self._ctl = parent_end
        # The key travels on the socketpair: never in argv or in an environment.
        self._ctl.send(f"{address} {relay.port} {key.hex()}".encode())

    def verdict(self, timeout: float) -> str:
        """'' when the relay is usable, else the reason (a time-out is a reason too)."""
        if not select.select([self._ctl], [], [], max(0.0, timeout))[0]:
            return f"relay {self.relay}: no answer within {timeout:g} s"
        msg = self._ctl.recv(4096)
        if msg == b"OK":
            return ""
        return msg[3:].decode(errors="replace") or f"relay {self.relay}: the helper exited"

    def hand_over(self, sockets: list[socket.socket]) -> None:
        """Give the helper the namespace's sockets (the redirect's listener; in relay-only mode
        also the resolver's UDP socket and TCP listener); from now on it serves alone.
        Raises OSError if the helper is gone."""
        try:
            socket.send_fds(self._ctl, [b"L"], [s.fileno() for s in sockets])
        finally:
            for s in sockets:
                s.close()
            self._ctl.close()

    def abandon(self) -> None:
        """End the helper now: CMD must not inherit a child it does not know about."""
        self._ctl.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _ipv4_of(relay: Endpoint) -> str:
    """The helper takes an IPv4 address; a ticket may name the login node by host name."""
    try:
        return socket.getaddrinfo(relay.host, relay.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError) as e:
        raise TunnelError(f"relay {relay}: no IPv4 address ({getattr(e, 'strerror', None) or e})",
                          "advertise the login node by an IPv4 address (gateway --advertise)") from None


def _become_helper(binary: str, ctl: socket.socket) -> None:
    try:
        linux.die_with_parent()
        # Out of CMD's process group: a Ctrl-C meant for CMD must not take every TCP
        # connection of the job with it.
        os.setpgid(0, 0)
        os.chdir("/")  # hold no job directory busy
        devnull = os.open(os.devnull, os.O_RDWR)
        # Lift the control socket above fd 3 first: it may *be* fd 3, and dup2 onto itself
        # would leave close-on-exec set.
        lifted = fcntl.fcntl(ctl.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(devnull, 0)  # never hold CMD's stdin or stdout open; stderr is the job's, so
        os.dup2(devnull, 1)  # a flow the relay could not open is reported where users look
        os.dup2(lifted, _CTL_FD)
        os.closerange(_CTL_FD + 1, 1 << 16)  # nor anything else exec inherited (a wrapper's pipes)
        linux.restore_default_signals()
        os.execve(binary, [binary], {})
    except BaseException:  # noqa: BLE001 - never return into exec's code
        pass
    os._exit(127)
