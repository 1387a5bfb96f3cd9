"""The example notebook, executed with nbclient on the simulated site: Coffea's Runner with
ParslExecutor, workers started by VPNLauncher(SrunLauncher()) on the compute nodes through the
site's Slurm, ROOT files read over XRootD by DNS name."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.site
pytest.importorskip("coffea", reason="the analysis extra is not installed: pip install vpn-provider[analysis]")
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
FILES, EVENTS_PER_FILE = 3, 40_000


@pytest.fixture(scope="module")
def dimuon_files(site_env):
    from vpn_provider.sim.data import nanoaod_file
    docroot = site_env.site.workdir / "www"
    names = []
    for i in range(FILES):
        nanoaod_file(docroot / f"dimuon_{i}.root", n_events=EVENTS_PER_FILE, seed=10 + i,
                     first_event=1 + i * EVENTS_PER_FILE)
        names.append(f"{site_env.xrootd_url}/data/dimuon_{i}.root")
    return names


def test_notebook_runs_coffea_over_xrootd_through_vpn_workers(site_env, dimuon_files, slurm):
    site, home = site_env.site, site_env.site.home
    png, executed = home / "dimuon_mass.png", home / "executed.ipynb"
    env = {"PATH": f"{slurm.bin_dir}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "VPN_TICKET": str(site_env.ticket),
           "DIMUON_FILES": " ".join(dimuon_files), "WORKERS": "2", "CHUNKSIZE": "20000",
           "DIMUON_PNG": str(png), "WORKER_INIT": f"export PATH={VENV_BIN}:$PATH", "MPLBACKEND": "Agg"}
    done = site.run_user(site.login, [str(VENV_BIN / "python"), "-m", "vpn_provider.sim.notebook", "execute",
                                      str(REPO / "notebooks" / "dimuon_xrootd.ipynb"), str(executed)],
                         env=env, timeout=600, cwd=str(home))
    assert done.returncode == 0, done.stderr[-4000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import nbformat
    cells = nbformat.read(str(executed), as_version=4).cells
    text = "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))
    assert f"{FILES * EVENTS_PER_FILE:,}" in text, text
    assert "SlurmProvider with SrunLauncher in the VPN" in text
    assert site_env.leftovers(timeout=30) == set()
