"""End-to-end on the simulated site: real ocserv, openconnect, slirp4netns, dnsmasq, XRootD.
The gateway and every `vpn-provider exec` run as an unprivileged user."""
from __future__ import annotations

import json
import os
import time
import re
import signal
import subprocess

import pytest

from conftest import VP, comm, gateway_ports, sha_lines, wait_until

pytestmark = pytest.mark.site


def test_node_cannot_reach_internet_without_vpn(site_env):
    site, node = site_env.site, site_env.node
    by_name = site.run_user(node, ["curl", "-sS", "-m", "5", "-o", "/dev/null", f"{site_env.http_url}/big.bin"])
    assert by_name.returncode != 0 and "resolve" in by_name.stderr
    by_ip = site.run_user(node, ["curl", "-sS", "-m", "5", "-o", "/dev/null", "http://198.18.10.1/big.bin"])
    assert by_ip.returncode != 0
    xrd = site.run_user(node, ["xrdcp", "-f", f"{site_env.xrootd_url}/data/big.bin", "/dev/null"], timeout=60)
    assert xrd.returncode != 0


@pytest.mark.parametrize("tcp", ["relay", "tunnel", "relay-only"])
def test_http_and_xrootd_200mb_through_vpn_by_dns_name(site_env, tcp):
    """Every TCP transport: the relay beside the tunnel (default), the encrypted tunnel, and the
    relay alone (names resolved through it too). The tun device's byte counter tells which one
    carried the data; relay-only has no tun device at all."""
    script = (f"curl -sS -f {site_env.http_url}/big.bin | sha256sum; "
              "t0=$(date +%s.%N); "
              f"xrdcp -s -f {site_env.xrootd_url}/data/big.bin - | sha256sum; "
              "t1=$(date +%s.%N); awk \"BEGIN{print \\\"xrootd_seconds=\\\" $t1 - $t0}\"; "
              "echo tun_rx_bytes=$(sed -n 's/^ *vpn0: *\\([0-9]*\\).*/\\1/p' /proc/net/dev)")
    done = site_env.exec_("sh", "-c", script, extra=("--tcp", tcp), timeout=180)
    assert done.returncode == 0, done.stderr
    assert sha_lines(done.stdout) == [site_env.big_sha, site_env.big_sha], done.stdout
    seconds = float(re.search(r"xrootd_seconds=([\d.]+)", done.stdout).group(1))
    # No DNS time-out may stall the read (FIELD-NOTES: a missing resolver cost 60 s per file).
    assert seconds < 10, f"XRootD read of 200 MB took {seconds:.1f} s"
    tun_rx = re.search(r"tun_rx_bytes=(\d*)", done.stdout).group(1)
    if tcp == "relay-only":
        assert tun_rx == "", "relay-only mode has no tun device"
    elif tcp == "relay":  # only DNS crossed the tunnel
        assert int(tun_rx) < 1_000_000, tun_rx
    else:
        assert int(tun_rx) > 400_000_000, tun_rx
    assert "TCP goes through the tunnel" not in done.stderr
    assert site_env.leftovers() == set()


def test_exit_status_passes_through(site_env):
    assert site_env.exec_("sh", "-c", "exit 7").returncode == 7
    assert site_env.exec_("true").returncode == 0
    assert site_env.leftovers() == set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cmd_and_tunnel(site_env, signum):
    site = site_env.site
    proc = site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--", "sleep", "300"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # `ip netns exec`, setpriv and env all exec, so proc.pid becomes vpn-provider, then sleep.
    try:
        assert wait_until(lambda: comm(proc.pid) == "sleep", 20), "CMD never started"
        assert site_env.gateway.tunnel_clients() == 1
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=10) == -signum
    finally:  # a failure here must not leave a worker behind for the tests after it
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert site_env.leftovers() == set()
    assert wait_until(lambda: site_env.gateway.tunnel_clients() == 0, 10)


def test_cmd_gets_default_signal_dispositions(site_env):
    """Python ignores SIGPIPE; CMD must not inherit that (pipelines would print 'Broken pipe')."""
    done = site_env.exec_("sh", "-c", "grep SigIgn /proc/self/status; yes | head -c 1 >/dev/null; echo rc=$?")
    assert done.returncode == 0, done.stderr
    assert "SigIgn:\t0000000000000000" in done.stdout and "Broken pipe" not in done.stderr


