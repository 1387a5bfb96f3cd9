"""The relay's handshake, its splice pump and the gateway side's refusals, over loopback TCP."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from vpn_provider.relay import native_pump, protocol, pump, records, server
from vpn_provider.relay.protocol import (HandshakeError, Mode, Status, Verb, client_handshake, relay_key,
                                         server_handshake)
from vpn_provider.relay.records import recv_record
from vpn_provider.relay.pump import Flow

KEY = relay_key("s" * 32)


def _server_thread(sock, key, result):
    try:
        result["request"], handshake = server_handshake(sock, key)
        sock.sendall(handshake.status(Status.OK))
    except (HandshakeError, OSError) as e:
        result["error"] = str(e)
        sock.close()


@pytest.mark.parametrize("client_key,ok", [(KEY, True), (relay_key("t" * 32), False)])
def test_handshake_needs_the_same_secret_on_both_sides(client_key, ok):
    a, b = socket.socketpair()
    result: dict = {}
    t = threading.Thread(target=_server_thread, args=(b, KEY, result))
    t.start()
    if ok:
        status, session = client_handshake(a, client_key, Verb.CONNECT, ("198.18.10.1", 1094), worker=7)
        assert status is Status.OK and session.mode is Mode.SEALED
        t.join()
        assert result["request"] == (Verb.CONNECT, ("198.18.10.1", 1094), 7)
    else:
        with pytest.raises(HandshakeError, match="does not know this ticket's secret"):
            client_handshake(a, client_key, Verb.CONNECT, ("198.18.10.1", 1094))
        a.close()  # the server then waits in vain for the proof and sees the end of stream
        t.join()
        assert "closed" in result["error"]


def test_the_request_carries_ipv6_destinations():
    a, b = socket.socketpair()
    result: dict = {}
    t = threading.Thread(target=_server_thread, args=(b, KEY, result))
    t.start()
    assert client_handshake(a, KEY, Verb.CONNECT, ("2001:db8::7", 1094))[0] is Status.OK
    t.join()
    assert result["request"] == (Verb.CONNECT, ("2001:db8::7", 1094), 0)


def test_a_recorded_client_proof_does_not_work_twice():
    """The proof covers the server's fresh key share, so replaying a captured handshake fails."""
    recorded = bytearray()

    class Recorder:
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, data):
            recorded.extend(data)
            self.sock.sendall(data)

        def settimeout(self, t):
            self.sock.settimeout(t)

        def recv(self, n):
            return self.sock.recv(n)

        def recv_into(self, buf, n=0):
            return self.sock.recv_into(buf, n)

    a, b = socket.socketpair()
    result: dict = {}
    t = threading.Thread(target=_server_thread, args=(b, KEY, result))
    t.start()
    assert client_handshake(Recorder(a), KEY, Verb.CONNECT, ("198.18.10.1", 80))[0] is Status.OK
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
    with pytest.raises(HandshakeError, match="not a vpn-provider relay"):
        server_handshake(b, KEY)


def test_client_and_server_of_different_versions_name_the_mismatch():
    """Each side answers another version's hello with its own magic, so both can say which."""
    a, b = socket.socketpair()
    a.sendall(b"VPNP-RELAY/2\n" + os.urandom(16))
    with pytest.raises(HandshakeError, match="client speaks relay protocol 2, this side 3"):
        server_handshake(b, KEY)
    assert a.recv(64) == protocol.MAGIC
    c, d = socket.socketpair()
    d.sendall(b"VPNP-RELAY/4\n")
    with pytest.raises(HandshakeError, match="gateway speaks relay protocol 4, this side 3: run the same"):
        client_handshake(c, KEY, Verb.PING)


@pytest.fixture(params=[True, False], ids=["C-pump", "Python-pump"])
def native(request) -> bool:
    """Both pumps of the gateway's flows: in C (native_pump.py) and the Python fallback."""
    if request.param and not native_pump.available():
        pytest.skip(f"{native_pump.LIBRARY} was not built (setup.py build_ext)")
    return request.param


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


