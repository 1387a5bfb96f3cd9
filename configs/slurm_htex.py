"""Slurm + HTEX + srun: one block of NODES nodes, one VPN-wrapped worker pool per node.

Copy this file, set TICKET, PARTITION and ACCOUNT (and WORKER_INIT to activate the Python
environment that has vpn-provider and parsl on the compute nodes), then ``parsl.load(config)``
on the login node, next to the running gateway.

``VPNLauncher`` wraps each worker, not the batch script: srun still fans out across nodes, and
every worker gets its own tunnel. Workers reach the interchange through the VPN, so ``address``
must be an address of the login node other than 127.0.0.1 (``address_by_route()`` is one).
"""
from parsl.addresses import address_by_route
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from vpn_provider.parsl import VPNLauncher

TICKET = "~/.vpn/ticket.json"
PARTITION = "compute"
ACCOUNT = "my-account"
WORKER_INIT = "source ~/venvs/analysis/bin/activate"
NODES = 2


def make_config(ticket: str = TICKET, partition: str | None = PARTITION, account: str | None = ACCOUNT,
                worker_init: str = WORKER_INIT, nodes: int = NODES, address: str | None = None,
                workers_per_node: int = 4, run_dir: str = "runinfo") -> Config:
    return Config(
        executors=[HighThroughputExecutor(
            label="htex_slurm_vpn",
            address=address or address_by_route(),
            max_workers_per_node=workers_per_node,
            provider=SlurmProvider(
                partition=partition, account=account, nodes_per_block=nodes,
                init_blocks=1, max_blocks=1, walltime="01:00:00", worker_init=worker_init,
                launcher=VPNLauncher(SrunLauncher(), ticket=ticket),
            ),
        )],
        run_dir=run_dir,
    )


config = make_config()
