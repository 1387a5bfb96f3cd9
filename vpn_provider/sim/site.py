"""A simulated HPC site built from network namespaces (needs root; the product never does).

    internet (DNS, HTTP, XRootD)          198.18.10.1, 2001:db8:10::1
        |  upstream bridge                198.18.10.0/24, 2001:db8:10::/64
    login0 [login1]                       198.18.10.(2+j), 2001:db8:10::(2+j) up, 198.19.20.(1+j) on the LAN
        |  LAN bridge                     198.19.20.0/24
    node0..N (compute, no route out)      198.19.20.(10+i)

IPv6 comes from the documentation prefix (RFC 3849), upstream only: the login hosts reach the
internet host over IPv6 as well, the nodes have no IPv6 route out (link-local addresses only).

As on a real cluster, the login hosts and the compute nodes share one LAN, so nodes reach
each other and every login host; only the login hosts route to the internet host. Both bridges
live in the site's own "switch" namespace, so the root namespace is never touched. Every
product process is run as a throwaway unprivileged user created for this site. Names are
unique per site, and ``close()`` removes namespaces, users and processes even after a failure.
Each host runs in a CPU control group of its own (cpu_share.py), so that, as on a real site, a
busy node does not starve the login host.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import NetNS, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .cpu_share import CpuShares

UPSTREAM = ipaddress.IPv4Network("198.18.10.0/24")  # RFC 2544 benchmark space: never routed on a real network
LAN = ipaddress.IPv4Network("198.19.20.0/24")  # the login hosts' and the compute nodes'
INET_ADDR = str(UPSTREAM[1])
LOGIN_UP_ADDR = str(UPSTREAM[2])  # login host j: 198.18.10.(2+j)
LOGIN_DOWN_ADDR = str(LAN[1])  # login host j: 198.19.20.(1+j)
NODE_ADDR_BASE = 10  # node i gets 198.19.20.(10+i)
MAX_LOGINS = NODE_ADDR_BASE - 1  # login LAN addresses must stay below the nodes'
INET_ADDR6 = "2001:db8:10::1"  # RFC 3849 documentation prefix: never routed anywhere
LOGIN_UP_ADDR6_BASE = "2001:db8:10::"  # login host j: 2001:db8:10::(2+j)
DOMAIN = "sim.test"  # RFC 6761: reserved for testing
HTTP_NAME = f"www.{DOMAIN}"  # dual-stack, as XROOTD_NAME
XROOTD_NAME = f"xrootd.{DOMAIN}"
IPV6_ONLY_NAME = f"v6.{DOMAIN}"  # the internet host, by an AAAA record alone


@dataclasses.dataclass(frozen=True)
class Host:
    ns: str
    addr: str


class Site:
    def __init__(self, *, nodes: int = 1, logins: int = 1, workdir: Path | None = None):
        if os.geteuid() != 0:
            raise PermissionError("building the simulated site needs root")
        if not 1 <= logins <= MAX_LOGINS or not 0 <= nodes <= 254 - NODE_ADDR_BASE:
            raise ValueError(f"need 1..{MAX_LOGINS} login hosts and 0..{254 - NODE_ADDR_BASE} nodes")
        self.id = secrets.token_hex(3)
        self.prefix = f"vp{self.id}"  # 8 characters: interface names below stay within IFNAMSIZ
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"vpn-site-{self.id}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.switch = f"{self.prefix}-switch"  # holds the bridges; no addresses, no processes
        self.inet = Host(f"{self.prefix}-inet", INET_ADDR)
        self.logins = [Host(f"{self.prefix}-login{j or ''}", str(LAN[1 + j])) for j in range(logins)]
        self.login = self.logins[0]
        self.nodes = [Host(f"{self.prefix}-node{i}", str(LAN[NODE_ADDR_BASE + i])) for i in range(nodes)]
        self.user = f"{self.prefix}u"
        self.home = self.workdir / "home"
        self._services: list[subprocess.Popen] = []
        self._built_ns: list[str] = []
        self._user_made = False
        self._owner_pid = os.getpid()  # forked children (pyroute2 forks) must never tear down
        self.cpu = CpuShares(f"vpn-site-{self.id}")

    # -- building -------------------------------------------------------------------------
    def build(self) -> "Site":
        try:
            self._make_user()
            for name in (self.switch, self.inet.ns, *(h.ns for h in self.logins), *(h.ns for h in self.nodes)):
                self._built_ns.append(name)  # before creating: close() must remove a half-made one too
                netns.create(name)
                self.cpu.add_host(name)
                with NetNS(name) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            lan, upstream = f"{self.prefix}lan", f"{self.prefix}up"
            with NetNS(self.switch) as sw:
                for bridge in (lan, upstream):
                    sw.link("add", ifname=bridge, kind="bridge")
                    sw.link("set", index=sw.link_lookup(ifname=bridge)[0], state="up")
            self._plug(upstream, self.inet, "i", INET_ADDR, INET_ADDR6)
            for j, login in enumerate(self.logins):
                self._plug(upstream, login, f"l{j}", str(UPSTREAM[2 + j]), f"{LOGIN_UP_ADDR6_BASE}{2 + j:x}")
                self._plug(lan, login, f"L{j}", login.addr)
                with NetNS(login.ns) as ns:
                    ns.route("add", dst="0.0.0.0/0", gateway=INET_ADDR)
                    ns.route("add", dst="::/0", gateway=INET_ADDR6, family=socket.AF_INET6)
            for i, node in enumerate(self.nodes):
                self._plug(lan, node, f"n{i}", node.addr)
            # /etc/netns/NS/resolv.conf is bind-mounted by `ip netns exec`. Nodes point at the
            # login host, where no DNS server runs: lookups fail fast, as on an offline node.
            self._resolv(self.inet, INET_ADDR)
            for login in self.logins:
                self._resolv(login, INET_ADDR)
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

    def _plug(self, bridge: str, host: Host, name: str, addr: str, addr6: str | None = None) -> None:
        """Cable ``host`` to ``bridge`` with a veth pair made in the switch namespace (so none
        ever appears in the root namespace): PREFIX+sNAME joins the bridge, PREFIX+NAME moves
        to ``host`` and gets ``addr``/24 (and ``addr6``/64)."""
        ifname, port = f"{self.prefix}{name}", f"{self.prefix}s{name}"
        with NetNS(self.switch) as sw:
            sw.link("add", ifname=port, kind="veth", peer=ifname)
            sw.link("set", index=sw.link_lookup(ifname=ifname)[0], net_ns_fd=host.ns)
            sw.link("set", index=sw.link_lookup(ifname=port)[0], master=sw.link_lookup(ifname=bridge)[0],
                    state="up")
        with NetNS(host.ns) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=idx, address=addr, prefixlen=24)
            if addr6:  # without duplicate address detection: usable at once, not in a second
                ns.addr("add", index=idx, address=addr6, prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=idx, state="up")

    def _resolv(self, host: Host, nameserver: str) -> None:
        d = Path("/etc/netns") / host.ns
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")

    # -- running things ---------------------------------------------------------------------
    def as_root(self, host: Host, argv: list[str]) -> list[str]:
        return self.cpu.wrap(host.ns, ["ip", "netns", "exec", host.ns, *argv])

    def as_user(self, host: Host, argv: list[str], env: dict[str, str] | None = None,
                hide: tuple[str, ...] = (), userns_off: bool = False) -> list[str]:
        """argv that runs ``argv`` on ``host`` as the site's unprivileged user, clean environment.
        ``hide``: programs this command and its children do not find, as on a host where they
        are not installed (/dev/null bound over every copy, in the mount namespace that
        `ip netns exec` gives each command). ``userns_off``: as on a node where user namespaces
        are off (sim/userns_off.py)."""
        base = {"HOME": str(self.home), "USER": self.user, "LOGNAME": self.user,
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        base.update(env or {})
        user = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups",
                "env", "-i", *(f"{k}={v}" for k, v in base.items()), *argv]
        if userns_off:
            user = [sys.executable, "-m", "vpn_provider.sim.userns_off", *user]
        if hide:
            dirs = dict.fromkeys((*base["PATH"].split(":"), "/usr/sbin", "/sbin", "/usr/bin", "/bin"))
            copies = [os.path.join(d, tool) for tool in hide for d in dirs if os.path.exists(os.path.join(d, tool))]
            script = "".join(f"mount --bind /dev/null '{path}' && " for path in copies) + 'exec "$@"'
            user = ["sh", "-c", script, "sh", *user]
        return self.as_root(host, user)

    def run_user(self, host: Host, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        command = self.as_user(host, argv, kw.pop("env", None), kw.pop("hide", ()), kw.pop("userns_off", False))
        return subprocess.run(command, timeout=timeout, **kw)

    def popen_user(self, host: Host, argv: list[str], env: dict[str, str] | None = None,
                   hide: tuple[str, ...] = (), userns_off: bool = False, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.as_user(host, argv, env, hide, userns_off), **kw)

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
        self.cpu.remove()
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
