"""Pure tests: openconnect output classified into one-line errors; ocserv.conf rendering."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vpn_provider.gateway import ocserv_conf
from vpn_provider.gateway.config import host_resolvers
from vpn_provider.worker.diagnose import classify

# Lines as openconnect 9.01 prints them (captured from the site tests).
LOGS = {
    "pin": ("POST https://198.19.20.1:8443/\nServer certificate verify failed: signer not found\n"
            "None of the 1 fingerprint(s) specified via --servercert match server's certificate: "
            "pin-sha256:abc=\nSSL connection failure: Error in the certificate.\n", "certificate does not match"),
    "secret": ("XML POST enabled\nLogin failed.\nPlease enter your password.\n"
               "User input required in non-interactive mode\nFailed to complete authentication\n", "rejected"),
    "refused": ("Failed to connect to 198.19.20.1:9: Connection refused\nFailed to connect to host 198.19.20.1\n",
                "connection refused"),
    "route": ("Failed to connect to 10.9.9.9:8443: No route to host\n", "no route"),
    "other": ("something odd happened\n", "openconnect failed (gw:1): something odd happened"),
}


@pytest.mark.parametrize("case", list(LOGS))
def test_classify(case):
    log, needle = LOGS[case]
    msg = str(classify(log, "gw:1"))
    assert needle in msg and "\n" not in msg


def test_ocserv_conf_for_user_namespace(tmp_path):
    text = ocserv_conf.render(ocserv_conf.OcservSettings(
        port=9443, pool=ipaddress.IPv4Network("100.64.0.0/16"), dns=("198.18.10.1",),
        server_cert=tmp_path / "s.pem", server_key=tmp_path / "k.pem", passwd_file=tmp_path / "p",
        run_dir=tmp_path))
    conf = dict(ln.split(" = ", 1) for ln in text.splitlines())
    assert conf["tcp-port"] == conf["udp-port"] == "9443"
    assert conf["compression"] == "false" and conf["max-same-clients"] == "0"
    assert "run-as-user" not in conf and "chroot-dir" not in conf
    assert conf["ipv4-network"] == "100.64.0.0" and conf["ipv4-netmask"] == "255.255.0.0"
    assert "ipv6-network" not in conf  # the login node has no IPv6: neither has the tunnel


def test_ocserv_conf_with_ipv6_gives_each_client_one_address(tmp_path):
    text = ocserv_conf.render(ocserv_conf.OcservSettings(
        port=9443, pool=ipaddress.IPv4Network("100.64.0.0/16"), dns=("198.18.10.1",),
        server_cert=tmp_path / "s.pem", server_key=tmp_path / "k.pem", passwd_file=tmp_path / "p",
        run_dir=tmp_path, pool6=ipaddress.IPv6Network("fd76:706e:7001::/64")))
    conf = dict(ln.split(" = ", 1) for ln in text.splitlines())
    assert conf["ipv6-network"] == "fd76:706e:7001::/64" and conf["ipv6-subnet-prefix"] == "128"


def test_host_resolvers_skips_loopback(tmp_path):
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 127.0.0.53\nnameserver 10.1.2.3\n# nameserver 9.9.9.9\nnameserver fe80::1%eth0\n")
    assert host_resolvers(str(rc)) == ["10.1.2.3"]
    assert host_resolvers(str(Path(tmp_path / "missing"))) == []


def test_a_preload_library_that_does_not_load_is_named(tmp_path):
    """The loader's own line (here from a real program and a file that is no library): openconnect
    would go on without the shim and fail later with an error that does not name it."""
    import subprocess
    broken = tmp_path / "_tunfd_preload.so"
    broken.write_text("not a shared object")
    loader = subprocess.run(["/bin/true"], env={"LD_PRELOAD": str(broken)}, capture_output=True, text=True).stderr
    msg = str(classify(loader + "Unrecoverable I/O error; exiting.\n", "gw:1"))
    assert msg.startswith(f"VPN tunnel failed: openconnect could not load the tun preload library {broken} (")
    assert "install vpn-provider from its wheel" in msg and "\n" not in msg