def test_flow_moves_bytes_both_ways_and_passes_half_close(native):
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    threading.Thread(target=Flow(relay_in, relay_out, native=native).run, daemon=True).start()
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


def test_a_flow_that_ended_cleanly_delivers_what_is_still_queued(native):
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
    flow = threading.Thread(target=Flow(relay_in, relay_out, native=native).run, daemon=True)
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


def test_death_of_the_relay_process_resets_its_flows(native):
    """SIGTERM (`gateway stop`) or SIGKILL: the kernel closes the flow's sockets, and a stream
    without a length must not end cleanly there, so they reset on close for the flow's life."""
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    pid = os.fork()
    if pid == 0:  # the relay: nothing but the flow
        try:
            Flow(relay_in, relay_out, native=native).run()
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
    threading.Thread(target=Flow(relay_in, relay_out, link=relay_in, native=False).run, daemon=True).start()
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
        return client_handshake(s, key, verb, dest)[0]


def test_relay_server_answers_ping_and_refuses_loopback_destinations(relay_server):
    """Workers must not reach services bound to the login node's 127.0.0.1 through the relay."""
    assert _ask(relay_server, Verb.PING, ("0.0.0.0", 0)) is Status.OK
    assert _ask(relay_server, Verb.CONNECT, ("127.0.0.1", relay_server[1])) is Status.FORBIDDEN
    assert _ask(relay_server, Verb.CONNECT, ("224.0.0.1", 80)) is Status.FORBIDDEN


def test_relay_server_resets_a_client_with_the_wrong_secret(relay_server):
    with pytest.raises(HandshakeError):
        _ask(relay_server, Verb.PING, ("0.0.0.0", 0), key=relay_key("x" * 32))


def test_a_reset_on_one_side_reaches_the_other_side_as_a_reset(native):
    """A destination that aborts mid-transfer must not look like a complete download."""
    import struct
    app, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    threading.Thread(target=Flow(relay_in, relay_out, native=native).run, daemon=True).start()
    far.sendall(b"partial")
    assert app.recv(7) == b"partial"
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.close()  # RST
    app.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while app.recv(1 << 16):
            pass


def test_relay_server_rejects_a_client_proof_made_without_the_secret(relay_server):
    """The server half of the proof: a client that cannot prove the secret gets no status."""
    from vpn_provider.relay.protocol import CLIENT_HELLO, MAGIC, SERVER_HELLO, ServerHandshake
    with socket.create_connection(relay_server, timeout=5) as s:
        s.sendall(MAGIC + os.urandom(CLIENT_HELLO - len(MAGIC)))
        assert len(s.recv(SERVER_HELLO, socket.MSG_WAITALL)) == SERVER_HELLO
        s.sendall(os.urandom(ServerHandshake.PROOF_SIZE))
        try:
            answer = s.recv(1)
        except ConnectionResetError:
            answer = b""
        assert answer == b""


def test_relay_server_drops_a_client_that_drips_its_handshake(relay_server, monkeypatch):
    """A whole handshake has one deadline, so a client cannot hold a slot by sending slowly."""
    monkeypatch.setattr(server, "HANDSHAKE_DEADLINE", 0.5)
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


def test_strangers_holding_many_unfinished_handshakes_do_not_stop_a_client(relay_server):
    """Idle, dripping and half-finished connections cost the relay no thread and no slot that a
    client with the secret needs: its handshakes still answer at once."""
    from vpn_provider.relay.protocol import CLIENT_HELLO, MAGIC
    jam = []
    for i in range(600):  # more than one source may hold (PER_SOURCE): the oldest give way
        s = socket.create_connection(relay_server, timeout=5)
        if i % 3 == 1:
            s.sendall(MAGIC[:5])
        elif i % 3 == 2:
            s.sendall(MAGIC + os.urandom(CLIENT_HELLO - len(MAGIC)))  # then never a proof
        jam.append(s)
    threads_before = threading.active_count()
    try:
        for _ in range(20):
            t0 = time.monotonic()
            assert _ask(relay_server, Verb.PING, ("0.0.0.0", 0)) is Status.OK
            assert time.monotonic() - t0 < 1.0
        assert threading.active_count() <= threads_before + 2
    finally:
        for s in jam:
            s.close()


