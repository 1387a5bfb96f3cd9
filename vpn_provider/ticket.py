"""The ticket: everything a worker needs to join a gateway, written by the gateway as JSON (0600)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path

from .errors import TicketError

TICKET_VERSION = 1
_PIN = re.compile(r"^pin-sha256:[A-Za-z0-9+/]{43}=$")
_USER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int = 8443) -> "Endpoint":
        """Parse ``HOST[:PORT]`` or ``[V6]:PORT``."""
        text = text.strip()
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
        if not m:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port} in {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Ticket:
    """Validated on construction; ``repr`` hides the secret so it cannot leak into logs."""

    gateways: tuple[Endpoint, ...]
    pin: str
    user: str
    secret: str = dataclasses.field(repr=False)
    version: int = TICKET_VERSION
    #: TCP port of the gateway's relay on the same hosts as ``gateways``; 0: no relay.
    relay_port: int = 0

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ValueError("'gateways' is empty")
        if not _PIN.match(self.pin):
            raise ValueError("'pin' must look like pin-sha256:<44 base64 characters>")
        if not _USER.match(self.user):
            raise ValueError("'user' must be 1-64 characters of [A-Za-z0-9_.-]")
        if len(self.secret) < 16 or "\n" in self.secret:
            raise ValueError("'secret' must be a single line of at least 16 characters")
        if not 0 <= self.relay_port < 65536:
            raise ValueError(f"'relay_port' {self.relay_port} is not a port number")
        if self.version != TICKET_VERSION:
            raise ValueError(f"version {self.version} is not supported (expected {TICKET_VERSION})")

    def relay(self, gateway: Endpoint) -> Endpoint | None:
        """The relay beside ``gateway`` (one of ``gateways``), if the gateway runs one."""
        return Endpoint(gateway.host, self.relay_port) if self.relay_port else None

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "gateways": [str(g) for g in self.gateways],
                           "pin": self.pin, "user": self.user, "secret": self.secret,
                           "relay_port": self.relay_port}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> "Ticket":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TicketError(source, f"not valid JSON ({e.msg} at line {e.lineno})",
                              "copy the ticket.json the gateway wrote") from None
        if not isinstance(data, dict):
            raise TicketError(source, "expected a JSON object")
        missing = [k for k in ("gateways", "pin", "user", "secret") if k not in data]
        if missing:
            raise TicketError(source, f"missing field(s) {', '.join(missing)}")
        try:
            gateways = data["gateways"]
            if not isinstance(gateways, list) or not all(isinstance(g, str) for g in gateways):
                raise ValueError("'gateways' must be a list of \"HOST:PORT\" strings")
            for key in ("pin", "user", "secret"):
                if not isinstance(data[key], str):
                    raise ValueError(f"'{key}' must be a string")
            relay_port = data.get("relay_port", 0)
            if not isinstance(relay_port, int) or isinstance(relay_port, bool):
                raise ValueError("'relay_port' must be an integer")
            return cls(gateways=tuple(Endpoint.parse(g) for g in gateways), pin=data["pin"],
                       user=data["user"], secret=data["secret"],
                       version=int(data.get("version", TICKET_VERSION)), relay_port=relay_port)
        except (ValueError, TypeError) as e:
            raise TicketError(source, str(e)) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Ticket":
        """Read a ticket, refusing one that other users can read (like ssh does with keys).
        ``~`` and ``$VARS`` in the path are expanded: launchers pass it on unexpanded."""
        path = Path(os.path.expandvars(os.fspath(path))).expanduser()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TicketError(str(path), "no such file",
                              "run 'vpn-provider gateway start' and copy its ticket.json") from None
        except OSError as e:
            raise TicketError(str(path), e.strerror or str(e)) from None
        with os.fdopen(fd) as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise TicketError(str(path), f"readable by other users (mode {stat.S_IMODE(mode):04o})",
                                  f"run: chmod 600 {path}")
            try:
                text = f.read()
            except UnicodeDecodeError:
                raise TicketError(str(path), "not valid JSON (not UTF-8 text)") from None
            except OSError as e:  # a directory, for one
                raise TicketError(str(path), e.strerror or str(e)) from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically with mode 0600 from the start, so the secret is never world-readable."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
