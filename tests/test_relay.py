"""The relay's handshake, its splice pump and the gateway side's refusals, over loopback TCP."""
from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from vpn_provider.relay import server
from vpn_provider.relay.protocol import (HandshakeError, Status, Verb, client_handshake, relay_key,
                                         server_handshake)
from vpn_provider.relay.pump import Flow

KEY = relay_key("s" * 32)


def _server_thread(sock, key, result):
    try:
        result["request"] = server_handshake(sock, key)
        sock.sendall(bytes([Status.OK]))
    except HandshakeError as e:
        result["error"] = str(e)
        sock.close()


@pytest.mark.parametrize("client_key,ok", [(KEY, True), (relay_key("t" * 32), False)])
def test_handshake_needs_the_same_secret_on_both_sides(client_key, ok):
    a, b = socket.socketpair()
    result: dict = {}
    t = threading.Thread(target=_server_thread, args=(b, KEY, result))
    t.start()
    if ok:
        assert client_handshake(a, client_key, Verb.CONNECT, ("198.18.10.1", 1094)) is Status.OK
        t.join()
        assert result["request"] == (Verb.CONNECT, ("198.18.10.1", 1094))
    else:
        with pytest.raises(HandshakeError, match="does not know this ticket's secret"):
            client_handshake(a, client_key, Verb.CONNECT, ("198.18.10.1", 1094))
        a.close()  # the server then waits in vain for the proof and sees the end of stream
        t.join()
        assert "closed" in result["error"]


def test_a_recorded_client_proof_does_not_work_twice():
    """The proof covers the server's fresh nonce, so replaying a captured handshake fails."""
    recorded = bytearray()

    class Recorder:
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, data):
            recorded.extend(data)
            self.sock.sendall(data)

        def recv(self, n):
            return self.sock.recv(n)

    a, b = socket.socketpair()
    result: dict = {}
    t = threading.Thread(target=_server_thread, args=(b, KEY, result))
    t.start()
    assert client_handshake(Recorder(a), KEY, Verb.CONNECT, ("198.18.10.1", 80)) is Status.OK
    t.join()
    replay, victim = socket.socketpair()
    result = {}
    t = threading.Thread(target=_server_thread, args=(victim, KEY, result))
    t.start()
    replay.sendall(bytes(recorded))
    t.join()
    assert result.get("error") == "wrong secret"


def test_server_rejects_a_client_that_is_not_a_relay_client():
    a, b = socket.socketpair()
    a.sendall(b"GET / HTTP/1.1\r\nHost: relay.example\r\n\r\n")
    with pytest.raises(HandshakeError, match="not a relay client"):
        server_handshake(b, KEY)


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


def test_flow_moves_bytes_both_ways_and_passes_half_close():
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    threading.Thread(target=Flow(relay_in, relay_out).run, daemon=True).start()
    payload = os.urandom(8 << 20)
    received = bytearray()

    def read_far():
        while chunk := far.recv(1 << 16):
            received.extend(chunk)
        far.sendall(b"reply after EOF")  # the other direction still works after a half-close
        far.close()
    reader = threading.Thread(target=read_far)
    reader.start()
    app.sendall(payload)
    app.shutdown(socket.SHUT_WR)
    back = b""
    while chunk := app.recv(1 << 16):
        back += chunk
    reader.join()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert back == b"reply after EOF"


@pytest.fixture
def relay_server():
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=server.serve, args=(listener, KEY), daemon=True).start()
    yield listener.getsockname()
    listener.close()


def _ask(address, verb, dest, key=KEY):
    with socket.create_connection(address, timeout=5) as s:
        return client_handshake(s, key, verb, dest)


def test_relay_server_answers_ping_and_refuses_loopback_destinations(relay_server):
    """Workers must not reach services bound to the login node's 127.0.0.1 through the relay."""
    assert _ask(relay_server, Verb.PING, ("0.0.0.0", 0)) is Status.OK
    assert _ask(relay_server, Verb.CONNECT, ("127.0.0.1", relay_server[1])) is Status.FORBIDDEN
    assert _ask(relay_server, Verb.CONNECT, ("224.0.0.1", 80)) is Status.FORBIDDEN


def test_relay_server_resets_a_client_with_the_wrong_secret(relay_server):
    with pytest.raises(HandshakeError):
        _ask(relay_server, Verb.PING, ("0.0.0.0", 0), key=relay_key("x" * 32))


def test_a_reset_on_one_side_reaches_the_other_side_as_a_reset():
    """A destination that aborts mid-transfer must not look like a complete download."""
    import struct
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    threading.Thread(target=Flow(relay_in, relay_out).run, daemon=True).start()
    far.sendall(b"partial")
    assert app.recv(7) == b"partial"
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.close()  # RST
    app.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while app.recv(1 << 16):
            pass


def test_relay_server_rejects_a_client_proof_made_without_the_secret(relay_server):
    """The server half of the proof: a client that cannot sign the request gets no status."""
    from vpn_provider.relay.protocol import MAC, MAGIC, NONCE
    with socket.create_connection(relay_server, timeout=5) as s:
        s.sendall(MAGIC + os.urandom(NONCE))
        assert len(s.recv(NONCE + MAC, socket.MSG_WAITALL)) == NONCE + MAC
        s.sendall(os.urandom(MAC) + b"C" + socket.inet_aton("198.18.10.1") + (80).to_bytes(2, "big"))
        try:
            answer = s.recv(1)
        except ConnectionResetError:
            answer = b""
        assert answer == b""


def test_relay_server_drops_a_client_that_drips_its_handshake(relay_server, monkeypatch):
    """A whole handshake has one deadline, so a client cannot hold a slot by sending slowly."""
    import time
    from vpn_provider.relay import protocol
    monkeypatch.setattr(protocol, "HANDSHAKE_DEADLINE", 0.5)
    with socket.create_connection(relay_server, timeout=5) as s:
        t0 = time.monotonic()
        try:
            for byte in protocol.MAGIC:
                s.sendall(bytes([byte]))
                time.sleep(0.1)
            answer = s.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        assert answer == b"" and time.monotonic() - t0 < 3
