"""Slurm + WorkQueueExecutor: Parsl starts ``work_queue_worker``s in Slurm jobs, inside the VPN.

Copy this file, set TICKET, PARTITION and ACCOUNT, then ``parsl.load(config)`` on the login node.
Parsl prefixes each worker with ``PARSL_WORKER_BLOCK_ID=<id>``; VPNLauncher passes that on as
an environment assignment. The manager listens on this host; workers reach it through the VPN
at ``address`` (not 127.0.0.1). For PBS, swap SlurmProvider for PBSProProvider.

Needs CCTools' Python bindings (``ndcctools.work_queue``, from conda-forge ``ndcctools``).
"""
from parsl.addresses import address_by_route
from parsl.config import Config
from parsl.executors import WorkQueueExecutor
from parsl.launchers import SingleNodeLauncher
from parsl.providers import SlurmProvider

from vpn_provider.parsl import VPNLauncher

TICKET = "~/.vpn/ticket.json"
PARTITION = "compute"
ACCOUNT = "my-account"
WORKER_INIT = "source ~/venvs/analysis/bin/activate"


def make_config(ticket: str = TICKET, partition: str | None = PARTITION, account: str | None = ACCOUNT,
                worker_init: str = WORKER_INIT, address: str | None = None, port: int = 9123,
                run_dir: str = "runinfo") -> Config:
    return Config(
        executors=[WorkQueueExecutor(
            label="wq_slurm_vpn",
            address=address or address_by_route(),
            port=port,
            provider=SlurmProvider(
                partition=partition, account=account, nodes_per_block=1,
                init_blocks=1, max_blocks=4, walltime="01:00:00", worker_init=worker_init,
                launcher=VPNLauncher(SingleNodeLauncher(), ticket=ticket),
            ),
        )],
        run_dir=run_dir,
    )


config = make_config()
