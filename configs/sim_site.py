"""HTEX with LocalProvider: workers on this host, each inside its own VPN namespace.

This is the configuration of the simulated site (and of a workstation-sized test on a real
login node). Copy it, point TICKET at your gateway's ticket.json, and ``parsl.load(config)``.

The interchange runs where this config is loaded. Workers reach it through the VPN, so give
them a non-loopback address of this host (``address_by_route()``): the gateway refuses
connections to the login node's 127.0.0.1.
"""
from parsl.addresses import address_by_route
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SingleNodeLauncher
from parsl.providers import LocalProvider

from vpn_provider.parsl import VPNLauncher

TICKET = "~/.vpn/ticket.json"


def make_config(ticket: str = TICKET, address: str | None = None, workers: int = 2,
                worker_init: str = "", run_dir: str = "runinfo") -> Config:
    return Config(
        executors=[HighThroughputExecutor(
            label="htex_vpn",
            address=address or address_by_route(),
            max_workers_per_node=workers,
            provider=LocalProvider(
                launcher=VPNLauncher(SingleNodeLauncher(), ticket=ticket),
                init_blocks=1, max_blocks=1, worker_init=worker_init,
            ),
        )],
        run_dir=run_dir,
    )


config = make_config()
