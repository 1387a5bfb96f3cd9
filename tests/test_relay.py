"""The relay's handshake, its splice pump and the gateway side's refusals, over loopback TCP."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from vpn_provider.relay import pump, server
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
        assert result["request"] == (Verb.CONNECT, ("198.18.10.1", 1094), 0)
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


def test_a_flow_that_ended_cleanly_delivers_what_is_still_queued():
    """Both directions ended, the reader has not read yet: most of the stream still waits in
    the relay's send queue when the flow closes. That close must deliver it, then the end (the
    sockets reset on close for the rest of a flow's life)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = socket.socket()
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)  # a small window: the rest queues
        app.connect(listener.getsockname())
        relay_in, _ = listener.accept()
    relay_in.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    relay_out, far = _loopback_pair()
    flow = threading.Thread(target=Flow(relay_in, relay_out).run, daemon=True)
    flow.start()
    payload = os.urandom(256 << 10)
    app.shutdown(socket.SHUT_WR)
    far.sendall(payload)
    far.close()
    flow.join(10)
    assert not flow.is_alive()  # closed with the stream still queued for us
    app.settimeout(10)
    received = bytearray()
    while chunk := app.recv(1 << 16):
        received.extend(chunk)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_death_of_the_relay_process_resets_its_flows():
    """SIGTERM (`gateway stop`) or SIGKILL: the kernel closes the flow's sockets, and a stream
    without a length must not end cleanly there, so they reset on close for the flow's life."""
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    pid = os.fork()
    if pid == 0:  # the relay: nothing but the flow
        try:
            Flow(relay_in, relay_out).run()
        finally:
            os._exit(0)
    relay_in.close()
    relay_out.close()
    streaming = threading.Thread(target=_stream_until_broken, args=(far,), daemon=True)
    streaming.start()
    app.settimeout(10)
    got = 0
    while got < 1 << 20:
        got += len(app.recv(1 << 16))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with pytest.raises(ConnectionResetError):
        while app.recv(1 << 16):
            pass
    streaming.join(10)
    assert not streaming.is_alive()  # the far end got its reset too


def _stream_until_broken(sock: socket.socket) -> None:
    block = os.urandom(1 << 16)
    try:
        while True:
            sock.sendall(block)
    except OSError:
        pass


def test_a_reader_that_pauses_longer_than_the_user_timeout_keeps_its_flow(monkeypatch):
    """TCP_USER_TIMEOUT on the link also aborts a live peer whose window stays shut: the pump
    turns it off while the node's window is 0 (here with the time-outs shortened 15-fold)."""
    if not pump._USER_TIMEOUT:
        pytest.skip("this kernel does not report the peer's window: no user timeout is set")
    monkeypatch.setattr(pump, "_USER_TIMEOUT", 2000)
    monkeypatch.setattr(pump, "WATCH_INTERVAL", 0.25)
    monkeypatch.setattr(pump, "_watch", pump._Watch())  # one that sleeps the shorter interval
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    pump.tune(relay_in, link=True)
    threading.Thread(target=Flow(relay_in, relay_out, link=relay_in).run, daemon=True).start()
    payload = os.urandom(32 << 20)  # more than every buffer on the way holds
    sender = threading.Thread(target=lambda: (far.sendall(payload), far.close()), daemon=True)
    sender.start()
    time.sleep(6)  # the reader pauses; the window toward it shuts
    app.settimeout(10)
    received = bytearray()
    while chunk := app.recv(1 << 16):
        received.extend(chunk)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


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
        s.sendall(os.urandom(MAC) + b"C" + socket.inet_aton("198.18.10.1") + (80).to_bytes(2, "big") + bytes(4))
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


def test_a_version_1_client_is_still_served_as_worker_0():
    """Helpers of the previous release (a 7-byte request, no worker) keep working after the
    gateway is upgraded and restarted under them."""
    import hashlib
    import hmac
    import struct
    from vpn_provider.relay.protocol import MAC, NONCE
    a, b = socket.socketpair()
    result: dict = {}
    t = threading.Thread(target=_server_thread, args=(b, KEY, result))
    t.start()
    cn = os.urandom(NONCE)
    a.sendall(b"VPNP-RELAY/1\n" + cn)
    answer = a.recv(NONCE + MAC, socket.MSG_WAITALL)
    sn = answer[:NONCE]
    request = struct.pack("!c4sH", b"C", socket.inet_aton("198.18.10.1"), 80)
    a.sendall(hmac.new(KEY, b"C" + cn + sn + request, hashlib.sha256).digest() + request)
    assert a.recv(1) == bytes([Status.OK])
    t.join()
    assert result["request"] == (Verb.CONNECT, ("198.18.10.1", 80), 0)
    a.close()


def test_the_worker_table_keeps_a_workers_bytes_until_it_leaves():
    """A flow that ends adds its bytes to its worker, which stays listed (its helper may be
    between two PRESENT connections) until its PRESENT connection ends with no flow open."""
    from vpn_provider.relay.workers import WorkerTable
    table = WorkerTable()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    flow = Flow(b, c)
    table.add_flow("198.19.20.10", 42, flow)
    threading.Thread(target=flow.run, daemon=True).start()
    a.sendall(b"x" * 1000)
    a.shutdown(socket.SHUT_WR)
    assert d.recv(2000, socket.MSG_WAITALL) == b"x" * 1000
    d.sendall(b"y" * 10)
    d.shutdown(socket.SHUT_WR)
    assert a.recv(100, socket.MSG_WAITALL) == b"y" * 10
    for _ in range(100):
        if table.snapshot() and table.snapshot()[0]["flows"] == 0:
            break
        threading.Event().wait(0.02)
    assert table.snapshot() == [{"node": "198.19.20.10", "worker": "vpnp-42", "flows": 0,
                                 "bytes_up": 1000, "bytes_down": 10}]
    with table.present("198.19.20.10", 42):
        assert table.snapshot()[0]["bytes_up"] == 1000
    assert table.snapshot() == []
