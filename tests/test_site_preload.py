"""The preload transport on the simulated site: a compute node where user namespaces are off
(a user namespace around every process there whose max_user_namespaces is 0: sim/userns_off.py,
as `sysctl user.max_user_namespaces=0` or Ubuntu's AppArmor restriction leave a real node).
A plain `exec` chooses it by itself; curl, Python's urllib, xrdcp, the XRootD Python bindings, a
Work Queue worker and Parsl's HTEX workers fetch files by DNS name through the relay."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import VP, wait_until

pytestmark = pytest.mark.site

FETCH = {
    "curl": 'curl -sS -f {http}/big.bin | sha256sum | cut -d" " -f1',
    "urllib": "python3 -c 'import hashlib, urllib.request; "
              "print(hashlib.sha256(urllib.request.urlopen(\"{http}/big.bin\", timeout=30).read()).hexdigest())'",
    "xrdcp": 'xrdcp -s {xrootd}/data/big.bin - | sha256sum | cut -d" " -f1',
}


SOCKETS = """
import socket, sys
with socket.create_connection((sys.argv[1], 80), timeout=30) as s:
    print(socket.gethostbyname(sys.argv[1]), "%s:%d" % s.getpeername())
try:
    socket.create_connection((sys.argv[1], 9), timeout=30)
except OSError as e:
    print(type(e).__name__)
"""


def exec_off(site_env, *cmd, **kw):
    return site_env.exec_(*cmd, userns_off=True, **kw)


def test_where_user_namespaces_are_off_a_plain_exec_takes_preload(site_env):
    probe = site_env.site.run_user(site_env.node, ["unshare", "--user", "true"], userns_off=True)
    assert probe.returncode != 0 and "No space left on device" in probe.stderr  # as on such a node
    done = exec_off(site_env, "sh", "-c", FETCH["curl"].format(http=site_env.http_url))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == site_env.big_sha
    assert done.stderr.startswith("vpn-provider: transport preload (TCP and DNS only, for dynamically linked "
                                  "programs): user namespaces are off on this node (No space left on device)")


@pytest.mark.parametrize("program", sorted(FETCH))
def test_each_program_fetches_by_dns_name(site_env, program):
    done = exec_off(site_env, "sh", "-c", FETCH[program].format(http=site_env.http_url, xrootd=site_env.xrootd_url))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == site_env.big_sha
    assert site_env.leftovers() == set()


def test_errors_exit_status_and_signals_pass_through(site_env):
    host = site_env.http_url.removeprefix("http://")
    # connect() returns the relay's status as its errno; getpeername() names the destination
    sockets = exec_off(site_env, "python3", "-c", SOCKETS, host)
    assert sockets.returncode == 0, sockets.stderr
    address, peer, refused = sockets.stdout.split()
    assert address != "127.0.0.1" and peer == f"{address}:80" and refused == "ConnectionRefusedError"
    unknown = exec_off(site_env, "curl", "-sS", "http://no-such-host.sim.test/", "--max-time", "30")
    assert unknown.returncode == 6 and "Could not resolve host" in unknown.stderr
    assert exec_off(site_env, "sh", "-c", "exit 7").returncode == 7
    running = site_env.site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--", "sleep", "60"],
                                       userns_off=True, stderr=subprocess.PIPE)
    assert wait_until(lambda: len(site_env.leftovers(timeout=0)) >= 2, 30)  # sleep and its helper
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=30) == -signal.SIGTERM
    assert site_env.leftovers() == set()
