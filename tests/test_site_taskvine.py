"""TaskVine end to end on the simulated site, with CCTools' own TaskVine (built from Debian's
cctools source package by scripts/build-taskvine) and the site's real Slurm: a manager on the
login host, VPN-wrapped vine_workers on the compute nodes that reach it, and XRootD by DNS name,
through the VPN. Managers always listen on a fixed port: with port 0, TaskVine names a project
and its workers would ask the public catalog server."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VP, taskvine_unavailable
from test_site_workqueue import LOGIN, finish, start_manager, urls_and_sums

pytestmark = [pytest.mark.site, pytest.mark.skipif(bool(taskvine_unavailable()), reason=taskvine_unavailable() or "")]
VENV_BIN = Path(sys.executable).parent


def start_vine_manager(site_env, port: int, urls: list[str]) -> subprocess.Popen:
    return start_manager(site_env, port, urls, driver="vine_manager.py", python=str(VENV_BIN / "python"))


def test_a_vpn_wrapped_vine_worker_reads_xrootd_for_a_manager_on_the_login_host(site_env):
    expected = urls_and_sums(site_env)
    mgr = start_vine_manager(site_env, 9141, list(expected))
    worker = site_env.site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--",
                                                      str(VENV_BIN / "vine_worker"), "--timeout", "60", LOGIN, "9141"],
                                      env={"PATH": f"{VENV_BIN}:/usr/bin:/bin"}, cwd=str(site_env.site.home),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = finish(mgr, ending=worker, timeout=180)
    assert {url: r["output"] for url, r in results.items()} == expected
    assert site_env.leftovers(timeout=15) == set()


def test_vine_factory_submits_vpn_wrapped_workers_to_slurm(site_env, slurm):
    """`vine_factory -T slurm --wrapper ... --wrapper-input TICKET`: the factory's jobs run the
    worker under `vpn-provider exec` in a sandbox that holds the ticket. (Parsl's TaskVine factory
    mode passes no wrapper: that is what the provider mode with VPNLauncher is for.)"""
    expected = urls_and_sums(site_env)
    mgr = start_vine_manager(site_env, 9142, list(expected))
    scratch = site_env.site.home / "vine-factory-scratch"
    factory = site_env.site.popen_user(
        site_env.site.login, [str(VENV_BIN / "vine_factory"), "-T", "slurm", "--min-workers", "1", "--max-workers", "1",
                              "--timeout", "60", "--scratch-dir", str(scratch), "--extra-options=--parent-death",
                              "--wrapper", f"{VP} exec --ticket ticket.json --",
                              "--wrapper-input", str(site_env.ticket), LOGIN, "9142"],
        env={"PATH": f"{slurm.bin_dir}:{VENV_BIN}:/usr/bin:/bin"}, cwd=str(site_env.site.home),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = finish(mgr, ending=factory, timeout=180, grace=60)
    assert {url: r["output"] for url, r in results.items()} == expected, factory.stderr.read()[-2000:]
    assert site_env.leftovers(timeout=30) == set()


def test_taskvine_executor_in_provider_mode_through_slurm_and_vpnlauncher(site_env, slurm):
    from test_site_parsl import _results, run_driver
    run_dir = site_env.site.home / "runinfo-taskvine"
    kwargs = {"ticket": str(site_env.ticket), "partition": None, "account": None, "address": LOGIN, "port": 9143,
              "worker_init": f"export PATH={VENV_BIN}:$PATH", "run_dir": str(run_dir)}
    expected = urls_and_sums(site_env)
    done = run_driver(site_env, slurm, "configs.taskvine_provider", kwargs, list(expected))
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(done.stdout)
    assert [r["sha256"] for r in results] == list(expected.values())
    assert {r["default_route_dev"] for r in results} == {"vpn0"}
    assert site_env.leftovers(timeout=30) == set()
