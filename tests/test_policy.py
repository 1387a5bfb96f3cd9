"""The destination policy (policy.py): parsing of --allow/--deny and what it lets through."""
from __future__ import annotations

import socket

import pytest

from vpn_provider.policy import Policy, PolicyError, Rule


@pytest.mark.parametrize("text,network,ports", [
    ("192.0.2.0/24", "192.0.2.0/24", ()),
    ("192.0.2.7:1094", "192.0.2.7/32", ((1094, 1094),)),
    ("10.0.0.0/8:80,443,1094-1099", "10.0.0.0/8", ((80, 80), (443, 443), (1094, 1099))),
    ("[2001:db8::/32]:443", "2001:db8::/32", ((443, 443),)),
    ("2001:db8::/32", "2001:db8::/32", ()),
])
def test_rules_parse(text, network, ports):
    rule = Rule.parse(text)
    assert (str(rule.network), rule.ports) == (network, ports)
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize("text", ["example.org", "10.0.0.0/33", "10.0.0.1:0", "10.0.0.1:99999",
                                  "10.0.0.1:443-80", "10.0.0.1:http", "[2001:db8::/32]443"])
def test_bad_rules_are_one_line_errors_naming_the_rule(text):
    with pytest.raises(PolicyError) as e:
        Rule.parse(text)
    assert text in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("host", ["169.254.169.254", "127.0.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.0",
                                  "fe80::1", "::1", "ff02::1", "::ffff:169.254.169.254"])
def test_link_local_loopback_and_multicast_are_denied_even_when_allowed(host):
    policy = Policy.from_args(allow=["0.0.0.0/0", "::/0"])
    assert policy.why_denied(host, 80)


def test_deny_and_allow_with_ports():
    policy = Policy.from_args(allow=["198.18.10.0/24:1094"], deny=["198.18.10.66"])
    assert policy.why_denied("198.18.10.5", 1094) == ""
    assert "not in any --allow" in policy.why_denied("198.18.10.5", 80)
    assert "not in any --allow" in policy.why_denied("192.0.2.1", 1094)
    assert "--deny 198.18.10.66/32" in policy.why_denied("198.18.10.66", 1094)
    assert Policy().why_denied("192.0.2.1", 80) == ""  # no rules: everything but the built-in denials


def test_the_gateways_own_ports_on_this_host_are_denied():
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        local = next((a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                      if not a.get_attr("IFA_ADDRESS").startswith("127.")), None)
    if local is None:
        pytest.skip("this host has no IPv4 address but loopback to test with")
    policy = Policy.from_args(own_ports=(8443, 8444))
    assert policy.why_denied(local, 8444) == "the gateway's own port"
    assert policy.why_denied(local, 8080) == ""
    assert policy.why_denied("192.0.2.1", 8444) == ""  # another host's 8444 is fine
