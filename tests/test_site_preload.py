"""The preload transport on the simulated site: a compute node where user namespaces are off
(a user namespace around every process there whose max_user_namespaces is 0: sim/userns_off.py,
as `sysctl user.max_user_namespaces=0` or Ubuntu's AppArmor restriction leave a real node).
A plain `exec` chooses it by itself; curl, Python's urllib, xrdcp, the XRootD Python bindings, a
Work Queue worker and Parsl's HTEX workers fetch files by DNS name through the relay."""
from __future__ import annotations

import os
import signal
import subprocess

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
    running = site_env.site.popen_user(site_env.node,
                                       [VP, "exec", "--ticket", str(site_env.ticket), "--", "sleep", "60"],
                                       userns_off=True, stderr=subprocess.PIPE)
    assert wait_until(lambda: len(site_env.leftovers(timeout=0)) >= 2, 30)  # sleep and its helper
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=30) == -signal.SIGTERM
    assert site_env.leftovers() == set()


STRANGER = """
import socket, struct, sys, time
port, target = int(sys.argv[1]), socket.inet_aton(sys.argv[2])
request = b"C" + bytes(10) + b"\\xff\\xff" + target + struct.pack("!H", 80)
print("ready", flush=True)
made = answered = 0
until = time.monotonic() + float(sys.argv[3])
while time.monotonic() < until:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        made += 1
        s.sendall(request)
        answered += len(s.recv(1)) > 0
    except OSError:
        pass
    finally:
        s.close()
print(made, answered)
"""


def test_a_stranger_on_the_node_can_neither_use_nor_jam_the_preload_listener(site_env):
    """The helper's listener is on the node's loopback, open to every user there: another user's
    connections (root's here) are reset unanswered, at once, and the job's own go on meanwhile."""
    from conftest import root_helper
    fetch = FETCH["curl"].format(http=site_env.http_url)
    job = site_env.site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--", "sh", "-c",
                                                   f'echo "$VPNP_RELAY_PORTS"; sleep 1; {fetch}'],
                                   userns_off=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(job.stdout.readline().split(",")[0])
    stranger = root_helper(site_env.site, site_env.node, STRANGER, str(port), site_env.site.inet.addr, "8")
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert out.strip() == site_env.big_sha  # fetched while the stranger hammered the same listener
    assert "refused a connection to the preload listener from user 0" in err
    made, answered = map(int, stranger.communicate(timeout=30)[0].split())
    assert made > 100 and answered == 0
    assert site_env.leftovers() == set()


def test_a_work_queue_worker_fetches_through_preload(site_env):
    import shutil

    from test_site_workqueue import finish, start_manager, urls_and_sums
    if not shutil.which("work_queue_worker"):
        pytest.skip("Debian's coop-computing-tools is not installed")
    expected = urls_and_sums(site_env)
    mgr = start_manager(site_env, 9129, list(expected))
    worker = site_env.site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--",
                                                      "work_queue_worker", "--timeout", "60", "198.19.20.1", "9129"],
                                      userns_off=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = finish(mgr, ending=worker)
    assert {url: r["output"] for url, r in results.items()} == expected
    assert site_env.leftovers(timeout=15) == set()


def test_parsl_htex_workers_fetch_through_preload(site_env):
    """Parsl's real SlurmProvider and VPNLauncher, on a second Slurm cluster whose slurmd's (and
    so every job) run where user namespaces are off."""
    from test_site_parsl import _results, run_driver

    from vpn_provider.sim.data import sha256_of
    from vpn_provider.sim.slurm import SlurmCluster, missing_programs
    if missing_programs():
        pytest.skip(f"Slurm is not installed ({', '.join(missing_programs())}); scripts/setup installs it")
    slurm = SlurmCluster(site_env.site, name="slurm-userns-off", port=6827, userns_off=True).start()
    try:
        kwargs = {"ticket": str(site_env.ticket), "partition": None, "account": None, "nodes": 1,
                  "workers_per_node": 2, "worker_init": f"export PATH={os.path.dirname(VP)}:$PATH",
                  "run_dir": str(site_env.site.home / "runinfo-htex-preload")}
        urls = [f"{site_env.xrootd_url}/data/big.bin", f"{site_env.xrootd_url}/data/events.root"]
        done = run_driver(site_env, slurm, "configs.slurm_htex", kwargs, urls)
    finally:
        slurm.close()
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(done.stdout)
    events = sha256_of(site_env.site.workdir / "www" / "events.root")
    assert [r["sha256"] for r in results] == [site_env.big_sha, events]
    assert "vpn0" not in {r["default_route_dev"] for r in results}  # no namespace: the node's own route
    assert site_env.leftovers(timeout=30) == set()


def test_check_names_the_transport_and_the_programs_it_reaches(site_env):
    check = site_env.vp(site_env.node, "check", "--ticket", str(site_env.ticket), "--dns-name", "www.sim.test",
                        "--program", "/sbin/ldconfig", timeout=90, userns_off=True)
    rows = {ln.split("  ")[0]: ln for ln in check.stdout.splitlines()}
    assert check.returncode == 0, check.stdout
    assert " warn " in rows["user namespaces"] and "off (No space left on device)" in rows["user namespaces"]
    reached, not_reached = rows["programs (preload)"].split("reached: ", 1)[1].split("; NOT reached: ")
    assert {"curl", "python3", "xrdcp", "work_queue_worker"} <= set(reached.split(", "))
    assert not_reached.startswith("/sbin/ldconfig (statically linked")
    assert "exec takes preload (user namespaces are off on this node" in rows["transports"]
    assert " ok " in rows["preload worker"] and " ok " in rows["DNS through the relay (www.sim.test)"]
