"""Python API for running commands in the VPN."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import DEFAULT_RECONNECT_TIMEOUT


def vpn_command(ticket: str | os.PathLike[str], argv: list[str], *, timeout: float = 15.0,
                tcp: str = "relay", reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT) -> list[str]:
    """The argv that runs ``argv`` inside the VPN: for subprocess, launchers and wrappers.
    ``tcp``: "relay", "tunnel" or "relay-only", as ``vpn-provider exec --tcp``;
    ``reconnect_timeout``: as ``exec --reconnect-timeout`` (0: wait for a gateway forever)."""
    return [sys.executable, "-m", "vpn_provider", "exec", "--ticket", str(Path(ticket).expanduser()),
            "--timeout", f"{timeout:g}", "--tcp", tcp, "--reconnect-timeout", f"{reconnect_timeout:g}",
            "--", *argv]


def run(ticket: str | os.PathLike[str], argv: list[str], *, timeout: float = 15.0, tcp: str = "relay",
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` inside the VPN and wait for it, like ``subprocess.run``.

    Exit status 125 means the tunnel could not be set up; stderr then holds one line saying why.
    """
    return subprocess.run(vpn_command(ticket, argv, timeout=timeout, tcp=tcp, reconnect_timeout=reconnect_timeout),
                          **kwargs)
