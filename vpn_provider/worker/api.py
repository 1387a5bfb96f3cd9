"""Python API for running commands in the VPN."""
from __future__ import annotations

import os
import subprocess
import sys

from ..transport import Transport, name
from . import DEFAULT_RECONNECT_TIMEOUT


def vpn_command(ticket: str | os.PathLike[str], argv: list[str], *, timeout: float = 15.0,
                tcp: Transport | str | None = None, reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT) -> list[str]:
    """The argv that runs ``argv`` inside the VPN: for subprocess, launchers and wrappers.
    ``tcp``: a Transport or its name, as ``vpn-provider exec --tcp``; None: chosen on the node;
    ``reconnect_timeout``: as ``exec --reconnect-timeout`` (0: wait for a gateway forever)."""
    # The ticket's path as given: exec expands ~ and $VARS on the host where it runs.
    return [sys.executable, "-m", "vpn_provider", "exec", "--ticket", os.fspath(ticket),
            "--timeout", f"{timeout:g}", "--tcp", name(Transport.parse(tcp)),
            "--reconnect-timeout", f"{reconnect_timeout:g}", "--", *argv]


def run(ticket: str | os.PathLike[str], argv: list[str], *, timeout: float = 15.0,
        tcp: Transport | str | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` inside the VPN and wait for it, like ``subprocess.run``.

    Exit status 125 means the tunnel could not be set up; stderr then holds one line saying why.
    """
    return subprocess.run(vpn_command(ticket, argv, timeout=timeout, tcp=tcp, reconnect_timeout=reconnect_timeout),
                          **kwargs)
