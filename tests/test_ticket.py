"""Pure tests: the ticket's parsing, validation and file handling."""
from __future__ import annotations

import json
import os

import pytest

from vpn_provider.errors import TicketError
from vpn_provider.ticket import Endpoint, Ticket

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
