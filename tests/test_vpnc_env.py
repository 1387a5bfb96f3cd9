"""Pure tests: openconnect's script environment parsed into tunnel parameters."""
from __future__ import annotations

import ipaddress

import pytest

from vpn_provider.worker import netconfig, vpnc_env

ENV = {"reason": "connect", "TUNDEV": "vpn0", "INTERNAL_IP4_ADDRESS": "100.64.3.7",
       "INTERNAL_IP4_NETMASK": "255.255.0.0", "INTERNAL_IP4_NETMASKLEN": "16", "INTERNAL_IP4_MTU": "1334",
       "INTERNAL_IP4_DNS": "198.18.10.1 198.18.10.2", "VPNGATEWAY": "198.19.20.1"}


def test_full_tunnel():
    p = vpnc_env.parse(ENV)
    assert p.address == ipaddress.IPv4Interface("100.64.3.7/16")
    assert p.mtu == 1334 and p.tundev == "vpn0" and p.split_include == ()
    assert [str(d) for d in p.dns] == ["198.18.10.1", "198.18.10.2"]


def test_split_includes():
    env = dict(ENV, CISCO_SPLIT_INC="2", CISCO_SPLIT_INC_0_ADDR="10.1.0.0", CISCO_SPLIT_INC_0_MASKLEN="16",
               CISCO_SPLIT_INC_1_ADDR="192.0.2.0", CISCO_SPLIT_INC_1_MASKLEN="24")
    assert [str(n) for n in vpnc_env.parse(env).split_include] == ["10.1.0.0/16", "192.0.2.0/24"]


def test_missing_address_is_named():
    env = {k: v for k, v in ENV.items() if k != "INTERNAL_IP4_ADDRESS"}
    with pytest.raises(ValueError, match="INTERNAL_IP4_ADDRESS"):
        vpnc_env.parse(env)


def test_nul_separated_values_may_hold_newlines_and_equals():
    blob = b"A=1\0CISCO_BANNER=line1\nline2=x\0EMPTY=\0"
    assert vpnc_env.parse_nul_separated(blob) == {"A": "1", "CISCO_BANNER": "line1\nline2=x", "EMPTY": ""}


def test_resolv_conf_has_pushed_servers_and_short_timeouts():
    text = netconfig.resolv_conf_text(vpnc_env.parse(dict(ENV, CISCO_DEF_DOMAIN="sim.test")))
    assert text.splitlines() == ["nameserver 198.18.10.1", "nameserver 198.18.10.2", "search sim.test",
                                 "options timeout:2 attempts:3"]


def test_the_tunnels_ipv6_address_comes_with_its_prefix_or_as_a_128():
    with_prefix = dict(ENV, INTERNAL_IP6_ADDRESS="fd76:706e:7001::5", INTERNAL_IP6_NETMASK="fd76:706e:7001::5/128")
    assert vpnc_env.parse(with_prefix).address6 == ipaddress.IPv6Interface("fd76:706e:7001::5/128")
    bare = dict(ENV, INTERNAL_IP6_ADDRESS="fd76:706e:7001::6")
    assert vpnc_env.parse(bare).address6 == ipaddress.IPv6Interface("fd76:706e:7001::6/128")
    assert vpnc_env.parse(ENV).address6 is None  # a gateway without IPv6
