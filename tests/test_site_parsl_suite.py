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
    tests = pytest.importorskip("parsl.tests.test_bash_apps", reason="this Parsl ships without its tests")
    suite = Path(tests.__file__)
    site = site_env.site
    workdir = site.home / "parsl-suite"
    site.run_user(site.login, ["mkdir", "-p", str(workdir)])
    env = {"PATH": f"{slurm.bin_dir}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "PARSL_SUITE_ADDRESS": LOGIN, "PARSL_SUITE_TICKET": str(site_env.ticket),
           "PARSL_SUITE_WORKER_INIT": f"export PATH={VENV_BIN}:$PATH"}
    # A path, not --pyargs: parsl/tests/conftest.py (which adds --config) loads only as an
    # ancestor of the tests named; -c /dev/null keeps this project's pytest settings out.
    done = site.run_user(site.login, [str(VENV_BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "-c", "/dev/null", "--rootdir", str(suite.parent.parent), str(suite.parent),
                                      "--config", str(REPO / "tests/drivers/parsl_suite_config.py")],
                         env=env, cwd=str(workdir), timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    print(summary)
    assert " passed" in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 30, summary  # the suite ran, not skipped
    assert site_env.leftovers(timeout=30) == set()
