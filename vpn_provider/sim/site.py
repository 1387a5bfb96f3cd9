"""A simulated HPC site built from network namespaces (needs root; the product never does).

    internet (DNS, HTTP, XRootD) --- login (gateway) --- node0..N (compute, no route out)

The login host routes to the internet host; compute nodes reach only the login host. Every
product process is run as a throwaway unprivileged user created for this site. Names are
unique per site, and ``close()`` removes namespaces, users and processes even after a failure.
"""
from __future__ import annotations

import dataclasses
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

INET_ADDR = "198.18.10.1"  # RFC 2544 benchmark space: never routed on a real network
LOGIN_UP_ADDR = "198.18.10.2"
LOGIN_DOWN_ADDR = "198.19.20.1"
NODE_ADDR_BASE = 10  # node i gets 198.19.20.(10+i)
DOMAIN = "sim.test"  # RFC 6761: reserved for testing
HTTP_NAME = f"www.{DOMAIN}"
XROOTD_NAME = f"xrootd.{DOMAIN}"


@dataclasses.dataclass(frozen=True)
class Host:
    ns: str
    addr: str


class Site:
    def __init__(self, *, nodes: int = 1, workdir: Path | None = None):
        if os.geteuid() != 0:
            raise PermissionError("building the simulated site needs root")
        self.id = secrets.token_hex(3)
        self.prefix = f"vp{self.id}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"vpn-site-{self.id}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.inet = Host(f"{self.prefix}-inet", INET_ADDR)
        self.login = Host(f"{self.prefix}-login", LOGIN_DOWN_ADDR)
        self.nodes = [Host(f"{self.prefix}-node{i}", f"198.19.20.{NODE_ADDR_BASE + i}") for i in range(nodes)]
        self.user = f"{self.prefix}u"
        self.home = self.workdir / "home"
        self._services: list[subprocess.Popen] = []
        self._built_ns: list[str] = []
        self._user_made = False
        self._owner_pid = os.getpid()  # forked children (pyroute2 forks) must never tear down

    # -- building -------------------------------------------------------------------------
    def build(self) -> "Site":
        try:
            self._make_user()
            for host in (self.inet, self.login, *self.nodes):
                netns.create(host.ns)
                self._built_ns.append(host.ns)
                with NetNS(host.ns) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            self._link(self.inet, f"{self.prefix}i", INET_ADDR, self.login, f"{self.prefix}l", LOGIN_UP_ADDR)
            for i, node in enumerate(self.nodes):
                self._link(self.login, f"{self.prefix}L{i}", LOGIN_DOWN_ADDR, node, f"{self.prefix}n{i}", node.addr)
            with NetNS(self.login.ns) as ns:
                ns.route("add", dst="0.0.0.0/0", gateway=INET_ADDR)
            # /etc/netns/NS/resolv.conf is bind-mounted by `ip netns exec`. Nodes point at the
            # login host, where no DNS server runs: lookups fail fast, as on an offline node.
            self._resolv(self.inet, INET_ADDR)
            self._resolv(self.login, INET_ADDR)
            for node in self.nodes:
                self._resolv(node, LOGIN_DOWN_ADDR)
            return self
        except BaseException:
            self.close()
            raise

    def _make_user(self) -> None:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(self.home), "--shell", "/bin/bash",
                        "--user-group", self.user], check=True, capture_output=True)
        self._user_made = True
        self.home.mkdir(mode=0o700, exist_ok=True)
        pw = pwd.getpwnam(self.user)
        os.chown(self.home, pw.pw_uid, pw.pw_gid)

    def _link(self, a: Host, a_if: str, a_addr: str, b: Host, b_if: str, b_addr: str) -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname=a_if, kind="veth", peer=b_if)
            ipr.link("set", index=ipr.link_lookup(ifname=a_if)[0], net_ns_fd=a.ns)
            ipr.link("set", index=ipr.link_lookup(ifname=b_if)[0], net_ns_fd=b.ns)
        for host, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            with NetNS(host.ns) as ns:
                idx = ns.link_lookup(ifname=ifname)[0]
                ns.addr("add", index=idx, address=addr, prefixlen=24)
                ns.link("set", index=idx, state="up")

    def _resolv(self, host: Host, nameserver: str) -> None:
        d = Path("/etc/netns") / host.ns
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")

    # -- running things ---------------------------------------------------------------------
    def as_root(self, host: Host, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.ns, *argv]

    def as_user(self, host: Host, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """argv that runs ``argv`` on ``host`` as the site's unprivileged user, clean environment."""
        base = {"HOME": str(self.home), "USER": self.user, "LOGNAME": self.user,
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        base.update(env or {})
        return ["ip", "netns", "exec", host.ns, "setpriv", f"--reuid={self.user}", f"--regid={self.user}",
                "--init-groups", "env", "-i", *(f"{k}={v}" for k, v in base.items()), *argv]

    def run_user(self, host: Host, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.as_user(host, argv, kw.pop("env", None)), timeout=timeout, **kw)

    def popen_user(self, host: Host, argv: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.as_user(host, argv, env), **kw)

    def start_service(self, host: Host, argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / f"{log_name}.log", "ab")
        p = subprocess.Popen(self.as_root(host, argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
        log.close()
        self._services.append(p)
        return p

    def user_pids(self) -> list[int]:
        uid = pwd.getpwnam(self.user).pw_uid
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid:
                        pids.append(int(entry))
                except FileNotFoundError:
                    pass
        return pids

    def drop(self, port: int, proto: str = "udp", *, undo: bool = False) -> None:
        """Silently drop ``proto`` traffic to ``port`` on the login host, as a site firewall might
        (``undo``: remove that rule again)."""
        subprocess.run(self.as_root(self.login, ["iptables", "-D" if undo else "-I", "INPUT", "-p", proto,
                                                 "--dport", str(port), "-j", "DROP"]), check=True, capture_output=True)

    # -- tearing down -------------------------------------------------------------------------
    def close(self) -> None:
        if os.getpid() != self._owner_pid:
            return
        for p in self._services:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self._services.clear()
        if self._user_made:
            for _ in range(50):
                pids = self.user_pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            subprocess.run(["userdel", self.user], capture_output=True)
            self._user_made = False
        for name in self._built_ns:
            try:
                netns.remove(name)
            except OSError:
                pass
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self._built_ns.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        # xrootd announces each instance (-n prefix) in /tmp, whatever its adminpath says.
        Path(f"/tmp/xrootd.{self.prefix}.env").unlink(missing_ok=True)

    @staticmethod
    def clean_up_on_sigterm() -> None:
        """Make SIGTERM unwind like Ctrl-C, so ``with Site()`` still tears the site down.
        Only in this process: pyroute2 forks helpers and ends them with SIGTERM, and a helper
        must then just die, not unwind into our code."""
        owner = os.getpid()

        def on_sigterm(signum, frame):
            if os.getpid() != owner:
                os._exit(128 + signum)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_sigterm)

    def __enter__(self) -> "Site":
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()
