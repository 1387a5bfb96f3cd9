"""A worker that polls DNS and HTTP through the VPN every second, for the site tests of
restarts, crashes and failover (issue 8)."""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from conftest import VP, comm


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


class Poller:
    """A worker that looks up a name and fetches a page every second, printing
    '<unix time> <dns ok|fail> <http ok|fail>'; its lines are collected with their times."""

    def __init__(self, site, node, ticket: Path, mode: str, http_url: str):
        name = http_url.split("//")[1].split("/")[0]
        loop = (f"while :; do d=fail; h=fail; getent hosts {name} >/dev/null && d=ok; "
                f"curl -s -m 2 -o /dev/null {http_url}/hello.txt && h=ok; "
                "echo \"$(date +%s.%N) $d $h\"; sleep 1; done")
        self.mode = mode
        self.proc = site.popen_user(node, [VP, "exec", "--ticket", str(ticket), "--tcp", mode, "--", "sh", "-c", loop],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.polls: list[tuple[float, bool, bool]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            stamp, dns, http = line.split()
            self.polls.append((float(stamp), dns == "ok", http == "ok"))

    def ok_since(self, since: float) -> float | None:
        """Seconds from ``since`` to the first poll after it where both DNS and HTTP worked."""
        for stamp, dns, http in list(self.polls):
            if stamp > since and dns and http:
                return stamp - since
        return None

    def cmd_alive(self) -> bool:
        """CMD still runs as the very process we started: every step from `ip netns exec` to
        `vpn-provider exec` execs the next, so CMD has our child's pid."""
        return self.proc.poll() is None and comm(self.proc.pid) == "sh"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
