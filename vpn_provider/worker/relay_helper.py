"""``exec``'s handle on the node's relay helper (``vpn_provider.relay.node``).

The helper is forked while ``exec`` is still in the node's network namespace, then becomes a
bare interpreter (``python -I -S``): a fork of ``exec`` itself would carry its 30 MB of modules
for the whole life of the worker.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path

from .. import linux
from ..ticket import Endpoint

_CTL_FD = 3
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         f"from vpn_provider.relay.node import main; sys.exit(main({_CTL_FD}))")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class RelayHelper:
    def __init__(self, relay: Endpoint, key: bytes):
        self.relay = relay
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            parent_end.close()
            _become_helper(child_end)
        child_end.close()
        self._ctl = parent_end
        # The key travels on the socketpair: never in argv or in an environment.
        self._ctl.send(json.dumps({"host": relay.host, "port": relay.port, "key": key.hex()}).encode())

    def verdict(self, timeout: float) -> str:
        """'' when the relay is usable, else the reason (a time-out is a reason too)."""
        if not select.select([self._ctl], [], [], max(0.0, timeout))[0]:
            return f"relay {self.relay}: no answer within {timeout:g} s"
        msg = self._ctl.recv(4096)
        if msg == b"OK":
            return ""
        return msg[3:].decode(errors="replace") or f"relay {self.relay}: the helper exited"

    def hand_over(self, listener: socket.socket) -> None:
        """Give the helper the namespace's listening socket; from now on it serves alone.
        Raises OSError if the helper is gone."""
        try:
            socket.send_fds(self._ctl, [b"L"], [listener.fileno()])
        finally:
            listener.close()
            self._ctl.close()

    def abandon(self) -> None:
        """End the helper now: CMD must not inherit a child it does not know about."""
        self._ctl.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _become_helper(ctl: socket.socket) -> None:
    try:
        linux.die_with_parent()
        os.setpgid(0, 0)  # out of CMD's process group: see vpn_provider.relay.node
        os.chdir("/")  # hold no job directory busy
        devnull = os.open(os.devnull, os.O_RDWR)
        # Lift the control socket above fd 3 first: it may *be* fd 3, and dup2 onto itself
        # would leave close-on-exec set.
        lifted = fcntl.fcntl(ctl.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(devnull, 0)  # never hold CMD's stdin or stdout open
        os.dup2(devnull, 1)
        os.dup2(lifted, _CTL_FD)
        os.closerange(_CTL_FD + 1, 1 << 16)  # nor anything else exec inherited (a wrapper's pipes)
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", _BOOT, _PACKAGE_ROOT])
    except BaseException:  # noqa: BLE001 - never return into exec's code
        pass
    os._exit(127)
