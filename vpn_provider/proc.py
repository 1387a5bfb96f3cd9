"""The one place external commands are run: argv is logged, failures raise CommandError.

Secrets are never passed in argv; callers hand them over with ``stdin``.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import time

from .errors import CommandError, MissingTool

log = logging.getLogger(__name__)

# Where the tools live on Debian, for users whose PATH lacks /usr/sbin.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

PACKAGES = {
    "ocserv": "ocserv",
    "occtl": "ocserv",
    "openconnect": "openconnect",
    "slirp4netns": "slirp4netns",
    "pasta": "passt",
    "openssl": "openssl",
    "iptables": "iptables",
}


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_EXTRA_PATH))


def find_tool(name: str) -> str:
    path = _which(name)
    if not path:
        raise MissingTool(name, PACKAGES.get(name, name))
    return path


def installed(name: str) -> bool:
    """Whether find_tool would find ``name``."""
    return _which(name) is not None


def run(argv: list[str], *, stdin: str | None = None, timeout: float = 30.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [find_tool(argv[0])] + list(argv[1:]) if "/" not in argv[0] else list(argv)
    log.debug("run: %s", " ".join(argv))
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, -1, f"timed out after {timeout:g} s") from e
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr or done.stdout)
    return done


def tool_version(name: str) -> str:
    """First line of a tool's version output, or '' if it has none we can read."""
    try:
        done = run([name, "--version"], timeout=5, check=False)
    except (MissingTool, CommandError):
        return ""
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0].strip() if text else ""


def terminate(pid: int, *, grace: float = 5.0, group: bool = False) -> None:
    """SIGTERM a process (or its group), then SIGKILL after ``grace`` seconds. Never raises."""
    kill = os.killpg if group else os.kill
    try:
        kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid, group):
            return
        time.sleep(0.05)
    try:
        kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int, group: bool) -> bool:
    # Reap what is our child, so a zombie does not count as alive.
    try:
        while True:
            reaped, _ = os.waitpid(-pid if group else pid, os.WNOHANG)
            if reaped == 0 or not group:
                break
    except ChildProcessError:
        pass
    try:
        (os.killpg if group else os.kill)(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def alive(pid: int, *, group: bool = False) -> bool:
    return _alive(pid, group)


def read_message(fd: int, timeout: float) -> bytes | None:
    """Read what is in a pipe within ``timeout``, up to a newline or EOF. None on time-out;
    b'' if the writer closed the pipe without a word."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return buf or None
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf
        buf += chunk
    return buf
