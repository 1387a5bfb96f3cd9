"""An egress backend connects the gateway's namespace to the host network, both ways:
outbound traffic of VPN clients leaves through it, and the listen port (TCP and UDP) is
forwarded in from the host."""
from __future__ import annotations

import abc
import logging
import os
import subprocess
from pathlib import Path

from .. import proc
from ..errors import GatewayError
from ..gateway.credentials import open_file, read_file
from ..ticket import Endpoint

log = logging.getLogger(__name__)


Forward = tuple[str, Endpoint]  # ("tcp" | "udp", address and port on the host)


def listen_forwards(listen: Endpoint, host_addresses: list[str]) -> list[Forward]:
    """TCP on ``listen`` as given; UDP on each host address when ``listen`` is a wildcard.

    A UDP socket bound to 0.0.0.0 answers from whatever address the route back picks, and a
    client that sent to another address of a multi-homed login node drops that answer: DTLS
    would fail. One UDP socket per address answers from the address the client used.
    """
    if listen.host not in ("0.0.0.0", ""):
        return [("tcp", listen), ("udp", listen)]
    return [("tcp", listen), *(("udp", Endpoint(h, listen.port)) for h in host_addresses)]


class Egress(abc.ABC):
    name: str = ""
    #: An address inside the namespace that resolves DNS with the host's resolvers.
    dns_forwarder: str | None = None
    #: True if the backend only carries traffic from the namespace's own address, so client
    #: traffic must be masqueraded; False if proxy ARP is enough (no iptables needed).
    needs_nat: bool = False
    #: With IPv6 on, the address the namespace puts on its egress link and its router there,
    #: or None where the backend configures IPv6 itself.
    ipv6_address: str | None = None
    ipv6_router: str | None = None

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    @abc.abstractmethod
    def is_supported(cls) -> tuple[bool, str]:
        """(usable, reason when not)."""

    @abc.abstractmethod
    def start(self, *, target_pid: int, forwards: list[Forward], ipv6: bool = False) -> list[str]:
        """Attach to ``target_pid``'s namespaces and forward each (protocol, host endpoint) to the
        same port inside; carry IPv6 too if ``ipv6``. Return the ``ADDR/PREFIX``es the namespace
        must add to its egress link for those forwards (often none)."""

    def _spawn(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        """The backend, logging to its own file; it ends with the gateway (proc.spawn)."""
        logfile = open_file(self.run_dir / f"{self.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            return proc.spawn(argv, output=logfile, pass_fds=pass_fds)
        finally:
            os.close(logfile)

    def log_tail(self) -> str:
        try:
            lines = read_file(self.run_dir / f"{self.name}.log").decode(errors="replace").strip().splitlines()
        except (OSError, GatewayError):
            return ""
        return lines[-1] if lines else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            proc.terminate(self.process.pid, grace=3)
            self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
