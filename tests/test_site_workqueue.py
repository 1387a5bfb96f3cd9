"""Work Queue end to end on the simulated site, with Debian's real work_queue_worker,
work_queue_factory and Python bindings: the manager runs on the login host, workers run inside
the VPN on the compute node and reach the manager through it."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import VP

pytestmark = [pytest.mark.site, pytest.mark.skipif(not shutil.which("work_queue_worker"),
                                                   reason="Debian's coop-computing-tools is not installed")]
REPO = Path(__file__).resolve().parent.parent
LOGIN = "198.19.20.1"


def start_manager(site_env, port: int, urls: list[str], *, driver: str = "wq_manager.py",
                  python: str = "/usr/bin/python3") -> subprocess.Popen:
    """A manager on the login host (tests/drivers/DRIVER, Debian's python3 and its Work Queue
    module by default), in the user's home, once it listens."""
    argv = [python, str(REPO / "tests/drivers" / driver), str(port), *urls]
    mgr = site_env.site.popen_user(site_env.site.login, argv,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=str(site_env.site.home))
    line = mgr.stdout.readline()
    assert line.startswith("listening"), mgr.stderr.read()
    return mgr


def finish(mgr: subprocess.Popen, *, ending: subprocess.Popen, timeout=120, grace=15) -> dict:
    """The manager's results, once it is done; then ``ending`` (the workers' side: a worker or a
    factory) is terminated and waited for, also when the manager failed."""
    try:
        out, err = mgr.communicate(timeout=timeout)
    finally:
        ending.terminate()
        ending.wait(timeout=grace)
    assert mgr.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def urls_and_sums(site_env):
    from vpn_provider.sim.data import sha256_of
    events = site_env.site.workdir / "www" / "events.root"
    return {f"{site_env.xrootd_url}/data/big.bin": site_env.big_sha,
            f"{site_env.xrootd_url}/data/events.root": sha256_of(events)}


@pytest.mark.parametrize("tcp,port", [("relay", 9123), ("relay-only", 9125)])
def test_worker_wrapped_by_exec(site_env, tcp, port):
    """The default, and relay-only mode (no tunnel: the manager, XRootD and DNS all reached
    through the relay)."""
    expected = urls_and_sums(site_env)
    mgr = start_manager(site_env, port, list(expected))
    worker = site_env.site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--tcp", tcp, "--",
                                                      "work_queue_worker", "--timeout", "60", LOGIN, str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = finish(mgr, ending=worker)
    assert {url: r["output"] for url, r in results.items()} == expected
    assert site_env.leftovers(timeout=15) == set()


@pytest.mark.parametrize("batch,port", [("local", 9124), ("slurm", 9126)])
def test_workers_started_by_work_queue_factory_with_wrapper(site_env, request, batch, port):
    """`--wrapper-input` ships the ticket into each worker's sandbox; `--wrapper` prefixes the
    worker command. Workers run with --parent-death: since `exec` becomes the worker, its parent
    stays the factory's job shell, so it keeps running, and it exits when the factory ends it.
    -T local runs the factory on the node; -T slurm on the login host, submitting to the site's
    Slurm."""
    expected = urls_and_sums(site_env)
    mgr = start_manager(site_env, port, list(expected))
    scratch = site_env.site.home / f"factory-scratch-{batch}"
    host, env = site_env.node, None
    if batch == "slurm":
        slurm = request.getfixturevalue("slurm")
        host, env = site_env.site.login, {"PATH": f"{slurm.bin_dir}:/usr/bin:/bin"}
    factory = site_env.site.popen_user(
        host, ["work_queue_factory", "-T", batch, "--min-workers", "1", "--max-workers", "1",
               "--timeout", "60", "-S", str(scratch), "--extra-options=--parent-death",
               "--wrapper", f"{VP} exec --ticket ticket.json --",
               "--wrapper-input", str(site_env.ticket), LOGIN, str(port)],
        env=env, cwd=str(site_env.site.home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = finish(mgr, ending=factory, grace=30)
    assert {url: r["output"] for url, r in results.items()} == expected
    assert site_env.leftovers(timeout=20) == set()
