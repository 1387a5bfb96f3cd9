"""Each simulated host gets its fair share of this machine's CPU, as if it were a machine of its own.

Without this, every process of every host competes as an equal: a burst of 256 workers on the
nodes leaves the login host's gateway one task in a thousand, its handshakes and DNS answers
wait seconds for the CPU, and a test measures a site no real cluster is (a login node has its
own cores). With one CPU control group per host, of equal weight, the gateway keeps at least a
host's share however many workers the nodes run.

Needs the cgroup v1 ``cpu`` controller writable by root (as on the test machines). Where it is
not, hosts share the CPU as plain processes and ``CpuShares.available`` is False.
"""
from __future__ import annotations

import errno
import time
from pathlib import Path

CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")


class CpuShares:
    def __init__(self, site_name: str):
        self.root = CPU_CONTROLLER / site_name
        try:
            self.root.mkdir(exist_ok=True)
            self.available = True
        except OSError:  # no v1 cpu controller, read-only, or not ours to change
            self.available = False
        self._groups: list[Path] = []

    def add_host(self, name: str) -> None:
        if self.available:
            group = self.root / name
            group.mkdir(exist_ok=True)
            self._groups.append(group)

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run in host ``name``'s group (same pid: the shell joins, then execs)."""
        if not self.available:
            return argv
        return ["sh", "-c", 'echo $$ > "$0"; exec "$@"', str(self.root / name / "cgroup.procs"), *argv]

    def remove(self) -> None:
        """After the site's processes are gone: a group with a task in it cannot be removed yet
        (a killed process leaves it a moment later), so each is tried for up to a second."""
        if not self.available:
            return
        for group in [*self._groups, self.root]:
            for _ in range(20):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.05)
        self._groups.clear()
