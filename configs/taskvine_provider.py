"""TaskVineExecutor with ``worker_launch_method='provider'``: workers in Slurm jobs, in the VPN.

Only the *provider* launch method goes through a Parsl launcher. TaskVine's *factory* mode
starts workers through ``vine_factory`` and never passes a wrapper to it, so VPNLauncher cannot
act there: with the factory, run ``vine_factory --wrapper 'vpn-provider exec --ticket T --'``
yourself (see docs/workflows.md).

Copy this file, set TICKET, PARTITION and ACCOUNT, then ``parsl.load(config)`` on the login
node. Needs CCTools' Python bindings (``ndcctools.taskvine``, from conda-forge ``ndcctools``).
"""
from parsl.config import Config
from parsl.executors.taskvine import TaskVineExecutor, TaskVineManagerConfig
from parsl.launchers import SingleNodeLauncher
from parsl.providers import SlurmProvider

from vpn_provider.parsl import VPNLauncher

TICKET = "~/.vpn/ticket.json"
PARTITION = "compute"
ACCOUNT = "my-account"
WORKER_INIT = "source ~/venvs/analysis/bin/activate"


def make_config(ticket: str = TICKET, partition: str | None = PARTITION, account: str | None = ACCOUNT,
                worker_init: str = WORKER_INIT, address: str | None = None, port: int = 9124,
                run_dir: str = "runinfo") -> Config:
    from parsl.addresses import address_by_route
    return Config(
        executors=[TaskVineExecutor(
            label="vine_slurm_vpn",
            worker_launch_method="provider",
            manager_config=TaskVineManagerConfig(address=address or address_by_route(), port=port),
            provider=SlurmProvider(
                partition=partition, account=account, nodes_per_block=1,
                init_blocks=1, max_blocks=4, walltime="01:00:00", worker_init=worker_init,
                launcher=VPNLauncher(SingleNodeLauncher(), ticket=ticket),
            ),
        )],
        run_dir=run_dir,
    )


config = make_config()
