"""Pure tests: the transport as one typed value, and the choice a plain `exec` makes on a node."""
from __future__ import annotations

import json
import os
import sys

import pytest

from vpn_provider import proc
from vpn_provider.errors import TicketError, TunnelError
from vpn_provider.gateway.config import GatewayConfig
from vpn_provider.ticket import Endpoint, Ticket
from vpn_provider.transport import CHOICES, Transport
from vpn_provider.worker import api, choice
from vpn_provider.worker.tunnel import Tunnel

PIN = "pin-sha256:" + "x" * 43 + "="


def ticket(**kw) -> Ticket:
    base = dict(gateways=(Endpoint("10.0.0.1", 8443),), pin=PIN, user="worker", secret="s" * 32, relay_port=8444)
    base.update(kw)
    return Ticket(**base)


def test_a_transport_is_parsed_in_one_place():
    assert CHOICES == ("auto", "relay", "tunnel", "relay-only", "preload")
    assert Transport.parse(None) is None and Transport.parse("auto") is None
    assert Transport.parse("relay-only") is Transport.RELAY_ONLY
    assert Transport.parse(Transport.TUNNEL) is Transport.TUNNEL
    for bad in ("udp", "", "Relay", 3):
        with pytest.raises(ValueError, match="is not one of auto, relay, tunnel, relay-only, preload"):
            Transport.parse(bad)


def test_the_preload_library_and_the_helper_share_python_s_constants():
    """native/preload_request.h mirrors the environment variable's name and the relay's statuses."""
    import re
    from pathlib import Path

    from vpn_provider.relay.protocol import Status
    from vpn_provider.worker import RELAY_PORTS_ENV
    header = (Path(__file__).parent.parent / "vpn_provider/native/preload_request.h").read_text()
    assert re.search(r'#define PRELOAD_PORTS_ENV "(\w+)"', header).group(1) == RELAY_PORTS_ENV
    statuses = {name: int(value) for name, value in re.findall(r"PRELOAD_(\w+) = (\d+),", header)}
    assert {name: value for name, value in statuses.items() if name != "NO_RELAY"} == \
        {s.name: s.value for s in Status}
    assert statuses["NO_RELAY"] not in {s.value for s in Status}


def test_vpn_command_checks_the_transport_and_leaves_the_ticket_path_to_the_node():
    argv = api.vpn_command("~/.vpn/ticket.json", ["true"])
    assert argv[:3] == [sys.executable, "-m", "vpn_provider"]
    assert argv[argv.index("--ticket") + 1] == "~/.vpn/ticket.json"  # exec expands it where it runs
    assert argv[argv.index("--tcp") + 1] == "auto"
    assert api.vpn_command("t.json", ["true"], tcp=Transport.TUNNEL)[argv.index("--tcp") + 1] == "tunnel"
    with pytest.raises(ValueError, match="transport 'udp'"):
        api.vpn_command("t.json", ["true"], tcp="udp")


def test_a_ticket_says_whether_the_gateway_offers_the_tunnel(tmp_path):
    alone = ticket(tunnel=False)
    assert json.loads(alone.to_json())["tunnel"] is False
    assert Ticket.from_json(alone.to_json()) == alone
    older = json.loads(ticket().to_json())
    del older["tunnel"]  # tickets written before the field: their gateways all had the tunnel
    assert Ticket.from_json(json.dumps(older)).tunnel is True
    with pytest.raises(TicketError, match="'tunnel' must be true or false"):
        Ticket.from_json(json.dumps({**older, "tunnel": "no"}))
    with pytest.raises(ValueError, match="neither a tunnel nor a relay"):
        ticket(tunnel=False, relay_port=0)


def test_a_gateway_without_the_tunnel_gets_relay_only_workers():
    assert choice.decide(ticket(tunnel=False)) == (Transport.RELAY_ONLY,
                                                   "the gateway offers no tunnel (it runs the relay alone)")
    with pytest.raises(TunnelError, match="--tcp tunnel: the gateway offers no tunnel") as e:
        Tunnel(ticket(tunnel=False), tcp=Transport.TUNNEL)
    assert "--tcp relay-only" in e.value.remedy


