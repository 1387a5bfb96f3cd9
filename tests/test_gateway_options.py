"""Pure tests: GatewayConfig refuses pools, resolvers and addresses that cannot work, naming the
option, the value and why in one line."""
from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from vpn_provider.gateway.config import DEFAULT_POOL, SLIRP_NETWORK, GatewayConfig
from vpn_provider.ticket import Endpoint


def config(**kw) -> GatewayConfig:
    if "pool" in kw:
        kw["pool"] = ipaddress.IPv4Network(kw["pool"], strict=False)
    return GatewayConfig(state_dir=Path("/nonexistent"), **kw)


def refused(needle: str, **kw) -> None:
    with pytest.raises(ValueError) as err:
        config(**kw)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_slirp_network_comes_from_the_egress_backend():
    assert SLIRP_NETWORK == ipaddress.IPv4Network("10.0.2.0/24")


@pytest.mark.parametrize("pool,why", [
    ("0.0.0.0/0", "too large"), ("10.0.0.0/7", "too large"), ("10.0.0.0/31", "too small"),
    ("192.0.2.1/32", "too small"),
    ("127.0.0.0/8", "overlaps loopback (127.0.0.0/8)"), ("127.1.0.0/16", "overlaps loopback"),
    ("224.0.0.0/4", "too large"), ("239.1.0.0/16", "overlaps multicast (224.0.0.0/4)"),
    ("169.254.0.0/16", "overlaps link-local (169.254.0.0/16)"),
    ("0.0.0.0/8", "overlaps 'this network' (0.0.0.0/8)"),
    ("255.255.255.0/24", "overlaps reserved space and the limited broadcast (240.0.0.0/4)"),
    ("10.0.2.0/24", "overlaps slirp4netns' egress network (10.0.2.0/24)"),
    ("10.0.0.0/16", "overlaps slirp4netns' egress network"), ("10.0.2.128/25", "overlaps slirp4netns'"),
])
def test_unusable_pool_is_refused(pool, why):
    refused(f"--pool {ipaddress.IPv4Network(pool, strict=False)}: {why}", pool=pool)
    refused(f"choose a private range such as the default {DEFAULT_POOL}", pool=pool)


@pytest.mark.parametrize("pool", [DEFAULT_POOL, "10.8.0.0/16", "172.16.0.0/12", "192.168.77.0/30", "100.64.0.0/10"])
def test_sensible_pools_pass(pool):
    assert str(config(pool=pool).pool) == pool


def test_slirp_network_is_free_when_the_egress_is_pasta():
    assert config(pool="10.0.2.0/24", egress="pasta").pool == ipaddress.IPv4Network("10.0.2.0/24")
    refused("slirp4netns' egress network", pool="10.0.2.0/24", egress="slirp4netns")
    refused("slirp4netns' egress network", pool="10.0.2.0/24", egress="auto")  # auto may pick slirp4netns


@pytest.mark.parametrize("dns,why", [("0.0.0.0", "unspecified"), ("127.0.0.53", "loopback"),
                                     ("224.0.0.251", "multicast"), ("255.255.255.255", "reserved")])
def test_unusable_resolver_is_refused(dns, why):
    refused(f"--dns {dns}: not a resolver workers can reach ({why} address)", dns=("198.18.10.1", dns))


def test_ordinary_resolvers_pass():
    assert config(dns=("198.18.10.1", "169.254.169.253")).dns == ("198.18.10.1", "169.254.169.253")


@pytest.mark.parametrize("listen,warned", [("127.0.0.1:9000", True), ("127.9.9.9:9000", True),
                                           ("localhost:9000", True), ("[::1]:9000", True),
                                           ("0.0.0.0:9000", False), ("198.18.10.2:9000", False),
                                           ("login.example.org:9000", False)])
def test_loopback_listen_is_a_warning_not_an_error(listen, warned):
    warnings = config(listen=Endpoint.parse(listen)).warnings()
    assert len(warnings) == warned
    if warned:
        assert warnings[0].startswith(f"--listen {Endpoint.parse(listen)} is a loopback address")


@pytest.mark.parametrize("settings", [
    {},
    {"listen": "198.19.20.1:9443", "relay_port": 9500, "dns": ("192.0.2.53", "192.0.2.54"), "pool": "100.80.0.0/20",
     "egress": "pasta", "mtu": 1300, "advertise": ("login.example.org:9443", "198.19.20.1:9443"),
     "allow": ("192.0.2.0/24:1094", "[2001:db8::/32]:443"), "deny": ("192.0.2.7",), "plain_relay": True},
    {"relay": False, "credentials_dir": "/shared/vpn"},
    {"tunnel": False},
])
def test_a_gateway_config_survives_its_own_command_line(tmp_path, settings):
    """`gateway start` hands the supervisor its config as `gateway run` options (cli_args); read
    back by the CLI's parser, they give the same config, so no option is lost on the way."""
    from vpn_provider.cli import _gateway_config, build_parser
    kw = dict(settings)
    if "listen" in kw:
        kw["listen"] = Endpoint.parse(kw["listen"])
    if "advertise" in kw:
        kw["advertise"] = tuple(Endpoint.parse(a) for a in kw["advertise"])
    if "pool" in kw:
        kw["pool"] = ipaddress.IPv4Network(kw["pool"])
    if "credentials_dir" in kw:
        kw["credentials_dir"] = Path(kw["credentials_dir"])
    original = GatewayConfig(state_dir=tmp_path, **kw)
    again = _gateway_config(build_parser().parse_args(["gateway", "run", *original.cli_args()]))
    # relay_port 0 means "listen + 1", which the command line spells out; policy rules come
    # back in their canonical form (192.0.2.7 as 192.0.2.7/32)
    def rest(cfg):
        return dataclasses.replace(cfg, relay_port=0, allow=(), deny=())
    assert rest(again) == rest(original)
    assert again.relay_endpoint == original.relay_endpoint
    assert again.policy.cli_args() == original.policy.cli_args()
