"""Parsl end to end on the simulated site: the DFK and interchange run on the login host as the
user; workers are started through VPNLauncher and read XRootD files by DNS name.

Debian's Slurm runs on the site (slurmctld on the login host, a slurmd per node: sim/slurm.py),
driven by Parsl's real SlurmProvider; everything else is real too: Parsl, the VPN, XRootD."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import wait_until

pytestmark = pytest.mark.site
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def run_driver(site_env, slurm, config: str, kwargs: dict, urls: list[str], timeout=240):
    # tests/support's alias of Debian's Work Queue module only where CCTools' own is missing
    support = [] if importlib.util.find_spec("ndcctools") else [str(REPO / "tests" / "support")]
    env = {"PATH": f"{slurm.bin_dir}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": ":".join([str(REPO), *support])}
    argv = [str(VENV_BIN / "python"), str(REPO / "tests" / "drivers" / "parsl_checksums.py"),
            "--config", config, "--kwargs", json.dumps(kwargs)]
    for u in urls:
        argv += ["--url", u]
    return site_env.site.run_user(site_env.site.login, argv, env=env, timeout=timeout, cwd=str(site_env.site.home))


def _results(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]


def test_htex_srun_fans_out_over_two_nodes_one_vpn_per_worker(site_env, slurm):
    """sbatch -N2, and SrunLauncher's srun starts a worker pool on each node, each in its own VPN."""
    run_dir = site_env.site.home / "runinfo-htex-slurm"
    kwargs = {"ticket": str(site_env.ticket), "partition": None, "account": None, "nodes": 2,
              "workers_per_node": 1, "worker_init": f"export PATH={VENV_BIN}:$PATH", "run_dir": str(run_dir)}
    urls = [f"{site_env.xrootd_url}/data/big.bin", f"{site_env.xrootd_url}/data/events.root"] * 2
    done = run_driver(site_env, slurm, "configs.slurm_htex", kwargs, urls)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(done.stdout)
    from vpn_provider.sim.data import sha256_of
    events = sha256_of(site_env.site.workdir / "www" / "events.root")
    assert [r["sha256"] for r in results] == [site_env.big_sha, events] * 2
    assert {r["default_route_dev"] for r in results} == {"vpn0"}
    assert {r["node"] for r in results} == {"node0", "node1"}
    assert site_env.leftovers(timeout=30) == set()


def test_htex_local_provider_config(site_env, slurm):
    run_dir = site_env.site.home / "runinfo-htex-local"
    kwargs = {"ticket": str(site_env.ticket), "workers": 1, "worker_init": f"export PATH={VENV_BIN}:$PATH",
              "run_dir": str(run_dir)}
    done = run_driver(site_env, slurm, "configs.sim_site", kwargs, [f"{site_env.xrootd_url}/data/big.bin"])
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = _results(done.stdout)
    assert result["sha256"] == site_env.big_sha and result["default_route_dev"] == "vpn0"
    assert site_env.leftovers(timeout=30) == set()


def test_wrong_ticket_reaches_the_parsl_user_as_a_vpn_error(site_env, slurm):
    data = json.loads(site_env.ticket.read_text())
    data["secret"] = "wrong-secret-0123456789"
    bad = site_env.write_ticket("parsl-bad.json", json.dumps(data))
    run_dir = site_env.site.home / "runinfo-htex-bad"
    kwargs = {"ticket": str(bad), "partition": None, "account": None, "nodes": 1, "workers_per_node": 1,
              "worker_init": f"export PATH={VENV_BIN}:$PATH", "run_dir": str(run_dir)}
    done = run_driver(site_env, slurm, "configs.slurm_htex", kwargs, [f"{site_env.xrootd_url}/data/big.bin"])
    assert done.returncode != 0
    assert "VPN tunnel failed: the gateway rejected the ticket's user or secret" in done.stderr
    assert wait_until(lambda: site_env.leftovers(timeout=1) == set(), 30)


def test_workqueue_executor_workers_through_launcher(site_env, slurm):
    """Parsl's WorkQueueExecutor through SlurmProvider, with CCTools' work_queue_worker from the
    venv (scripts/build-taskvine builds Work Queue with TaskVine)."""
    run_dir = site_env.site.home / "runinfo-wq"
    kwargs = {"ticket": str(site_env.ticket), "partition": None, "account": None, "port": 9125,
              "worker_init": f"export PATH={VENV_BIN}:$PATH", "run_dir": str(run_dir)}
    done = run_driver(site_env, slurm, "configs.slurm_workqueue", kwargs, [f"{site_env.xrootd_url}/data/big.bin"])
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = _results(done.stdout)
    assert result["sha256"] == site_env.big_sha and result["default_route_dev"] == "vpn0"
    assert site_env.leftovers(timeout=30) == set()
