"""Run a command as on a node where user namespaces are off (``user.max_user_namespaces=0``).

For the simulated site, as root: ``python -m vpn_provider.sim.userns_off CMD...`` moves this
process into a user namespace of its own that maps every id to itself, so CMD's users and
files look as before, and sets that namespace's ``max_user_namespaces`` to 0. CMD, and every
process it starts, then fails to create a user namespace with ENOSPC, as on such a site. The
process keeps its pid, so signals sent to it reach CMD.
"""
from __future__ import annotations

import os
import sys

from .. import linux

_IDENTITY = "0 0 4294967295\n"  # every id, as itself


def enter() -> None:
    # Only a process outside the new namespace may write its maps: a child, still root here.
    ready, go = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(go)
        os.read(ready, 1)
        parent = os.getppid()
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{parent}/{name}", "w") as f:
                f.write(_IDENTITY)
        os._exit(0)
    os.close(ready)
    linux.unshare(linux.CLONE_NEWUSER)
    os.write(go, b".")
    os.close(go)
    if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) != 0:
        raise OSError("userns_off: the id maps could not be written")
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m vpn_provider.sim.userns_off CMD [ARGS...]")
    enter()
    os.execvp(sys.argv[1], sys.argv[1:])
