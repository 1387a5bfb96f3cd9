"""IPv6 destinations on the simulated site: the internet host has 2001:db8:10::1 as well, an
IPv6-only name (v6.sim.test) and dual-stack service names; the login host reaches it over IPv6,
the compute node has no IPv6 route out. A worker's IPv6 TCP goes through the relay (default and
relay-only mode); the rest of its IPv6 through the tunnel, which carries IPv6 since this login
host has it. With --tcp tunnel, IPv6 TCP fails at once (see netconfig.refuse_ipv6_tcp)."""
from __future__ import annotations

import re
import socket

import pytest
from pyroute2 import NetNS
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from conftest import sha_lines
from vpn_provider.sim.site import HTTP_NAME, INET_ADDR, INET_ADDR6, IPV6_ONLY_NAME, LOGIN_UP_ADDR6_BASE, XROOTD_NAME

pytestmark = pytest.mark.site

# IPv6 that is not TCP: a DNS query over UDP to the internet host. It goes through the tunnel
# where the gateway offers IPv6 (the login host has it); without a tunnel it has no route and
# must fail at once, not vanish.
_UDP6_OUT = ("python3 -c \"import errno, socket, time; t0 = time.monotonic()\n"
             "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(10)\n"
             "query = bytes.fromhex('beef01000001000000000000') + b'\\x02v6\\x03sim\\x04test\\x00'"
             " + bytes.fromhex('001c0001')\n"
             "try: s.sendto(query, ('2001:db8:10::1', 53)); answer = s.recv(512); "
             "print('udp6=answered' if answer[:2] == query[:2] and answer[7] else 'udp6=empty')\n"
             "except OSError as e: print('udp6=%s seconds=%.2f'"
             " % (errno.errorcode.get(e.errno, e), time.monotonic() - t0))\"")


@pytest.fixture(scope="module", params=["relay", "relay-only"])
def ipv6_run(request, site_env) -> dict:
    """One worker per mode: lookups, downloads by the IPv6-only name (HTTP, XRootD), the
    dual-stack name by each family, a DNS query over UDP by IPv6."""
    fetched = site_env.site.home / f"v6-{request.param}.bin"
    script = (f"echo v6_lookup; getent ahosts {IPV6_ONLY_NAME}; echo ds_lookup; getent ahosts {HTTP_NAME}; "
              f"curl -sS -f -o {fetched} http://{IPV6_ONLY_NAME}/big.bin && sha256sum {fetched}; rm -f {fetched}; "
              f"xrdcp -s -f root://{IPV6_ONLY_NAME}//data/big.bin - | sha256sum; "
              f"for family in any -4 -6; do echo ds_$family=$(curl -sS -f $([ $family = any ] || echo $family) "
              f"-o /dev/null -w '%{{remote_ip}}' http://{HTTP_NAME}/); done; {_UDP6_OUT}")
    done = site_env.exec_("sh", "-c", script, extra=("--tcp", request.param), timeout=180)
    assert done.returncode == 0, done.stderr
    assert "vpn-provider:" not in done.stderr, done.stderr  # no warning: IPv6 was set up
    out = done.stdout
    udp6, udp6_seconds = re.search(r"^udp6=(\S+)(?: seconds=([\d.]+))?", out, re.M).groups()
    return {"mode": request.param, "stdout": out, "stderr": done.stderr,
            "v6_lookup": out.split("v6_lookup\n")[1].split("ds_lookup\n")[0],
            "ds_lookup": out.split("ds_lookup\n")[1],
            "sha": sha_lines(out),
            **dict(re.findall(r"^(ds_\S+)=(\S*)", out, flags=re.M)),
            "udp6": udp6, "udp6_seconds": float(udp6_seconds or "inf")}


def test_an_ipv6_only_name_resolves_and_its_download_matches(ipv6_run, site_env):
    """The acceptance: fetch by an IPv6-only name through the VPN; the checksum matches."""
    assert re.search(rf"^{re.escape(INET_ADDR6)}\s+STREAM {IPV6_ONLY_NAME}$", ipv6_run["v6_lookup"], re.M), ipv6_run
    assert INET_ADDR not in ipv6_run["v6_lookup"]  # AAAA only
    assert ipv6_run["sha"] == [site_env.big_sha, site_env.big_sha], ipv6_run["stderr"]  # HTTP, XRootD