def test_ticket_with_several_addresses_uses_the_one_that_answers(site_env):
    """Login nodes have several addresses; a dead first one must not cost the time-out."""
    dead, _ = gateway_ports()
    site_env.site.drop(dead, "tcp")
    data = json.loads(site_env.ticket.read_text())
    data["gateways"] = [f"198.19.20.1:{dead}", "198.19.20.1:8443"]
    path = site_env.write_ticket("two-addresses.json", json.dumps(data))
    t0 = time.monotonic()
    assert site_env.exec_("true", ticket=path).returncode == 0
    assert time.monotonic() - t0 < 8


def test_dtls_to_a_second_address_of_a_multihomed_login_node(site_env):
    """A client that dials the login node's *other* address must get UDP answers from that
    address, or DTLS fails: the gateway binds one UDP socket per address for that reason."""
    from pyroute2 import NetNS
    with NetNS(site_env.node.ns) as ns:
        ns.route("add", dst="198.18.10.2/32", gateway="198.19.20.1")
    try:
        data = json.loads(site_env.ticket.read_text())
        data["gateways"] = ["198.18.10.2:8443"]
        path = site_env.write_ticket("upstream-address.json", json.dumps(data))
        log = site_env.site.home / "multihomed.log"
        t0 = time.monotonic()
        done = site_env.exec_("true", ticket=path, extra=("--log-file", str(log)))
        assert done.returncode == 0, done.stderr
        assert "Established DTLS connection" in log.read_text()
        assert time.monotonic() - t0 < 5
    finally:
        with NetNS(site_env.node.ns) as ns:
            ns.route("del", dst="198.18.10.2/32", gateway="198.19.20.1")


def test_dtls_is_the_default_data_channel(site_env):
    log = site_env.site.home / "dtls-default.log"
    done = site_env.exec_("true", extra=("--log-file", str(log)))
    assert done.returncode == 0, done.stderr
    assert "Established DTLS connection" in log.read_text()


def test_falls_back_to_tcp_when_udp_blocked(site_env, start_gateway):
    site = site_env.site
    gw = start_gateway("gw-udp-blocked")
    site.drop(gw.port, "udp")
    log = site.home / "udp-blocked.log"
    done = site_env.exec_("sh", "-c", f"curl -sS -f {site_env.http_url}/big.bin | sha256sum", ticket=gw.ticket,
                          extra=("--tcp", "tunnel", "--timeout", "40", "--log-file", str(log)), timeout=180)
    assert done.returncode == 0, done.stderr
    assert sha_lines(done.stdout) == [site_env.big_sha]
    text = log.read_text()
    assert "DTLS handshake failed" in text and "Established DTLS connection" not in text
    gw.stop()
    assert site_env.leftovers() == set()


def test_pasta_egress_carries_traffic(site_env, start_gateway):
    """The non-default egress: pasta needs NAT inside the gateway namespace (iptables)."""
    gw = start_gateway("gw-pasta", "--egress", "pasta")
    done = site_env.exec_("sh", "-c", f"curl -s {site_env.http_url}/big.bin | head -c 20971520 | wc -c",
                          ticket=gw.ticket, extra=("--tcp", "tunnel"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["20971520"]
    gw.stop()
    assert site_env.leftovers() == set()


def test_first_packet_of_a_new_worker_is_not_held_back(site_env, start_gateway):
    """slirp4netns asks (ARP) for each new client address, and the gateway answers by proxy ARP.
    The kernel delays such answers by a random 0-0.8 s unless told not to, which every worker's
    first packet used to pay. Three workers with fresh addresses: if the delay were back, all
    three would come in under 200 ms only once in 64 runs."""
    site = site_env.site
    gw = start_gateway("gw-first-packet")
    script = ("a=$(date +%s%N); getent hosts 198.18.10.1 >/dev/null; b=$(date +%s%N); "
              "echo first_ms=$(( (b - a) / 1000000 )); sleep 2")  # all three hold their address at once
    workers = [site.popen_user(site_env.node, [VP, "exec", "--ticket", str(gw.ticket), "--", "sh", "-c", script],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [w.communicate(timeout=60) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outs]
    first_ms = [int(re.search(r"first_ms=(\d+)", out).group(1)) for out, _ in outs]
    assert max(first_ms) < 200, first_ms
    gw.stop()
    assert site_env.leftovers() == set()
