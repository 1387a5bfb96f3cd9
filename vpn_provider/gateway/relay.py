"""Run the relay server (``vpn_provider.relay.server``) as a child of the gateway supervisor."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from .. import proc
from ..errors import GatewayError
from ..policy import Policy
from ..relay.protocol import relay_key
from ..ticket import Endpoint
from .credentials import open_file


class RelayProcess:
    def __init__(self, listen: Endpoint, log_path: Path, status_socket: Path | None = None):
        self.listen, self.log_path, self.status_socket = listen, log_path, status_socket
        self._listener: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def bind(self) -> None:
        """Bind the port here, first thing in start-up, so a busy port is a one-line error from
        `gateway start` at once, not after ocserv and the egress came up. It listens only once
        the relay runs (start): until then workers' connections are refused at once, where a
        listening port would leave them in its queue, unanswered, while the gateway comes up."""
        family = socket.AF_INET6 if ":" in self.listen.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen.host, self.listen.port))
        except OSError as e:
            listener.close()
            raise self._cannot_listen(e) from None
        self._listener = listener

    def _cannot_listen(self, e: OSError) -> GatewayError:
        return GatewayError(f"cannot listen on {self.listen} (TCP relay): {e.strerror}",
                            "choose --relay-port PORT, or --no-relay")

    def start(self, secret: str, resolvers: tuple[str, ...] = (), *, plain: bool = False,
              policy: Policy = Policy()) -> None:
        """Hand the bound port to the relay server process."""
        try:
            self._listener.listen(1024)
        except OSError as e:
            raise self._cannot_listen(e) from None
        log = open_file(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with self._listener as listener:
            try:
                self.process = proc.spawn(
                    [sys.executable, "-m", "vpn_provider.relay.server", "--listen-fd", str(listener.fileno()),
                     *(f"--resolver={ip}" for ip in resolvers),
                     *([f"--status-socket={self.status_socket}"] if self.status_socket else []),
                     *(["--plain"] if plain else []), *policy.cli_args(),
                     *(f"--own-port={port}" for port in policy.own_ports)],
                    output=log, stdin=subprocess.PIPE, pass_fds=(listener.fileno(),))
            finally:
                os.close(log)
        self._listener = None
        # The key travels on a pipe, never in argv or the environment.
        self.process.stdin.write(relay_key(secret).hex().encode() + b"\n")
        self.process.stdin.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self._listener:
            self._listener.close()
            self._listener = None
        if self.alive():
            proc.terminate(self.process.pid, grace=3)
            self.process.wait()
        self.process = None