def _sealed_flow(native: bool):
    """A sealed flow as the gateway carries it: (the node's socket and session, the far end)."""
    node, relay_in = _loopback_pair()
    box: dict = {}

    def serve():
        box["request"], box["handshake"] = server_handshake(relay_in, KEY)
        relay_in.sendall(box["handshake"].status(Status.OK))
    t = threading.Thread(target=serve)
    t.start()
    _, session = client_handshake(node, KEY, Verb.CONNECT, ("198.18.10.1", 80))
    t.join()
    relay_in.settimeout(None)
    relay_out, far = _loopback_pair()
    flow = Flow(relay_in, relay_out, session=box["handshake"].session, native=native)
    threading.Thread(target=flow.run, daemon=True).start()
    return node, session, far


def test_a_sealed_flow_moves_bytes_both_ways_and_ends_with_authenticated_ends(native):
    node, session, far = _sealed_flow(native)
    payload = os.urandom(3 << 20)
    for i in range(0, len(payload), 50_000):
        node.sendall(session.sealer.seal(payload[i:i + 50_000]))
    node.sendall(session.sealer.end())
    received = bytearray()
    while chunk := far.recv(1 << 16):
        received.extend(chunk)
    assert received == payload  # and the END record became a clean end of stream
    far.sendall(b"answer")
    far.close()
    assert recv_record(node, session.opener) == b"answer"
    assert recv_record(node, session.opener) == b"" and session.opener.ended


@pytest.mark.parametrize("attack", ["flip a byte", "cut inside a record", "cut between records"])
def test_an_altered_or_cut_sealed_stream_reaches_the_destination_as_a_reset(attack, native):
    node, session, far = _sealed_flow(native)
    record = bytearray(session.sealer.seal(b"GET /file HTTP/1.0\r\n\r\n"))
    if attack == "flip a byte":
        record[10] ^= 0x01
        node.sendall(record)
    elif attack == "cut inside a record":
        node.sendall(record[:len(record) - 3])
        node.shutdown(socket.SHUT_WR)
    else:  # a whole record, then a TCP end without the END record
        node.sendall(record)
        node.shutdown(socket.SHUT_WR)
    far.settimeout(10)
    got = b""
    with pytest.raises(ConnectionResetError):
        while chunk := far.recv(1 << 16):
            got += chunk
    # nothing of an unauthenticated record is passed on; a complete one is, then the reset
    assert got == (b"GET /file HTTP/1.0\r\n\r\n" if attack == "cut between records" else b"")


def test_the_c_pump_goes_on_from_the_handshakes_record_numbers_across_an_epoch():
    """The C pump takes over both directions where the Python handshake left them: a flow two
    records short of a new epoch must agree with the node's records past it, both ways."""
    if not native_pump.available():
        pytest.skip(f"{native_pump.LIBRARY} was not built (setup.py build_ext)")
    node, relay_in = _loopback_pair()
    relay_out, far = _loopback_pair()
    secret_up, secret_down = os.urandom(32), os.urandom(32)
    node_sealer, node_opener = records.Sealer(secret_up), records.Opener(secret_down)
    gateway = protocol.Session(Mode.SEALED, records.Sealer(secret_down), records.Opener(secret_up))
    for direction in (node_sealer, node_opener, gateway.sealer, gateway.opener):
        direction._number = records.EPOCH_RECORDS - 2
    threading.Thread(target=Flow(relay_in, relay_out, session=gateway, native=True).run, daemon=True).start()
    node.settimeout(10)
    far.settimeout(10)
    for i in range(5):
        node.sendall(node_sealer.seal(bytes([i]) * 1000))
        far.sendall(bytes([i]) * 700)
        assert far.recv(1000, socket.MSG_WAITALL) == bytes([i]) * 1000
        assert recv_record(node, node_opener) == bytes([i]) * 700
    node.sendall(node_sealer.end())
    assert far.recv(1) == b""  # the node's END, as a clean end of stream
    far.close()
    assert recv_record(node, node_opener) == b"" and node_opener.ended


