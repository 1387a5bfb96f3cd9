"""The one place programs are started, in three ways:

- ``run``: a command that ends; argv is logged, a failure raises CommandError;
- ``spawn``: a long-lived child with its output in a log (the egress, the relay, a detached
  gateway), ended with ``terminate``;
- ``exec_placed``: in a child we forked ourselves because it must change first (enter
  namespaces, leave the process group), the exec, with exactly the descriptors it is given.

Secrets are never passed in argv; callers hand them over on stdin or a socket (docs/design.md,
"Conventions between our processes").
"""
from __future__ import annotations

import fcntl
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from typing import NoReturn

from . import linux
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


def spawn(argv: list[str], *, output: int, stdin: int = subprocess.DEVNULL, pass_fds: tuple[int, ...] = (),
          detached: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr on the descriptor ``output`` and, of our descriptors,
    only ``pass_fds`` (Popen closes the rest). It gets SIGTERM when we die, even by SIGKILL (its
    parent-death signal), so no helper outlives the gateway; ``detached`` instead makes it the
    leader of a session of its own that outlives us (a gateway started in the background)."""
    log.debug("spawn: %s", " ".join(argv))
    return subprocess.Popen(argv, stdin=stdin, stdout=output, stderr=output, pass_fds=pass_fds,
                            preexec_fn=None if detached else linux.die_with_parent,
                            start_new_session=detached,
                            cwd="/" if detached else None)  # a detached child holds no directory busy


def exec_placed(argv: list[str], descriptors: dict[int, int], *, env: dict[str, str] | None = None,
                open_until_exec: tuple[int, ...] = ()) -> NoReturn:
    """In a forked child: exec ``argv`` with descriptor ``source`` on number ``target`` for each
    ``target: source`` in ``descriptors``, and every other descriptor closed, whatever this
    process inherited (a wrapper's pipes must not be held open by a daemon). ``open_until_exec``
    stay open until the exec itself closes them: a pipe whose EOF tells the parent that the exec
    happened, or that still carries the error if it fails. Default signal dispositions are
    restored. Raises OSError if the exec fails; the caller must then ``os._exit``."""
    above = max(descriptors, default=-1) + 1
    # Lift every source above the targets first: a source may sit on another's target, or on
    # its own (where dup2 would do nothing and leave close-on-exec set).
    lifted = {target: fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, above) for target, source in descriptors.items()}
    for target, source in lifted.items():
        os.dup2(source, target)  # the copy is inheritable
    kept = set(open_until_exec) - set(descriptors)
    for fd in kept:
        os.set_inheritable(fd, False)
    for fd in set(range(above)) - set(descriptors) - kept:  # gaps between the targets
        os.closerange(fd, fd + 1)  # quietly, open or not
    start = above
    for fd in sorted(fd for fd in kept if fd >= above):
        os.closerange(start, fd)
        start = fd + 1
    # close_range(2) makes this one call; without it (kernels before 5.9) 64 Ki closes, a few ms.
    os.closerange(start, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))
    linux.restore_default_signals()
    if env is None:
        os.execv(argv[0], argv)
    os.execve(argv[0], argv, env)


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
