"""A Python client of the relay, for ``check``: connect, run the handshake, read the status.

The client that carries workers' flows is the native helper (``native/node_helper.c``, started
by ``vpn_provider.worker.node_helper``); this one only asks the relay whether it answers.
"""
from __future__ import annotations

import socket
from typing import NamedTuple

from .protocol import DEST_CONNECT_TIMEOUT, HandshakeError, Mode, Session, Status, Verb, client_handshake
from .records import RecordError, recv_record

CONNECT_TIMEOUT = 10.0


def open_flow(relay: tuple[str, int], key: bytes, verb: Verb, dest: tuple[str, int] = ("::", 0), *,
              timeout: float = CONNECT_TIMEOUT,
              answer_timeout: float = DEST_CONNECT_TIMEOUT + 5) -> tuple[Status, Session, socket.socket]:
    """Connect to the relay and ask for ``dest``. The status comes once the gateway has reached
    the destination, which may take it DEST_CONNECT_TIMEOUT, hence the longer answer_timeout."""
    sock = socket.create_connection(relay, timeout=timeout)
    sock.settimeout(answer_timeout)
    try:
        status, session = client_handshake(sock, key, verb, dest)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return status, session, sock


class Probe(NamedTuple):
    problem: str  # '' if the relay answers and knows our secret
    mode: Mode | None = None
    policy: str = ""  # where the gateway lets workers go, as it describes it


def probe(relay: tuple[str, int], key: bytes, timeout: float = CONNECT_TIMEOUT) -> Probe:
    where = f"relay {relay[0]}:{relay[1]}"
    try:
        status, session, sock = open_flow(relay, key, Verb.PING, timeout=timeout, answer_timeout=timeout)
        with sock:
            if status is not Status.OK:
                return Probe(f"{where}: status {status.name}")
            sock.settimeout(timeout)
            try:
                policy = recv_record(sock, session.opener).decode(errors="replace")
            except (OSError, RecordError):  # an older gateway says nothing more
                policy = ""
    except (OSError, HandshakeError) as e:
        return Probe(f"{where}: {e}")
    return Probe("", session.mode, policy)
