"""The worker's end of the relay: a helper process that stays in the node's network namespace.

``vpn-provider exec`` forks it before it enters the worker's namespace, so its sockets to the
gateway are the node's own. Life of the helper:

  1. check the gateway's relay (connect, prove the secret) while openconnect connects;
  2. report the verdict to ``exec`` over a socketpair (``OK`` or ``NO reason``);
  3. receive the listening socket that ``exec`` created inside the namespace (or EOF: no relay);
  4. for every connection redirected there, open one to the gateway's relay and splice.

It gets a parent-death signal, so it ends with CMD, like openconnect.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from typing import NoReturn

from .. import linux
from ..ticket import Endpoint
from ..worker.redirect import original_destination
from .protocol import HandshakeError, Status, Verb, client_handshake
from .pump import Flow, reset, tune

log = logging.getLogger(__name__)
PROCESS_NAME = "vpnp-node-relay"
CONNECT_TIMEOUT = 10.0


def open_flow(gateway: Endpoint, key: bytes, verb: Verb, dest: tuple[str, int] = ("0.0.0.0", 0)
              ) -> tuple[Status, socket.socket]:
    sock = socket.create_connection((gateway.host, gateway.port), timeout=CONNECT_TIMEOUT)
    try:
        status = client_handshake(sock, key, verb, dest)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return status, sock


def probe(gateway: Endpoint, key: bytes) -> str:
    """'' if the relay answers and knows our secret, else why not."""
    try:
        status, sock = open_flow(gateway, key, Verb.PING)
        sock.close()
    except (OSError, HandshakeError) as e:
        return f"relay {gateway}: {e}"
    return "" if status is Status.OK else f"relay {gateway}: status {status.name}"


def _relay_one(app: socket.socket, gateway: Endpoint, key: bytes) -> None:
    try:
        dest = original_destination(app)
        status, out = open_flow(gateway, key, Verb.CONNECT, dest)
    except (OSError, HandshakeError) as e:
        log.warning("relay: %s", e)
        reset(app)
        return
    if status is not Status.OK:
        out.close()
        reset(app)  # the application sees its connection reset, the nearest thing to "refused"
        return
    tune(app)
    tune(out)
    Flow(app, out).run()


def _serve(listener: socket.socket, gateway: Endpoint, key: bytes) -> NoReturn:
    while True:
        try:
            app, _ = listener.accept()
        except OSError:
            time.sleep(0.05)
            continue
        threading.Thread(target=_relay_one, args=(app, gateway, key), daemon=True).start()


def _helper_main(ctl: socket.socket, gateway: Endpoint, key: bytes) -> NoReturn:
    linux.die_with_parent()
    linux.set_process_name(PROCESS_NAME)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # never hold CMD's stdin or stdout open
        os.dup2(devnull, fd)
    os.close(devnull)
    # Nor anything else exec inherited (a wrapper's pipes): keep stderr and our control socket.
    os.closerange(3, ctl.fileno())
    os.closerange(ctl.fileno() + 1, 65536)
    problem = probe(gateway, key)
    ctl.send(b"NO " + problem.encode() if problem else b"OK")
    if problem:
        os._exit(0)
    _, fds, _, _ = socket.recv_fds(ctl, 16, 1)
    if not fds:
        os._exit(0)  # exec decided against the relay
    ctl.close()
    _serve(socket.socket(fileno=fds[0]), gateway, key)


class RelayHelper:
    """``exec``'s handle on the helper process."""

    def __init__(self, gateway: Endpoint, key: bytes):
        self.gateway = gateway
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                parent_end.close()
                _helper_main(child_end, gateway, key)
            finally:
                os._exit(1)
        child_end.close()
        self._ctl = parent_end

    def verdict(self, timeout: float) -> str:
        """'' when the relay is usable, else the reason (a time-out is a reason too)."""
        if not select.select([self._ctl], [], [], max(0.0, timeout))[0]:
            return f"relay {self.gateway}: no answer within {timeout:g} s"
        msg = self._ctl.recv(4096)
        if msg == b"OK":
            return ""
        return msg[3:].decode(errors="replace") or "relay helper exited"

    def hand_over(self, listener: socket.socket) -> None:
        socket.send_fds(self._ctl, [b"L"], [listener.fileno()])
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