def test_records_change_key_every_epoch(monkeypatch):
    monkeypatch.setattr(records, "EPOCH_RECORDS", 4)
    sealer, opener = records.Sealer(b"k" * 32), records.Opener(b"k" * 32)
    sealed = [sealer.seal(bytes([i])) for i in range(10)]
    assert [opener.open(r[:4], r[4:]) for r in sealed] == [bytes([i]) for i in range(10)]
    # records 4 to 7 are under the second epoch's key: an opener that never moved on fails there
    stale = records.Opener(b"k" * 32)
    monkeypatch.setattr(records, "EPOCH_RECORDS", 1 << 20)
    for r in sealed[:4]:
        stale.open(r[:4], r[4:])
    with pytest.raises(records.RecordError):
        stale.open(sealed[4][:4], sealed[4][4:])


def _open_flow(table, worker: int, native: bool):
    """A running flow of ``worker`` in ``table``: its two outer ends, and an event set once the
    table counted its end."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    flow = Flow(b, c, native=native)
    ended = threading.Event()
    table.add_flow("198.19.20.10", worker, flow)
    counted = flow.on_end
    flow.on_end = lambda f: (counted(f), ended.set())
    threading.Thread(target=flow.run, daemon=True).start()
    return a, d, ended


def _short_flow(table, worker: int, native: bool) -> None:
    """A flow of ``worker`` that moves 1000 bytes up and 10 down, then ends."""
    a, d, ended = _open_flow(table, worker, native)
    a.sendall(b"x" * 1000)
    a.shutdown(socket.SHUT_WR)
    assert d.recv(2000, socket.MSG_WAITALL) == b"x" * 1000
    d.sendall(b"y" * 10)
    d.shutdown(socket.SHUT_WR)
    assert a.recv(100, socket.MSG_WAITALL) == b"y" * 10
    assert ended.wait(5)
    for s in (a, d):
        s.close()


def test_the_worker_table_keeps_a_workers_bytes_until_it_leaves(native):
    """A flow that ends before its worker's PRESENT connection came (they start together) adds
    its bytes to the worker, which stays listed until its PRESENT connection ends."""
    from vpn_provider.relay.workers import WorkerTable
    table = WorkerTable()
    _short_flow(table, 42, native)
    assert table.snapshot() == [{"node": "198.19.20.10", "worker": "vpnp-42", "flows": 0,
                                 "bytes_up": 1000, "bytes_down": 10}]
    with table.present("198.19.20.10", 42):
        assert table.snapshot()[0]["bytes_up"] == 1000
    assert table.snapshot() == []


def test_a_worker_whose_last_flow_outlives_its_presence_is_forgotten_when_the_flow_ends(native):
    """A job's end closes its PRESENT connection and its last flow at once, in either order:
    the worker must not stay listed when the PRESENT connection's end is seen first."""
    from vpn_provider.relay.workers import WorkerTable
    table = WorkerTable()
    presence = table.present("198.19.20.10", 7)
    presence.__enter__()
    a, d, ended = _open_flow(table, 7, native)
    presence.__exit__(None, None, None)  # the PRESENT connection ended first
    assert [w["flows"] for w in table.snapshot()] == [1]
    for s in (a, d):
        s.close()
    assert ended.wait(5)
    assert table.snapshot() == []


def test_a_worker_seen_only_by_its_flows_is_forgotten_after_the_grace(native, monkeypatch):
    from vpn_provider.relay import workers
    table = workers.WorkerTable()
    _short_flow(table, 9, native)
    assert [w["worker"] for w in table.snapshot()] == ["vpnp-9"]
    monkeypatch.setattr(workers, "PRESENCE_GRACE", 0.0)
    assert table.snapshot() == []
