"""Several gateways, one ticket: the registry in a shared credentials directory (pure tier)."""
from __future__ import annotations

import pytest

from vpn_provider.errors import GatewayError
from vpn_provider.gateway import registry
from vpn_provider.ticket import Endpoint

A = (Endpoint("198.19.20.1", 8443), Endpoint("198.18.10.2", 8443))
B = (Endpoint("198.19.20.2", 8443),)


def test_every_gateway_lands_in_the_ticket_and_a_restart_replaces_its_own_entry(tmp_path):
    with registry.locked(tmp_path):
        assert registry.register(tmp_path, "login1-a", A, 8444) == (A, True)
    with registry.locked(tmp_path):
        assert registry.register(tmp_path, "login2-b", B, 8444) == (B + A, True)
    moved = (Endpoint("198.19.20.9", 8443),)
    with registry.locked(tmp_path):  # login1's gateway comes back on another address
        assert registry.register(tmp_path, "login1-a", moved, 8444) == (moved + B, True)


def test_one_ticket_offers_the_tunnel_only_if_every_gateway_in_it_does(tmp_path):
    """A worker may land on any gateway of its ticket: the relay alone on one is the relay alone
    for all, whichever of them started last."""
    with registry.locked(tmp_path):
        assert registry.register(tmp_path, "login1-a", A, 8444, tunnel=False) == (A, False)
    with registry.locked(tmp_path):
        assert registry.register(tmp_path, "login2-b", B, 8444, tunnel=True) == (B + A, False)
    with registry.locked(tmp_path):  # login1 gets ocserv and starts again
        assert registry.register(tmp_path, "login1-a", A, 8444, tunnel=True) == (A + B, True)
    older = tmp_path / "gateways.d" / "login3-c.json"  # written before the field: it had the tunnel
    older.write_text('{"gateways": ["198.19.20.3:8443"], "relay_port": 8444}\n')
    older.chmod(0o600)
    with registry.locked(tmp_path):
        assert registry.register(tmp_path, "login1-a", A, 8444).tunnel is True


def test_gateways_sharing_credentials_must_share_the_relay_port(tmp_path):
    with registry.locked(tmp_path):
        registry.register(tmp_path, "login1-a", A, 8444)
    with registry.locked(tmp_path), pytest.raises(GatewayError, match="relay port 8444, this one 9999"):
        registry.others(tmp_path, "login2-b", 9999)


def test_an_unreadable_entry_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "gateways.d").mkdir()
    (tmp_path / "gateways.d" / "junk.json").write_text("{not json")
    with registry.locked(tmp_path), pytest.raises(GatewayError, match="junk.json") as caught:
        registry.others(tmp_path, "login1-a", 8444)
    assert "\n" not in str(caught.value)


def test_a_planted_entry_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "gateways.d").mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"gateways": ["203.0.113.9:8443"], "relay_port": 8444}')
    (tmp_path / "gateways.d" / "login9-x.json").symlink_to(elsewhere)
    with pytest.raises(GatewayError, match="login9-x.json is a symlink; remove it"):
        registry.check(tmp_path)
    with pytest.raises(GatewayError, match="login9-x.json is a symlink"):
        registry.others(tmp_path, "login1-a", 8444)
