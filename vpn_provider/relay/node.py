"""The worker's end of the relay: a small process that stays in the node's network namespace.

``vpn-provider exec`` starts it (``RelayHelper``) before entering the worker's namespace, so its
sockets to the gateway are the node's own. It runs in a bare interpreter (``python -I -S``)
that imports only what it needs, so each worker pays about 10 MB for it, not 30. Its life:

  1. read the gateway's relay address and key from the control socket (never argv or env);
  2. check the relay (connect, prove the secret) while openconnect connects;
  3. report ``OK`` or ``NO reason`` to ``exec``;
  4. receive the listening socket ``exec`` created in the namespace (or EOF: no relay);
  5. for every connection redirected there, open one to the gateway's relay and splice.

It has a parent-death signal, so it ends with CMD, like openconnect.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time

from .protocol import HandshakeError, Status, Verb, client_handshake
from .pump import Flow, reset, tune

PROCESS_NAME = "vpnp-node-relay"
CONNECT_TIMEOUT = 10.0
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (a struct sockaddr_in)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


def open_flow(relay: tuple[str, int], key: bytes, verb: Verb, dest: tuple[str, int] = ("0.0.0.0", 0)
              ) -> tuple[Status, socket.socket]:
    sock = socket.create_connection(relay, timeout=CONNECT_TIMEOUT)
    try:
        status = client_handshake(sock, key, verb, dest)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return status, sock


def probe(relay: tuple[str, int], key: bytes) -> str:
    """'' if the relay answers and knows our secret, else why not."""
    where = f"relay {relay[0]}:{relay[1]}"
    try:
        status, sock = open_flow(relay, key, Verb.PING)
        sock.close()
    except (OSError, HandshakeError) as e:
        return f"{where}: {e}"
    return "" if status is Status.OK else f"{where}: status {status.name}"


def _relay_one(app: socket.socket, relay: tuple[str, int], key: bytes) -> None:
    try:
        dest = original_destination(app)
        status, out = open_flow(relay, key, Verb.CONNECT, dest)
    except (OSError, HandshakeError) as e:
        print(f"vpn-provider relay: {e}", file=sys.stderr)
        reset(app)
        return
    if status is not Status.OK:
        out.close()
        reset(app)  # the application sees its connection reset, the nearest thing to "refused"
        return
    tune(app)
    Flow(app, out).run()


def serve(listener: socket.socket, relay: tuple[str, int], key: bytes) -> None:
    while True:
        try:
            app, _ = listener.accept()
        except OSError:  # EMFILE and friends: breathe, go on
            time.sleep(0.05)
            continue
        threading.Thread(target=_relay_one, args=(app, relay, key), daemon=True).start()


def main(ctl_fd: int) -> int:
    with open("/proc/self/comm", "w") as comm:
        comm.write(PROCESS_NAME)
    ctl = socket.socket(fileno=ctl_fd)
    setup = json.loads(ctl.recv(4096))
    relay, key = (setup["host"], setup["port"]), bytes.fromhex(setup["key"])
    problem = probe(relay, key)
    ctl.send(b"NO " + problem.encode() if problem else b"OK")
    if problem:
        return 0
    _, fds, _, _ = socket.recv_fds(ctl, 16, 1)
    ctl.close()
    if not fds:
        return 0  # exec decided against the relay
    serve(socket.socket(fileno=fds[0]), relay, key)
    return 0