def test_a_node_without_openconnect_gets_relay_only_workers(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no openconnect on this "node"
    monkeypatch.setattr(proc, "_EXTRA_PATH", ())
    transport, why = choice.decide(ticket())
    assert (transport, why) == (Transport.RELAY_ONLY, "openconnect is not installed on this node")
    # with no relay in the ticket there is nothing else: the tunnel's own error names what is missing
    assert choice.decide(ticket(relay_port=0))[0] is Transport.RELAY


@pytest.mark.skipif(not os.access("/dev/net/tun", os.R_OK | os.W_OK),
                    reason="this machine's /dev/net/tun is not open to us")
def test_a_node_with_everything_gets_the_tunnel_and_the_relay():
    try:
        proc.find_tool("openconnect")
    except Exception:
        pytest.skip("openconnect is not installed here (scripts/setup installs it)")
    assert choice.decide(ticket()) == (Transport.RELAY, "")


def test_a_gateway_config_that_offers_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--no-tunnel with --no-relay"):
        GatewayConfig(state_dir=tmp_path, tunnel=False, relay=False)
    assert "--no-tunnel" in GatewayConfig(state_dir=tmp_path, tunnel=False).cli_args()
    assert "--no-tunnel" not in GatewayConfig(state_dir=tmp_path).cli_args()


def test_a_gateway_host_without_ocserv_runs_the_relay_alone_unless_that_would_be_nothing(monkeypatch, tmp_path):
    from vpn_provider.errors import GatewayError
    from vpn_provider.gateway.supervisor import why_relay_alone
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: none of the tunnel's tools
    monkeypatch.setattr(proc, "_EXTRA_PATH", ())
    missing = "ocserv, occtl and openssl are not installed on this host"
    assert why_relay_alone(GatewayConfig(state_dir=tmp_path)) == missing
    assert why_relay_alone(GatewayConfig(state_dir=tmp_path, tunnel=False)) == "started with --no-tunnel"
    with pytest.raises(GatewayError, match="no tunnel: ocserv, occtl and openssl .*; leave out --no-relay"):
        why_relay_alone(GatewayConfig(state_dir=tmp_path, relay=False))
    with pytest.raises(GatewayError, match=f"^gateway: no tunnel: {missing}$"):
        why_relay_alone(GatewayConfig(state_dir=tmp_path, tunnel=True))


def _c_defines(*names: str) -> dict[str, str]:
    """``#define NAME value`` lines of the native headers and sources, value as written."""
    from pathlib import Path
    native = Path(__file__).parent.parent / "vpn_provider" / "native"
    found = {}
    for path in native.glob("*.[ch]"):
        for line in path.read_text().splitlines():
            words = line.split(None, 2)
            if len(words) == 3 and words[0] == "#define" and words[1] in names:
                found[words[1]] = words[2].split("/*")[0].strip()
    return found


def test_the_relay_protocol_s_constants_in_c_are_python_s():
    """relay_crypto.h/.c mirror relay/protocol.py and relay/records.py: one protocol, two
    implementations, and this test the one place that says they agree."""
    import ast

    from vpn_provider.relay import protocol, records
    c = _c_defines("RELAY_MAGIC", "RELAY_PROTOCOL", "RELAY_NONCE", "RELAY_PUBLIC", "RELAY_MAC", "RELAY_SECRET",
                   "RELAY_REQUEST", "RECORD_HEADER", "RECORD_TAG", "RECORD_MAX_PLAINTEXT", "EPOCH_RECORDS")
    assert ast.literal_eval(c["RELAY_MAGIC"]).encode() == protocol.MAGIC
    assert ast.literal_eval(c["RELAY_PROTOCOL"]).encode() == protocol.PROTOCOL
    # The values are C arithmetic on literals ("(64 * 1024)", "(1u << 20)"), which Python reads alike.
    numbers = {name: eval(value.replace("u <<", " <<"), {"__builtins__": {}}) for name, value in c.items()
               if name not in ("RELAY_MAGIC", "RELAY_PROTOCOL")}
    assert numbers == {"RELAY_NONCE": protocol.NONCE, "RELAY_PUBLIC": protocol.PUBLIC, "RELAY_MAC": protocol.MAC,
                       "RELAY_SECRET": records.SECRET, "RELAY_REQUEST": protocol.REQUEST.size,
                       "RECORD_HEADER": records.HEADER.size, "RECORD_TAG": records.TAG,
                       "RECORD_MAX_PLAINTEXT": records.MAX_PLAINTEXT, "EPOCH_RECORDS": records.EPOCH_RECORDS}


def test_the_helper_names_relay_statuses_as_python_does():
    """node_helper.c's status_name() lists relay/protocol.py's Status names in their order."""
    import re
    from pathlib import Path

    from vpn_provider.relay.protocol import Status
    source = (Path(__file__).parent.parent / "vpn_provider/native/node_helper.c").read_text()
    table = r"status_name\(int status\)\n\{\n    static const char \*names\[\] = \{([^}]*)\}"
    names = re.search(table, source).group(1)
    assert [n.strip().strip('"') for n in names.split(",")] == [s.name for s in Status]
