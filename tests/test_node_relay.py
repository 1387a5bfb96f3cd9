"""The native node relay helper (native/node_relay.c) against the Python relay server, in a
throwaway user+net namespace (the tier that needs user namespaces; nothing leaves it).

The helper's resolver sockets (relay-only mode) carry DNS streams to the server's "resolver",
which here is a scenario server on 127.0.0.2:53: it answers DNS queries, and for a few magic
queries it exercises the splice pump instead (a large upload with a half-close, a large
download, a reset).
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_redirect import _in_namespace
from vpn_provider.relay.protocol import relay_key

KEY = relay_key("s" * 32)
RESOLVER = "127.0.0.2"
UPLOAD = 8 << 20
CONCURRENT = 48


def _dns_query(name: str, *, qid: int = 0x1234, edns: int = 0) -> bytes:
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    opt = b"\0" + struct.pack("!HHIH", 41, edns, 0, 0) if edns else b""
    return header + question + opt


def _dns_answer(query: bytes) -> bytes:
    """A records 198.18.0.N; 'big.' names get 60 of them (over 512 bytes)."""
    qid = query[:2]
    end = 12
    while query[end]:
        end += query[end] + 1
    question = query[12:end + 5]
    count = 60 if question[1:4] == b"big" else 1
    records = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([198, 18, 0, i + 1])
                       for i in range(count))
    return qid + struct.pack("!HHHHH", 0x8180, 1, count, 0, 0) + question + records


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _scenario(conn: socket.socket) -> None:
    """One DNS-over-TCP stream, or a pump scenario named by its first message."""
    try:
        first = _recv_exact(conn, struct.unpack("!H", _recv_exact(conn, 2))[0])
        if first == b"UPLOAD":  # read to the end of stream, then answer: half-close must pass
            digest = hashlib.sha256()
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
            conn.sendall(digest.digest())
        elif first == b"DOWNLOAD":
            body = os.urandom(UPLOAD)
            conn.sendall(hashlib.sha256(body).digest() + body)
        elif first == b"URGENT_UP":  # echo what arrived, urgent byte included, after the end
            got = b""
            while chunk := conn.recv(1 << 16):
                got += chunk
            conn.sendall(got)
        elif first == b"URGENT_DOWN":
            conn.sendall(b"abc")
            conn.send(b"X", socket.MSG_OOB)
            conn.sendall(b"def")
        elif first == b"RESET":
            conn.sendall(b"partial")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif b"\x04fail" not in first:  # fail.example: the resolver hangs up, no answer
            answer = _dns_answer(first)
            conn.sendall(struct.pack("!H", len(answer)) + answer)
    except (OSError, EOFError):
        pass
    conn.close()


def _serve_forever(listener: socket.socket, handler) -> None:
    def loop():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()


def _stream(payload: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", 53), timeout=20)
    s.sendall(struct.pack("!H", len(payload)) + payload)
    return s


def _udp(query: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(query, ("127.0.0.1", 53))
        return s.recv(65536)


def _probe_helper(client_key: bytes) -> dict:
    from pyroute2 import IPRoute
    from vpn_provider.relay import server
    from vpn_provider.ticket import Endpoint
    from vpn_provider.worker.relay_helper import RelayHelper
    from vpn_provider.worker.tunnel import _hand_namespace_to
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    relay = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=server.serve, args=(relay, KEY, (RESOLVER,)), daemon=True).start()
    _serve_forever(socket.create_server((RESOLVER, 53)), _scenario)
    helper = RelayHelper(Endpoint("127.0.0.1", relay.getsockname()[1]), client_key)
    verdict = helper.verdict(10)
    if verdict:
        helper.abandon()
        return {"verdict": verdict}
    problem = _hand_namespace_to(helper, exclude=[], relay_only=True)
    if problem:
        return {"verdict": problem}
    out: dict = {"verdict": ""}

    small = _udp(_dns_query("small.example"))
    out["udp_small"] = {"id": small[:2].hex(), "answers": struct.unpack("!H", small[6:8])[0]}
    t0 = time.monotonic()
    failed = _udp(_dns_query("fail.example"))
    out["udp_fail"] = {"rcode": failed[3] & 0x0F, "seconds": time.monotonic() - t0}
    big = _udp(_dns_query("big.example"))
    out["udp_big_truncated"] = bool(big[2] & 0x02) and struct.unpack("!H", big[6:8])[0] == 0
    big_edns = _udp(_dns_query("big.example", edns=4096))
    out["udp_big_edns_answers"] = struct.unpack("!H", big_edns[6:8])[0]
    with _stream(_dns_query("big.example")) as s:
        answer = _recv_exact(s, struct.unpack("!H", _recv_exact(s, 2))[0])
        out["tcp_big_answers"] = struct.unpack("!H", answer[6:8])[0]

    payload = os.urandom(UPLOAD)
    with _stream(b"UPLOAD") as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out["upload_intact"] = _recv_exact(s, 32) == hashlib.sha256(payload).digest()
    with _stream(b"DOWNLOAD") as s:
        digest = _recv_exact(s, 32)
        body = _recv_exact(s, UPLOAD)
        out["download_intact"] = hashlib.sha256(body).digest() == digest and s.recv(1) == b""
    with _stream(b"URGENT_UP") as s:
        s.sendall(b"abc")
        s.send(b"X", socket.MSG_OOB)
        s.sendall(b"def")
        s.shutdown(socket.SHUT_WR)
        out["urgent_up"] = _recv_exact(s, 7).decode()
    with _stream(b"URGENT_DOWN") as s:
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
        out["urgent_down"] = got.decode()
    with _stream(b"RESET") as s:
        got = _recv_exact(s, 7)
        try:
            while s.recv(1 << 16):
                pass
            out["reset"] = f"clean end after {got!r}"
        except ConnectionResetError:
            out["reset"] = "reset"
    def upload(size: int) -> bool:
        data = os.urandom(size)
        with _stream(b"UPLOAD") as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return _recv_exact(s, 32) == hashlib.sha256(data).digest()
    with ThreadPoolExecutor(CONCURRENT) as pool:  # flows at once: one thread each in the helper
        out["concurrent_uploads_intact"] = sum(pool.map(upload, [256 << 10] * CONCURRENT))
    with open(f"/proc/{helper.pid}/status") as f:
        out["rss_kb"] = int(next(ln.split()[1] for ln in f if ln.startswith("VmRSS")))
    with open(f"/proc/{helper.pid}/comm") as f:
        out["comm"] = f.read().strip()
    return out


@pytest.fixture(scope="module")
def helper_run() -> dict:
    result = _in_namespace(lambda: _probe_helper(KEY))
    assert "error" not in result, result["error"]
    assert result["verdict"] == ""
    return result


def test_dns_over_udp_is_answered_through_the_relay(helper_run):
    assert helper_run["udp_small"] == {"id": "1234", "answers": 1}
    assert helper_run["udp_big_edns_answers"] == 60  # the asker said it takes 4096 bytes


def test_an_answer_too_big_for_udp_is_truncated_then_served_over_tcp(helper_run):
    assert helper_run["udp_big_truncated"]  # TC set: glibc asks again over TCP
    assert helper_run["tcp_big_answers"] == 60


def test_native_pump_moves_bytes_both_ways_and_passes_half_close(helper_run):
    assert helper_run["upload_intact"]  # the far end saw our end of stream, then answered
    assert helper_run["download_intact"]


def test_a_failed_lookup_is_answered_at_once_with_servfail(helper_run):
    """Not left to the asker's time-out (2 s per try with our resolv.conf)."""
    assert helper_run["udp_fail"]["rcode"] == 2  # SERVFAIL
    assert helper_run["udp_fail"]["seconds"] < 1.5


