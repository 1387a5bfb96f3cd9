"""Parsl's own tests, through VPN workers on the simulated site's Slurm: its bash-app tests, the
ones that write files relative to the job's working directory among them (they failed with a
stand-in Slurm that started jobs elsewhere). They must pass as they do without the VPN."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.site
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOGIN = "198.19.20.1"


def test_parsl_s_bash_app_tests_pass_through_vpn_workers(site_env, slurm):
    pytest.importorskip("parsl.tests.test_bash_apps", reason="this Parsl ships without its tests")
    site = site_env.site
    workdir = site.home / "parsl-suite"
    site.run_user(site.login, ["mkdir", "-p", str(workdir)])
    env = {"PATH": f"{slurm.bin_dir}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "PARSL_SUITE_ADDRESS": LOGIN, "PARSL_SUITE_TICKET": str(site_env.ticket),
           "PARSL_SUITE_WORKER_INIT": f"export PATH={VENV_BIN}:$PATH"}
    done = site.run_user(site.login, [str(VENV_BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "--pyargs", "parsl.tests.test_bash_apps",
                                      "--config", str(REPO / "tests/drivers/parsl_suite_config.py")],
                         env=env, cwd=str(workdir), timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
    assert site_env.leftovers(timeout=30) == set()
