"""Run the relay server (``vpn_provider.relay.server``) as a child of the gateway supervisor."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from .. import linux, proc
from ..errors import GatewayError
from ..relay.protocol import relay_key
from ..ticket import Endpoint


class RelayProcess:
    def __init__(self, listen: Endpoint, secret: str, log_path: Path, resolvers: tuple[str, ...] = (),
                 status_socket: Path | None = None):
        self.listen, self.log_path, self.resolvers = listen, log_path, resolvers
        self.status_socket = status_socket
        self._key = relay_key(secret)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Bound here, not in the child, so a busy port is a one-line error from `gateway start`.
        family = socket.AF_INET6 if ":" in self.listen.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen.host, self.listen.port))
            listener.listen(1024)
        except OSError as e:
            listener.close()
            raise GatewayError(f"cannot listen on {self.listen} (TCP relay): {e.strerror}",
                               "choose --relay-port PORT, or --no-relay") from None
        with listener, open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vpn_provider.relay.server", "--listen-fd", str(listener.fileno()),
                 *(f"--resolver={ip}" for ip in self.resolvers),
                 *([f"--status-socket={self.status_socket}"] if self.status_socket else [])],
                stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(listener.fileno(),),
                preexec_fn=linux.die_with_parent)
        # The key travels on a pipe, never in argv or the environment.
        self.process.stdin.write(self._key.hex().encode() + b"\n")
        self.process.stdin.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            proc.terminate(self.process.pid, grace=3)
            self.process.wait()
        self.process = None