def test_urgent_data_neither_stalls_nor_ends_a_flow(helper_run):
    """splice stops at TCP's urgent mark: both ends step over it and keep the byte in the stream
    (the node's C pump on the way up, the gateway's Python pump on the way down)."""
    assert helper_run["urgent_up"] == "abcXdef"
    assert helper_run["urgent_down"] == "abcXdef"


def test_native_helper_carries_many_flows_at_once(helper_run):
    assert helper_run["concurrent_uploads_intact"] == CONCURRENT


def test_native_pump_passes_a_reset_on_as_a_reset(helper_run):
    assert helper_run["reset"] == "reset"


def test_native_helper_stays_small(helper_run):
    """The point of writing it in C: a worker carries it for its whole life."""
    assert helper_run["comm"] == "vpnp-node-relay"
    assert helper_run["rss_kb"] < 4096


def test_native_helper_refuses_a_relay_that_does_not_know_the_secret():
    result = _in_namespace(lambda: _probe_helper(relay_key("t" * 32)))
    assert "error" not in result, result["error"]
    assert "does not know this ticket's secret" in result["verdict"]


def test_missing_helper_keeps_tcp_in_the_tunnel_with_a_warning(monkeypatch, caplog, tmp_path):
    """An install without the helper binary degrades to the tunnel; it does not fail the job."""
    from vpn_provider.ticket import Endpoint
    from vpn_provider.worker import relay_helper, tunnel
    monkeypatch.setattr(relay_helper, "BINARY", tmp_path / "no-such-helper")
    with caplog.at_level("WARNING"):
        assert tunnel._start_relay_helper(Endpoint("127.0.0.1", 9), "s" * 32) is None
    assert "TCP goes through the tunnel: the relay helper" in caplog.text
