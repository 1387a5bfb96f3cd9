"""pasta (from passt): maps the namespace's traffic to host sockets without a TCP/IP stack of
its own. Debian 12's 2023 snapshot measured slow here (see docs), so ``auto`` picks pasta only
from its 2024 releases on."""
from __future__ import annotations

import re

from .. import proc
from ..errors import MissingTool
from .base import Egress, Forward


class Pasta(Egress):
    name = "pasta"
    dns_forwarder = None
    needs_nat = True  # pasta maps only the namespace's own address to host sockets

    @classmethod
    def version(cls) -> str:
        return proc.tool_version("pasta")

    @classmethod
    def is_supported(cls) -> tuple[bool, str]:
        try:
            proc.find_tool("pasta")
            proc.find_tool("iptables")
        except MissingTool as e:
            return False, str(e)
        return True, ""

    @classmethod
    def is_fast(cls) -> bool:
        """Releases from 2024 on dropped the per-packet overheads of the 2023 snapshot."""
        m = re.search(r"(20\d\d)[_-](\d\d)", cls.version())
        return bool(m) and (int(m.group(1)), int(m.group(2))) >= (2024, 1)

    def start(self, *, target_pid: int, forwards: list[Forward], ipv6: bool = False) -> list[str]:
        # --config-net copies the host's IPv6 address and default route too, when it has them.
        specs = []
        for proto in ("tcp", "udp"):
            eps = [ep for p, ep in forwards if p == proto]
            if not eps:
                continue
            # This pasta takes one spec per port: several addresses become the wildcard.
            host = "" if len(eps) > 1 or eps[0].host in ("0.0.0.0", "") else f"{eps[0].host}/"
            specs += ["-t" if proto == "tcp" else "-u", f"{host}{eps[0].port}:{eps[0].port}"]
        self.process = self._spawn(
            [proc.find_tool("pasta"), "--foreground", "--quiet", "--config-net",
             # Without this, the namespace's gateway address would be the host itself.
             "--no-map-gw",
             *specs, "-T", "none", "-U", "none",
             "--netns", f"/proc/{target_pid}/ns/net", "--userns", f"/proc/{target_pid}/ns/user",
             "--log-file", str(self.run_dir / "pasta.log")])
        # Readiness (address and default route) is awaited inside the namespace by the caller.
        return []
