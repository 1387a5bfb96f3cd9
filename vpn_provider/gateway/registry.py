"""Several gateways, one ticket: gateways that share a credentials directory.

A site outgrows one login node by running a gateway on several (or on a data-transfer node).
They share one set of credentials, in a directory every one of them can read, typically on the
shared home filesystem (``gateway start --credentials DIR``):

    DIR/server.pem, server-key.pem, ca*.pem   one server key, so one certificate pin
    DIR/client-secret, ocpasswd               one client secret
    DIR/gateways.d/<name>.json                each gateway's advertised addresses, relay port and
                                              whether it offers the tunnel
    DIR/ticket.json                           names every registered gateway

Whoever starts first creates the credentials; the others adopt them. Every start registers the
gateway and rewrites the ticket with all of them, under an flock on DIR/gateways.lock. A stop
keeps the entry: a worker that finds a gateway down moves on to another at once, and a
restarted gateway is back in every ticket already handed out. Remove its file from gateways.d
to retire a gateway for good. One ticket offers workers the tunnel only if every gateway in it
does: a worker may land on any of them.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import NamedTuple

from ..errors import GatewayError
from ..ticket import Endpoint
from .credentials import check_file, open_file, read_file, write_file

_ENTRIES = "gateways.d"


@contextlib.contextmanager
def locked(cred_dir: Path):
    """Exclusive use of the credentials directory (creating credentials, rewriting the ticket)."""
    fd = open_file(cred_dir / "gateways.lock", os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # Lustre mounted with noflock, for one
            raise GatewayError(f"cannot lock {cred_dir / 'gateways.lock'}: {e.strerror}",
                               "put --credentials on a filesystem with file locks (home, NFS with locking)") from None
        yield
    finally:
        os.close(fd)


def entry_name(state_dir: Path) -> str:
    """One entry per gateway: its host and its state dir."""
    return f"{socket.gethostname()}-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]}"


def check(cred_dir: Path) -> None:
    """Refuse entries that are not ours (credentials.check_file), before anything is written."""
    entries = cred_dir / _ENTRIES
    for path in sorted(entries.glob("*.json")) if entries.is_dir() else ():
        check_file(path)


class Entry(NamedTuple):
    gateways: tuple[Endpoint, ...]
    tunnel: bool  # it offers the tunnel (entries written before the field: every gateway did)


def others(cred_dir: Path, name: str, relay_port: int) -> list[Entry]:
    """The other registered gateways; GatewayError if one uses another relay port (checked
    before start-up too, so a mismatch fails fast). Call with ``locked`` held."""
    entries = cred_dir / _ENTRIES
    found: list[Entry] = []
    for path in sorted(entries.glob("*.json")) if entries.is_dir() else ():
        if path.stem == name:
            continue
        try:
            data = json.loads(read_file(path))
            theirs = tuple(Endpoint.parse(g) for g in data["gateways"])
            their_relay = int(data["relay_port"])
            tunnel = data.get("tunnel", True)
            if not isinstance(tunnel, bool):
                raise ValueError("'tunnel' must be true or false")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GatewayError(f"unreadable gateway entry {path}: {e}", "remove it if that gateway is gone") from None
        if their_relay != relay_port:
            # One ticket has one relay port: every gateway in it must use the same.
            raise GatewayError(f"the gateway in {path} uses relay port {their_relay or 'none'}, this one "
                               f"{relay_port or 'none'}", "give every gateway sharing credentials the same "
                               "--relay-port (and all or none --no-relay)")
        found.append(Entry(theirs, tunnel))
    return found


def register(cred_dir: Path, name: str, endpoints: tuple[Endpoint, ...], relay_port: int,
             *, tunnel: bool = True) -> Entry:
    """Record this gateway (``tunnel``: it offers the tunnel); return every registered
    gateway's addresses, this one's first, and whether all of them offer the tunnel, which is
    what their one ticket can promise. Call with ``locked(cred_dir)`` held."""
    entries = cred_dir / _ENTRIES
    entries.mkdir(mode=0o700, exist_ok=True)
    theirs = others(cred_dir, name, relay_port)
    tmp = entries / f".{name}.{os.getpid()}.tmp"
    entry = {"gateways": [str(e) for e in endpoints], "relay_port": relay_port, "tunnel": tunnel}
    write_file(tmp, (json.dumps(entry) + "\n").encode())
    os.replace(tmp, entries / f"{name}.json")
    return Entry(tuple(dict.fromkeys((*endpoints, *(e for other in theirs for e in other.gateways)))),
                 tunnel and all(other.tunnel for other in theirs))
