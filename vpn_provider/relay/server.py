"""The gateway's end of the relay: runs as the user on the login node, in its own network.

    python -m vpn_provider.relay.server --listen-fd N     (the key arrives as hex on stdin)

For each authenticated client it connects to the requested destination and splices the two
sockets. It refuses the login node's loopback, as slirp4netns' --disable-host-loopback does for
the tunnel: workers must not reach services bound to 127.0.0.1 on the login node.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys
import threading

from .. import linux
from .protocol import HandshakeError, Status, Verb, server_handshake
from .pump import Flow, reset, tune

log = logging.getLogger("vpn_provider.relay")
PROCESS_NAME = "vpnp-gw-relay"
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
_ERRNO_STATUS = {errno.ECONNREFUSED: Status.REFUSED, errno.ENETUNREACH: Status.UNREACHABLE,
                 errno.EHOSTUNREACH: Status.UNREACHABLE, errno.ETIMEDOUT: Status.TIMED_OUT}


def forbidden(host: str) -> bool:
    ip = ipaddress.IPv4Address(host)
    return ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255")


def open_destination(dest: tuple[str, int]) -> tuple[Status, socket.socket | None]:
    if forbidden(dest[0]):
        return Status.FORBIDDEN, None
    try:
        out = socket.create_connection(dest, timeout=CONNECT_TIMEOUT)
    except socket.timeout:
        return Status.TIMED_OUT, None
    except OSError as e:
        return _ERRNO_STATUS.get(e.errno, Status.UNREACHABLE), None
    out.settimeout(None)
    tune(out)
    return Status.OK, out


def handle(client: socket.socket, key: bytes) -> None:
    try:
        client.settimeout(HANDSHAKE_TIMEOUT)
        verb, dest = server_handshake(client, key)
        status, out = (Status.OK, None) if verb is Verb.PING else open_destination(dest)
        client.sendall(bytes([status]))
        client.settimeout(None)
    except (HandshakeError, OSError) as e:
        log.warning("relay: refused a client: %s", e)
        reset(client)
        return
    if out is None:
        client.close()
        return
    tune(client)
    Flow(client, out).run()


def serve(listener: socket.socket, key: bytes) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except InterruptedError:
            continue
        except OSError as e:  # EMFILE and friends: log, breathe, go on
            log.error("relay: accept failed: %s", e)
            threading.Event().wait(0.1)
            continue
        threading.Thread(target=handle, args=(client, key), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vpn_provider.relay.server")
    ap.add_argument("--listen-fd", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    linux.set_process_name(PROCESS_NAME)
    key = bytes.fromhex(sys.stdin.readline().strip())
    sys.stdin.close()
    listener = socket.socket(fileno=args.listen_fd)
    try:
        serve(listener, key)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
