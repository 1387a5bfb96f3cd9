"""Every example config in configs/ loads, wraps its workers in the VPN, and produces worker
command lines that reach `vpn-provider exec` intact. TaskVine's are CCTools' own bindings, built
by scripts/setup from Debian's source package (scripts/build-taskvine)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("parsl", reason="parsl is an optional dependency: pip install vpn-provider[parsl]")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if importlib.util.find_spec("ndcctools") is None:
    pytest.skip("no Work Queue bindings: neither ndcctools nor Debian's python3-workqueue",
                allow_module_level=True)

from conftest import taskvine_unavailable  # noqa: E402
from vpn_provider.parsl import VPNLauncher  # noqa: E402

VP = str(Path(sys.executable).parent / "vpn-provider")
needs_taskvine = pytest.mark.skipif(bool(taskvine_unavailable()), reason=taskvine_unavailable() or "")
CONFIGS = ["configs.sim_site", "configs.slurm_htex", "configs.slurm_workqueue",
           pytest.param("configs.taskvine_provider", marks=needs_taskvine)]


def dry_run(command_text: str) -> dict:
    """What `vpn-provider exec` would run for this line of a job script."""
    argv = shlex.split(command_text)
    assert argv[:2] == ["vpn-provider", "exec"], argv
    done = subprocess.run([VP, "exec", "--dry-run", *argv[2:]], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", CONFIGS)
def test_config_loads_and_wraps_workers_in_the_vpn(module):
    mod = importlib.import_module(module)
    executor = mod.config.executors[0]
    launcher = executor.provider.launcher
    assert isinstance(launcher, VPNLauncher) and launcher.ticket == mod.TICKET
    custom = mod.make_config(ticket="/shared/me/ticket.json").executors[0].provider.launcher
    assert custom.ticket == "/shared/me/ticket.json"


@pytest.mark.parametrize("module", ["configs.slurm_htex", "configs.slurm_workqueue",
                                    pytest.param("configs.taskvine_provider", marks=needs_taskvine)])
def test_slurm_configs_take_partition_and_account(module):
    provider = importlib.import_module(module).make_config(partition="gpu", account="cms").executors[0].provider
    assert provider.partition == "gpu" and provider.account == "cms"


@needs_taskvine
def test_taskvine_provider_mode_worker_command():
    mod = importlib.import_module("configs.taskvine_provider")
    executor = mod.make_config(ticket="~/.vpn/ticket.json", address="198.19.20.1", port=9124).executors[0]
    # What TaskVineExecutor.start() sets before it asks the provider for workers.
    executor.factory_config._project_address, executor.factory_config._project_port = "198.19.20.1", 9124
    executor.factory_config._project_name = None  # no catalog server: workers dial host and port
    executor._worker_command = executor._construct_worker_command()
    command = executor._get_launch_command(7)
    assert command.startswith("PARSL_WORKER_BLOCK_ID=7 vine_worker")
    script = executor.provider.launcher(command, 1, 1)
    line = next(ln for ln in script.splitlines() if "vpn-provider exec" in ln)
    report = dry_run(line.strip())
    assert report["env"] == {"PARSL_WORKER_BLOCK_ID": "7"}
    assert report["argv"] == shlex.split(command)[1:]
    assert report["argv"][-2:] == ["198.19.20.1", "9124"]


def test_vine_factory_wrapper_command_line():
    """`vine_factory --wrapper 'vpn-provider exec --ticket ticket.json --' --wrapper-input T`
    runs `<wrapper> ./vine_worker ...` in the worker's sandbox, where the ticket was copied."""
    worker = "./vine_worker 198.19.20.1 9124 -t 60 --parent-death"
    report = dry_run(f"vpn-provider exec --ticket ticket.json -- {worker}")
    assert report == {"ticket": "ticket.json", "env": {}, "argv": worker.split()}
