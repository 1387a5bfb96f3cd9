"""``Gateway``: start, stop and query a gateway that runs detached (``gateway start|stop|status``)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from .. import proc
from ..errors import GatewayError
from ..ticket import Ticket
from . import status
from .config import GatewayConfig
from .credentials import open_file
from .supervisor import prepare_dirs, read_pid


class Gateway:
    """A detached gateway. As a context manager it starts on entry and stops on exit::

        with Gateway(GatewayConfig(state_dir=Path("~/.vpn").expanduser())) as gw:
            ticket = gw.ticket
    """

    def __init__(self, config: GatewayConfig, *, start_timeout: float = 30.0):
        self.config = dataclasses.replace(
            config, state_dir=config.state_dir.expanduser().resolve(),
            credentials_dir=config.credentials_dir.expanduser().resolve() if config.credentials_dir else None)
        self.start_timeout = start_timeout

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def ticket_path(self) -> Path:
        return self.config.ticket_path

    @property
    def ticket(self) -> Ticket:
        return Ticket.load(self.ticket_path)

    @property
    def pid(self) -> int:
        return read_pid(self.state_dir)

    def start(self) -> dict:
        """Return only once the gateway accepts connections; raise GatewayError otherwise."""
        prepare_dirs(self.config)  # a state dir another user could plant files in gets not even a log
        log = open_file(self.state_dir / "gateway.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        ready_r, ready_w = os.pipe()
        try:
            # Detached, so in "/": -m puts the cwd on sys.path, and a checkout there would win.
            child = proc.spawn([sys.executable, "-m", "vpn_provider", "gateway", "run", *self.config.cli_args(),
                                "--ready-fd", str(ready_w)], output=log, pass_fds=(ready_w,), detached=True)
        finally:
            os.close(log)
            os.close(ready_w)
        try:
            line = (proc.read_message(ready_r, self.start_timeout) or b"").decode(errors="replace").strip()
        finally:
            os.close(ready_r)
        if line.startswith("READY "):
            return json.loads(line[6:])
        if child.poll() is None:
            proc.terminate(child.pid, grace=5, group=True)
        child.wait()
        if line.startswith("ERROR "):
            raise GatewayError(line[6:].removeprefix("gateway: "))
        raise GatewayError(f"did not come up within {self.start_timeout:g} s",
                           f"see {self.state_dir / 'gateway.log'}")

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the gateway and every process it started. Returns False if none was running."""
        pid = self.pid
        if not pid:
            return False
        # The supervisor leads its own session; it stops ocserv (its own session) and the egress.
        proc.terminate(pid, grace=timeout, group=True)
        (self.state_dir / "gateway.pid").unlink(missing_ok=True)
        return True

    def workers(self) -> list[status.WorkerStatus]:
        """Every worker connected now, through the tunnel, the relay or both (see status.py)."""
        return self.status()[0]

    def status(self) -> tuple[list[status.WorkerStatus], dict]:
        """The workers, and the relay's encryption and destination policy, and the policy's
        refusals per reason at the relay and in the tunnel (status.snapshot)."""
        if not self.pid:
            raise GatewayError(f"no gateway runs with state dir {self.state_dir}")
        return status.snapshot(self.config)

    def __enter__(self) -> "Gateway":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
