"""Parsl's own test suite's --config, for running its tests through VPN workers on the simulated
site's Slurm: HTEX with SlurmProvider and VPNLauncher(SrunLauncher()). The ticket and the
interchange's address come from the environment (tests/test_site_parsl_suite.py)."""
import os

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from vpn_provider.parsl import VPNLauncher


def fresh_config():
    return Config(
        executors=[HighThroughputExecutor(
            label="htex_slurm_vpn", address=os.environ["PARSL_SUITE_ADDRESS"], max_workers_per_node=2,
            provider=SlurmProvider(
                nodes_per_block=2, init_blocks=1, min_blocks=1, max_blocks=1, walltime="00:20:00",
                partition=None, account=None, cmd_timeout=60, worker_init=os.environ["PARSL_SUITE_WORKER_INIT"],
                launcher=VPNLauncher(SrunLauncher(), ticket=os.environ["PARSL_SUITE_TICKET"]),
            ),
        )],
    )
