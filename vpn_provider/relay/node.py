"""The worker's end of the relay: a small process that stays in the node's network namespace.

``vpn-provider exec`` starts it (``RelayHelper``) before entering the worker's namespace, so its
sockets to the gateway are the node's own. It runs in a bare interpreter (``python -I -S``)
that imports only what it needs, so each worker pays about 10 MB for it, not 30. Its life:

  1. read the gateway's relay address and key from the control socket (never argv or env);
  2. check the relay (connect, prove the secret) while openconnect connects;
  3. report ``OK`` or ``NO reason`` to ``exec``;
  4. receive the listening socket ``exec`` created in the namespace;
  5. for every connection redirected there, open one to the gateway's relay and splice.

``exec`` kills it if it does not use the relay after all. Otherwise it has a parent-death
signal, so it ends with CMD, like openconnect. It sits in its own process group, so a Ctrl-C
meant for CMD cannot take it (and with it every TCP connection of the job) away.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time

from .protocol import DEST_CONNECT_TIMEOUT, HandshakeError, Status, Verb, client_handshake
from .pump import Flow, reset, tune

PROCESS_NAME = "vpnp-node-relay"
CONNECT_TIMEOUT = 10.0
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (a struct sockaddr_in)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


def open_flow(relay: tuple[str, int], key: bytes, verb: Verb, dest: tuple[str, int] = ("0.0.0.0", 0), *,
              timeout: float = CONNECT_TIMEOUT,
              answer_timeout: float = DEST_CONNECT_TIMEOUT + 5) -> tuple[Status, socket.socket]:
    """Connect to the relay and ask for ``dest``. The status comes once the gateway has reached
    the destination, which may take it DEST_CONNECT_TIMEOUT, hence the longer answer_timeout."""
    sock = socket.create_connection(relay, timeout=timeout)
    sock.settimeout(answer_timeout)
    try:
        status = client_handshake(sock, key, verb, dest)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return status, sock


def probe(relay: tuple[str, int], key: bytes, timeout: float = CONNECT_TIMEOUT) -> str:
    """'' if the relay answers and knows our secret, else why not."""
    where = f"relay {relay[0]}:{relay[1]}"
    try:
        status, sock = open_flow(relay, key, Verb.PING, timeout=timeout, answer_timeout=timeout)
        sock.close()
    except (OSError, HandshakeError) as e:
        return f"{where}: {e}"
    return "" if status is Status.OK else f"{where}: status {status.name}"


def _relay_one(app: socket.socket, relay: tuple[str, int], key: bytes) -> None:
    dest = ("?", 0)
    try:
        dest = original_destination(app)
        status, out = open_flow(relay, key, Verb.CONNECT, dest)
    except (OSError, HandshakeError) as e:
        print(f"vpn-provider relay: {dest[0]}:{dest[1]} via {relay[0]}:{relay[1]}: {e}", file=sys.stderr)
        reset(app)
        return
    if status is not Status.OK:
        out.close()
        reset(app)  # the application sees its connection reset, the nearest thing to "refused"
        return
    tune(app)
    tune(out)
    Flow(app, out).run()


def serve(listener: socket.socket, relay: tuple[str, int], key: bytes) -> None:
    while True:
        try:
            app, _ = listener.accept()
        except OSError:  # EMFILE and friends: breathe, go on
            time.sleep(0.05)
            continue
        try:
            threading.Thread(target=_relay_one, args=(app, relay, key), daemon=True).start()
        except RuntimeError:  # no thread to be had: refuse this connection, keep serving
            reset(app)


def main(ctl_fd: int) -> int:
    with open("/proc/self/comm", "w") as comm:
        comm.write(PROCESS_NAME)
    # Terminal signals are CMD's business (we left its process group); SIGTTOU would stop us
    # at the first warning written to a terminal CMD owns.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    ctl = socket.socket(fileno=ctl_fd)
    try:
        setup = json.loads(ctl.recv(4096))
        relay, key = (setup["host"], setup["port"]), bytes.fromhex(setup["key"])
        problem = probe(relay, key)
        ctl.send(b"NO " + problem.encode() if problem else b"OK")
        if problem:
            return 0
        _, fds, _, _ = socket.recv_fds(ctl, 16, 1)
    except (OSError, ValueError, KeyError):  # exec gave up on us (and will say why): just go
        return 0
    ctl.close()
    if not fds:
        return 0
    serve(socket.socket(fileno=fds[0]), relay, key)
    return 0
