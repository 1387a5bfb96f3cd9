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
#: The gateway writes well under 1 KiB; the cap keeps a mistaken path (a log, an image) cheap.
MAX_TICKET_BYTES = 64 * 1024
#: Gateway addresses a worker takes: the node helper's limit (MAX_GATEWAYS in native/tunnel_keeper.c,
#: MAX_RELAYS in native/node_helper.c).
MAX_GATEWAYS = 64
_PIN = re.compile(r"pin-sha256:[A-Za-z0-9+/]{43}=")
_USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A host name or IPv4 address, or an IPv6 address in brackets: nothing that could smuggle a
# separator (NUL, newline, space) into the helper's messages or openconnect's URL.
_ENDPOINT = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([A-Za-z0-9_.-]+)(?::([0-9]{1,5}))?")
_COPY_IT = "copy the ticket.json the gateway wrote"
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _brief(value: object, limit: int = 40) -> str:
    """``repr`` short enough for a one-line error, whatever a damaged ticket holds."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int = 8443) -> "Endpoint":
        """Parse ``HOST[:PORT]`` or ``[V6]:PORT``."""
        text = text.strip()
        m = _ENDPOINT.fullmatch(text)
        if not m:
            raise ValueError(f"bad address {_brief(text)}: expected HOST:PORT")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port} in {_brief(text)}")
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
    #: Whether the gateway offers the full-IP tunnel (False: it runs the relay alone, and
    #: ``gateways`` name the hosts its relay listens on).
    tunnel: bool = True

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ValueError("'gateways' is empty")
        if len(self.gateways) > MAX_GATEWAYS:
            raise ValueError(f"'gateways' has {len(self.gateways)} entries, a worker takes at most {MAX_GATEWAYS}; "
                             "advertise fewer addresses (gateway --advertise)")
        if not _PIN.fullmatch(self.pin):
            raise ValueError("'pin' must look like pin-sha256:<44 base64 characters>")
        if not _USER.fullmatch(self.user):
            raise ValueError("'user' must be 1-64 characters of [A-Za-z0-9_.-]")
        # Printable: the secret travels NUL-separated to the keeper and as a line to openconnect.
        if len(self.secret) < 16 or not self.secret.isprintable():
            raise ValueError("'secret' must be a single line of at least 16 printable characters")
        if not 0 <= self.relay_port < 65536:
            raise ValueError(f"'relay_port' {_brief(self.relay_port)} is not a port number")
        if not self.tunnel and not self.relay_port:
            raise ValueError("the gateway offers neither a tunnel nor a relay")
        if self.version != TICKET_VERSION:
            raise ValueError(f"version {_brief(self.version)} is not supported (expected {TICKET_VERSION})")

    def relay(self, gateway: Endpoint) -> Endpoint | None:
        """The relay beside ``gateway`` (one of ``gateways``), if the gateway runs one."""
        return Endpoint(gateway.host, self.relay_port) if self.relay_port else None

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "gateways": [str(g) for g in self.gateways],
                           "pin": self.pin, "user": self.user, "secret": self.secret,
                           "relay_port": self.relay_port, "tunnel": self.tunnel}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> "Ticket":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TicketError(source, f"not valid JSON ({e.msg} at line {e.lineno})", _COPY_IT) from None
        except RecursionError:
            raise TicketError(source, "not valid JSON (nested too deeply)", _COPY_IT) from None
        except ValueError:  # an integer of thousands of digits (int_max_str_digits)
            raise TicketError(source, "not valid JSON (a number too long)", _COPY_IT) from None
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
            # JSON numbers may arrive as floats (1e400 is inf): only true integers are accepted.
            for key in ("relay_port", "version"):
                if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool)):
                    raise ValueError(f"'{key}' must be an integer")
            if not isinstance(data.get("tunnel", True), bool):
                raise ValueError("'tunnel' must be true or false")
            return cls(gateways=tuple(Endpoint.parse(g) for g in gateways), pin=data["pin"],
                       user=data["user"], secret=data["secret"],
                       version=data.get("version", TICKET_VERSION), relay_port=data.get("relay_port", 0),
                       tunnel=data.get("tunnel", True))
        except (ValueError, TypeError) as e:
            raise TicketError(source, str(e)) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Ticket":
        """Read a ticket, refusing one that other users can read (like ssh does with keys).
        ``~`` and ``$VARS`` in the path are expanded: launchers pass it on unexpanded."""
        path = Path(os.path.expandvars(os.fspath(path))).expanduser()
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (symlinks are fine: followed).
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise TicketError(str(path), "no such file",
                              "run 'vpn-provider gateway start' and copy its ticket.json") from None
        except OSError as e:
            raise TicketError(str(path), e.strerror or str(e)) from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # a FIFO, /dev/zero or a directory: never read those
                kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
                raise TicketError(str(path), f"not a regular file ({kind})", _COPY_IT)
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise TicketError(str(path), f"readable by other users (mode {stat.S_IMODE(mode):04o})",
                                  f"run: chmod 600 {path}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_TICKET_BYTES + 1)
        except OSError as e:
            raise TicketError(str(path), e.strerror or str(e)) from None
        finally:
            os.close(fd)
        if len(data) > MAX_TICKET_BYTES:
            raise TicketError(str(path), f"larger than {MAX_TICKET_BYTES // 1024} KiB, so not a ticket", _COPY_IT)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise TicketError(str(path), "not valid JSON (not UTF-8 text)", _COPY_IT) from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically with mode 0600 from the start, so the secret is never world-readable."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
