"""Parsl integration: ``VPNLauncher`` starts each worker inside the VPN.

    from parsl.launchers import SrunLauncher
    from vpn_provider.parsl import VPNLauncher

    provider = SlurmProvider(..., launcher=VPNLauncher(SrunLauncher(), ticket="~/.vpn/ticket.json"))

It wraps the *worker command* and hands the result to the inner launcher, so srun or mpiexec
still fan out across nodes and every worker gets its own tunnel and namespace.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional, Union

import typeguard
from parsl.launchers import SingleNodeLauncher
from parsl.launchers.base import Launcher

from .transport import Transport, name
from .worker import DEFAULT_RECONNECT_TIMEOUT
from .worker.command import exec_command_text


class VPNLauncher(Launcher):
    """Wrap each worker in ``vpn-provider exec``.

    Parameters
    ----------
    launcher:
        The launcher that fans workers out (default ``SingleNodeLauncher()``).
    ticket:
        Path of ticket.json as seen on the compute nodes; ``~`` and ``$VARS`` are expanded there.
    timeout:
        Seconds a worker waits for its tunnel before failing with a one-line error (exit 125).
    executable:
        How compute nodes find vpn-provider (default: on PATH, e.g. after ``worker_init``).
    tcp:
        The transport (a ``Transport`` or its name); ``None`` or ``"auto"`` (default): the best
        each node and the gateway allow, chosen on the node: ``"relay"`` (the full-IP tunnel,
        TCP through the relay at the link's speed), else ``"relay-only"`` (no tunnel, only TCP
        and DNS, through the relay; smallest per worker), else, where user namespaces are off,
        ``"preload"`` (TCP and DNS through the relay, for dynamically linked programs).
        ``"tunnel"``: all traffic in the tunnel.
    reconnect_timeout:
        Seconds a running worker waits for a gateway to take its tunnel back after it went away,
        before the worker gets SIGTERM (default 600; 0: wait forever).
    """

    @typeguard.typechecked
    def __init__(self, launcher: Optional[Launcher] = None, ticket: Union[str, os.PathLike] = "~/.vpn/ticket.json",
                 timeout: float = 15.0, executable: str = "vpn-provider",
                 tcp: Union[str, Transport, None] = None,
                 reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT, debug: bool = True):
        super().__init__(debug=debug)
        self.launcher = launcher if launcher is not None else SingleNodeLauncher(debug=debug)
        self.ticket = ticket
        self.timeout = timeout
        self.executable = executable
        self.tcp = name(Transport.parse(tcp))  # its name: Parsl shows launchers by their arguments
        if not 0 <= reconnect_timeout < float("inf"):
            raise ValueError(f"reconnect_timeout must be >= 0 (0: forever), not {reconnect_timeout!r}")
        self.reconnect_timeout = reconnect_timeout

    def wrap(self, command: str) -> str:
        """The worker command as it runs inside the VPN."""
        prefix = [self.executable, "exec", "--ticket", os.fspath(self.ticket), "--timeout", f"{self.timeout:g}"]
        if Transport.parse(self.tcp):
            prefix += ["--tcp", self.tcp]
        if self.reconnect_timeout != DEFAULT_RECONNECT_TIMEOUT:
            prefix += ["--reconnect-timeout", f"{self.reconnect_timeout:g}"]
        return exec_command_text(prefix, command)

    def __call__(self, command: str, tasks_per_node: int, nodes_per_block: int, script_dir: str = "") -> str:
        wrapped = self.wrap(command)
        # Parsl releases before 2026.03.16 call launchers with three arguments only.
        if len(inspect.signature(self.launcher.__call__).parameters) >= 4:
            return self.launcher(wrapped, tasks_per_node, nodes_per_block, script_dir)
        return self.launcher(wrapped, tasks_per_node, nodes_per_block)
