"""Pure tests: the ticket's parsing, validation and file handling."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket

import pytest

from vpn_provider.errors import TicketError
from vpn_provider.ticket import MAX_GATEWAYS, MAX_TICKET_BYTES, Endpoint, Ticket

PIN = "pin-sha256:" + "x" * 43 + "="


def make(**kw) -> Ticket:
    base = dict(gateways=(Endpoint("10.0.0.1", 8443),), pin=PIN, user="worker", secret="s" * 32)
    base.update(kw)
    return Ticket(**base)


def test_round_trip_through_file_keeps_every_field(tmp_path):
    t = make(gateways=(Endpoint("10.0.0.1", 8443), Endpoint("login.example.org", 443), Endpoint("fd00::1", 8443)))
    path = tmp_path / "ticket.json"
    t.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Ticket.load(path) == t
    assert json.loads(path.read_text())["gateways"] == ["10.0.0.1:8443", "login.example.org:443", "[fd00::1]:8443"]


def test_repr_hides_the_secret():
    assert "s" * 32 not in repr(make())


@pytest.mark.parametrize("text,needle", [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"gateways": ["h:1"], "pin": "%s", "user": "u"}' % PIN, "missing field(s) secret"),
    ('{"gateways": "h:1", "pin": "%s", "user": "u", "secret": "%s"}' % (PIN, "s" * 20), "list of"),
    ('{"gateways": ["h:99999"], "pin": "%s", "user": "u", "secret": "%s"}' % (PIN, "s" * 20), "bad port"),
    ('{"gateways": ["h:1"], "pin": "sha1:abc", "user": "u", "secret": "%s"}' % ("s" * 20), "pin-sha256"),
    ('{"gateways": ["h:1"], "pin": "%s", "user": "u", "secret": "short"}' % PIN, "at least 16"),
    ('{"gateways": [], "pin": "%s", "user": "u", "secret": "%s"}' % (PIN, "s" * 20), "empty"),
    ('{"gateways": ["h:1"], "pin": "%s", "user": "u", "secret": "%s", "version": 9}' % (PIN, "s" * 20),
     "not supported"),
])
def test_invalid_ticket_names_the_problem(text, needle):
    with pytest.raises(TicketError) as err:
        Ticket.from_json(text, source="t.json")
    assert needle in str(err.value) and str(err.value).startswith("ticket t.json:")
    assert "\n" not in str(err.value)


def test_world_readable_ticket_is_refused(tmp_path):
    path = tmp_path / "t.json"
    make().save(path)
    os.chmod(path, 0o640)
    with pytest.raises(TicketError, match=r"readable by other users \(mode 0640\); run: chmod 600"):
        Ticket.load(path)


def test_missing_ticket(tmp_path):
    with pytest.raises(TicketError, match="no such file"):
        Ticket.load(tmp_path / "nope.json")


@pytest.mark.parametrize("text,host,port", [("h", "h", 8443), ("h:1", "h", 1), ("[::1]:9", "::1", 9),
                                            ("1.2.3.4:443", "1.2.3.4", 443)])
def test_endpoint_parse(text, host, port):
    assert Endpoint.parse(text) == Endpoint(host, port)


@pytest.mark.parametrize("text", ["h:0", "h:x", "a:b:c", ""])
def test_endpoint_rejects(text):
    with pytest.raises(ValueError):
        Endpoint.parse(text)


def test_relay_port_round_trips_and_old_tickets_have_none(tmp_path):
    path = tmp_path / "ticket.json"
    make(relay_port=8444).save(path)
    loaded = Ticket.load(path)
    assert loaded.relay_port == 8444 and loaded.relay(loaded.gateways[0]) == Endpoint("10.0.0.1", 8444)
    old = json.loads(path.read_text())
    del old["relay_port"]  # a ticket from before the relay existed
    assert Ticket.from_json(json.dumps(old)).relay(Endpoint("10.0.0.1", 8443)) is None


@pytest.mark.parametrize("value", ["8444", 70000, True])
def test_bad_relay_port_is_named(value):
    text = make().to_json().replace('"relay_port": 0', f'"relay_port": {json.dumps(value)}')
    with pytest.raises(TicketError, match="relay_port"):
        Ticket.from_json(text)


# --- Hostile or mistaken input: one line (a TicketError), never a hang or a traceback. ---

@pytest.fixture
def no_hang():
    """Fail, rather than hang the run, if the test body blocks (a FIFO opened without O_NONBLOCK)."""
    def on_alarm(*_):
        raise TimeoutError("blocked for 5 s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(load, needle: str) -> str:
    with pytest.raises(TicketError) as err:
        load()
    message = str(err.value)
    assert needle in message and "\n" not in message and len(message) < 300, message
    return message


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path, no_hang):
    os.mkfifo(tmp_path / "fifo", 0o600)
    refused(lambda: Ticket.load(tmp_path / "fifo"), "not a regular file (a FIFO)")


@pytest.mark.parametrize("path,kind", [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_device_is_refused_unread(path, kind, no_hang):
    refused(lambda: Ticket.load(path), f"not a regular file ({kind})")


def test_directory_is_refused(tmp_path):
    refused(lambda: Ticket.load(tmp_path), "not a regular file (a directory)")


def test_symlink_to_a_ticket_is_fine(tmp_path):
    make().save(tmp_path / "real.json")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert Ticket.load(tmp_path / "link.json") == make()


def test_huge_sparse_file_is_refused_after_reading_64_kib(tmp_path, no_hang):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(100 << 20)
    os.chmod(path, 0o600)
    refused(lambda: Ticket.load(path), f"larger than {MAX_TICKET_BYTES // 1024} KiB")


def test_ticket_of_exactly_the_size_limit_loads(tmp_path):
    text = make().to_json()
    path = tmp_path / "t.json"
    path.write_text(text + " " * (MAX_TICKET_BYTES - len(text)))
    os.chmod(path, 0o600)
    assert Ticket.load(path) == make()


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(b'{"pin": "\xff\xfe"}')
    os.chmod(path, 0o600)
    refused(lambda: Ticket.load(path), "not UTF-8")


def test_deep_json_in_a_file_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 30000 + "]" * 30000)
    os.chmod(path, 0o600)
    refused(lambda: Ticket.load(path), "nested too deeply")


def _with(**changes) -> str:
    data = json.loads(make().to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("text,needle", [
    ("[" * 100000, "nested too deeply"),
    ('{"a": ' * 5000 + "1" + "}" * 5000, "nested too deeply"),
    (make().to_json().replace('"version": 1', '"version": 1e400'), "'version' must be an integer"),
    (make().to_json().replace('"version": 1', '"version": -1e400'), "'version' must be an integer"),
    (make().to_json().replace('"version": 1', '"version": NaN'), "'version' must be an integer"),
    (make().to_json().replace('"relay_port": 0', '"relay_port": 1e400'), "'relay_port' must be an integer"),
    (make().to_json().replace('"relay_port": 0', '"relay_port": Infinity'), "'relay_port' must be an integer"),
    (make().to_json().replace('"version": 1', '"version": 1' + "0" * 5000), "a number too long"),
    (make().to_json().replace('"version": 1', '"version": 1' + "0" * 4000), "is not supported"),
    (make().to_json().replace('"relay_port": 0', '"relay_port": 1' + "0" * 4000), "is not a port number"),
    (_with(gateways=[f"10.0.{i // 250}.{i % 250}:9" for i in range(3000)]), "3000 entries, a worker takes at most 64"),
])
def test_hostile_json_is_one_line(text, needle):
    refused(lambda: Ticket.from_json(text, source="t.json"), needle)


def test_gateway_cap_is_inclusive():
    many = [f"10.0.0.{i}:9" for i in range(MAX_GATEWAYS)]
    assert len(Ticket.from_json(_with(gateways=many)).gateways) == MAX_GATEWAYS
    refused(lambda: Ticket.from_json(_with(gateways=many + ["10.0.1.1:9"])), f"at most {MAX_GATEWAYS}")


HOSTILE_VALUES = [None, True, 70000, 1.5, -1, "", "x" * 70000 + "\n", [], ["h:1", 2], [[]], {}, {"h": 1},
                  "h\0:1", "h\n:1", "\ud800", "pin-sha256:" + "x" * 43 + "=\n", "worker\n"]


@pytest.mark.parametrize("field", ["gateways", "pin", "user", "secret", "relay_port", "version"])
def test_every_wrong_value_of_every_field_is_one_line(field):
    for value in HOSTILE_VALUES:
        refused(lambda: Ticket.from_json(_with(**{field: value}), source="t.json"), "ticket t.json:")


@pytest.mark.parametrize("address", ["h\0:1", "h :1", "h\n:1", "[::1\n]:1", "h:1:2", "h:١٢", "h:1234567", "[]:1",
                                     "h" * 70000 + ":99999999"])
def test_gateway_addresses_cannot_carry_separators(address):
    refused(lambda: Ticket.from_json(_with(gateways=[address])), "bad address")


def test_every_truncation_of_a_ticket_is_one_line():
    text = make(relay_port=8444).to_json()
    for end in range(len(text.rstrip())):
        refused(lambda: Ticket.from_json(text[:end]), "ticket <string>:")


@pytest.fixture
def high_descriptors():
    """Occupy descriptors until the next one is above 1023, where select() gives up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the open-file hard limit {hard} is too low to reach descriptor 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = []
    while not filler or filler[-1] < 1024:
        filler.append(os.open(os.devnull, os.O_RDONLY))
    yield
    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_gateway_addresses_are_tried_with_descriptors_above_1023(high_descriptors):
    from vpn_provider.worker.tunnel import pick_endpoint
    with socket.create_server(("127.0.0.1", 0)) as listener:
        gateway = Endpoint("127.0.0.1", listener.getsockname()[1])
        assert pick_endpoint((gateway,) * MAX_GATEWAYS, 5.0) == gateway


def test_helper_answers_are_awaited_with_descriptors_above_1023(high_descriptors):
    from vpn_provider.worker.node_helper import NodeHelper
    helper = NodeHelper.__new__(NodeHelper)  # its control socket only: no helper process
    helper._ctl, their_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    helper._stash, helper.relay = [], None
    assert helper._ctl.fileno() > 1023
    with helper._ctl, their_end:
        assert helper.verdict(0.1) == "relay None: no answer within 0.1 s"
        their_end.send(b"OK")
        assert helper.verdict(5.0) == ""