def test_a_dual_stack_name_works_by_both_families_and_prefers_ipv4(ipv6_run):
    """Both of www's addresses are listed and reached. Left to itself, an application takes IPv4
    first: where a login node has no IPv6, the relay could not reach the IPv6 address, and the
    application, its connection already accepted, would never try the other."""
    assert INET_ADDR in ipv6_run["ds_lookup"] and INET_ADDR6 in ipv6_run["ds_lookup"], ipv6_run
    assert ipv6_run["ds_-4"] == INET_ADDR and ipv6_run["ds_-6"] == INET_ADDR6, ipv6_run
    assert ipv6_run["ds_any"] == INET_ADDR, ipv6_run


def test_ipv6_that_is_not_tcp_takes_the_tunnel_or_fails_at_once(ipv6_run, site_env):
    if ipv6_run["mode"] == "relay-only":
        assert ipv6_run["udp6"] == "ENETUNREACH" and ipv6_run["udp6_seconds"] < 0.5, ipv6_run
    else:
        assert ipv6_run["udp6"] == "answered", ipv6_run
    assert site_env.leftovers() == set()


def test_with_tcp_in_the_tunnel_ipv6_tcp_fails_at_once_and_the_rest_goes_through(site_env):
    script = (f"echo ds=$(curl -sS -f -o /dev/null -w '%{{remote_ip}}' http://{HTTP_NAME}/); "
              f"t0=$(date +%s); curl -sS -m 20 -o /dev/null http://{IPV6_ONLY_NAME}/; "
              f"echo curl_v6=$? seconds=$(( $(date +%s) - t0 )); {_UDP6_OUT}")
    done = site_env.exec_("sh", "-c", script, extra=("--tcp", "tunnel"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"ds={INET_ADDR}\n" in done.stdout, done.stdout + done.stderr
    rc, seconds = map(int, re.search(r"curl_v6=(\d+) seconds=(\d+)", done.stdout).groups())
    assert rc == 7 and seconds <= 3, done.stdout + done.stderr  # refused by the kernel, not a time-out
    assert "udp6=answered" in done.stdout, done.stdout
    assert site_env.leftovers() == set()


@pytest.fixture
def login_without_ipv6(site_env):
    """The login host's IPv6 address and route taken away for one test (many login nodes have
    none): the relay then cannot reach any IPv6 destination."""
    site = site_env.site
    address = f"{LOGIN_UP_ADDR6_BASE}2"  # login host 0's
    with NetNS(site.login.ns) as ns:
        up = ns.link_lookup(ifname=f"{site.prefix}l0")[0]
        ns.route("del", dst="::/0", gateway=INET_ADDR6, family=socket.AF_INET6)
        ns.addr("del", index=up, address=address, prefixlen=64)
    try:
        yield
    finally:
        with NetNS(site.login.ns) as ns:
            ns.addr("add", index=up, address=address, prefixlen=64, flags=IFA_F_NODAD)
            ns.route("add", dst="::/0", gateway=INET_ADDR6, family=socket.AF_INET6)


@pytest.mark.parametrize("tcp", ["relay", "relay-only"])
def test_without_ipv6_on_the_login_node_dual_stack_names_still_work(site_env, login_without_ipv6, tcp):
    """Dual-stack names go by IPv4 (curl as glibc orders them; XRootD's client, which tries
    IPv6 first, moves on to IPv4), and an IPv6-only name fails at once with a reset."""
    script = (f"echo curl_ds=$(curl -sS -f -o /dev/null -w '%{{remote_ip}}' http://{HTTP_NAME}/); "
              f"xrdcp -s -f root://{XROOTD_NAME}//data/big.bin - | sha256sum; "
              f"t0=$(date +%s); curl -sS -m 20 -o /dev/null http://{IPV6_ONLY_NAME}/; "
              "echo curl_v6=$? seconds=$(( $(date +%s) - t0 ))")
    done = site_env.exec_("sh", "-c", script, extra=("--tcp", tcp), timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"curl_ds={INET_ADDR}\n" in done.stdout, done.stdout + done.stderr
    assert sha_lines(done.stdout) == [site_env.big_sha], done.stderr
    rc, seconds = map(int, re.search(r"curl_v6=(\d+) seconds=(\d+)", done.stdout).groups())
    assert rc == 56 and "reset" in done.stderr and seconds <= 3, done.stderr
    assert site_env.leftovers() == set()
