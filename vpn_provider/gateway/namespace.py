"""The gateway's namespace: a forked child that creates a user+net+mount namespace, waits for
the egress backend to attach, installs the destination policy for the tunnel
(forward_policy.py), then execs ocserv as root *of that namespace only*."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Sequence

from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .. import linux, proc
from ..errors import GatewayError
from ..policy import Policy
from . import forward_policy
from .credentials import open_file

log = logging.getLogger(__name__)

#: ocserv.log and the ocserv.log.1 before it each hold at most this much.
LOG_CAP = 8 << 20


class GatewayNamespace:
    def __init__(self, ocserv_argv: list[str], log_path: str, *, masquerade: bool = False,
                 policy: Policy = Policy(), host_addresses: Sequence[str] | None = None,
                 resolvers: Sequence[str] = (), egress_aliases: Sequence[str] = (), ipv6: bool = False,
                 ipv6_router: str | None = None, refusals_path: Path | None = None):
        """``policy``, ``resolvers`` and ``egress_aliases``: see forward_policy.install.
        ``host_addresses``: the login node's; None lists them at spawn, before the fork.
        ``ipv6``: forward the clients' IPv6 too, masqueraded, by ``ipv6_router`` if the egress
        does not route it itself. ``refusals_path``: where the tunnel's refusal counts go
        (forward_policy.DenialLog)."""
        self.ocserv_argv = ocserv_argv
        self.log_path = log_path
        self.masquerade = masquerade
        self.policy, self.host_addresses = policy, host_addresses
        self.resolvers, self.egress_aliases = resolvers, egress_aliases
        self.ipv6, self.ipv6_router = ipv6, ipv6_router
        self.refusals_path = refusals_path
        self.denial_log: forward_policy.DenialLog | None = None
        self.pid = 0

    def spawn(self) -> None:
        """Fork; return once the child is inside its new namespaces."""
        if self.host_addresses is None:  # here, in the login node's namespace, they can be listed
            self.host_addresses = forward_policy.login_node_addresses()
        log_fd = open_file(Path(self.log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        log_r, log_w = os.pipe()
        down_r, self._down_w = os.pipe()
        self._up_r, up_w = os.pipe()
        # The child sends the socket that receives the tunnel's refusals: only a socket opened in
        # the gateway's network namespace gets them, and we cannot enter it.
        self._denials_r, denials_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.pid = os.fork()
        if self.pid == 0:
            for fd in (self._down_w, self._up_r, log_r, log_fd):
                os.close(fd)
            self._denials_r.close()
            self._child(down_r, up_w, log_w, denials_w)
        for fd in (down_r, up_w, log_w):
            os.close(fd)
        denials_w.close()
        threading.Thread(target=copy_log_capped, args=(log_r, log_fd, Path(self.log_path)), daemon=True,
                         name="ocserv-log").start()
        self._expect(b"ns", "creating the gateway namespace")

    def release(self, extra_addresses: list[str] = ()) -> None:
        """Tell the child the egress is attached (and which ``ADDR/PREFIX``es to add to the
        egress link); return once ocserv has been exec'd."""
        os.write(self._down_w, " ".join(["go", *extra_addresses]).encode())
        os.close(self._down_w)
        # EOF without a word: the pipe closed on exec, so ocserv runs.
        self._expect(b"", "configuring the gateway namespace", timeout=45.0)
        os.close(self._up_r)
        self._start_denial_log()

    def _start_denial_log(self) -> None:
        with self._denials_r as denials_r:
            denials_r.setblocking(False)  # the child sent it before its exec, or never will
            try:
                why, fds, _, _ = socket.recv_fds(denials_r, 512, 1)
            except BlockingIOError:
                why, fds = b"", []
        if not fds:
            log.warning("refusals in the tunnel are not logged: %s", why.decode(errors="replace") or "no log socket")
            return
        os.set_inheritable(fds[0], False)
        self.denial_log = forward_policy.DenialLog(socket.socket(fileno=fds[0]), self.refusals_path)
        self.denial_log.start()

    def denials(self) -> dict[str, int]:
        """How many refusals in the tunnel were logged, per reason (the kernel logs at most
        forward_policy.LOG_RATE per second and reason)."""
        return dict(self.denial_log.counts) if self.denial_log else {}

    def _expect(self, want: bytes, step: str, timeout: float = 5.0) -> None:
        got = proc.read_message(self._up_r, timeout)
        if got is None:
            raise GatewayError(f"{step}: no answer within {timeout:g} s")
        if got.startswith(b"error:"):
            raise GatewayError(f"{step}: {got[6:].decode(errors='replace').strip()}")
        if got != want:
            raise GatewayError(f"{step}: the namespace process exited unexpectedly")

    def _child(self, down_r: int, up_w: int, log_w: int, denials_w: socket.socket) -> None:
        try:
            linux.die_with_parent()
            # uid 0 inside satisfies ocserv's root check. A non-zero gid inside makes ocserv's
            # workers skip setgroups(), which an unprivileged user namespace always refuses.
            linux.enter_user_namespace(inner_uid=0, inner_gid=os.getgid() or 1,
                                       flags=linux.CLONE_NEWNET | linux.CLONE_NEWNS)
            linux.make_mounts_private()
            if self.ipv6:  # before the egress' link exists: its router advertisements would
                # race our static route (and a namespace that forwards must not take them anyway)
                _sysctl("net/ipv6/conf/default/accept_ra", "0")
            from pyroute2 import IPRoute  # import after fork, inside the namespace
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                os.write(up_w, b"ns")
                go, *extra = os.read(down_r, 4096).decode().split()
                if go != "go":
                    os._exit(1)
                egress_if = _wait_default_route(ipr, timeout=10.0)
                egress_idx = ipr.link_lookup(ifname=egress_if)[0]
                for cidr in extra:
                    address, prefixlen = cidr.split("/")
                    ipr.addr("add", index=egress_idx, address=address, prefixlen=int(prefixlen),
                             **({"family": socket.AF_INET6, "flags": IFA_F_NODAD} if ":" in address else {}))
                if self.ipv6 and self.ipv6_router:
                    ipr.route("replace", dst="::/0", gateway=self.ipv6_router, oif=egress_idx,
                              family=socket.AF_INET6)
            _sysctl("net/ipv4/ip_forward", "1")
            if self.ipv6:
                _sysctl("net/ipv6/conf/all/forwarding", "1")
            # Answer ARP for client addresses on the egress link, so the egress backend can
            # deliver replies to VPN clients without NAT (no iptables needed).
            _sysctl(f"net/ipv4/conf/{egress_if}/proxy_arp", "1")
            # The kernel holds each proxy-ARP answer for a random 0-0.8 s (proxy_delay), so a
            # worker's first packet, and any after the egress forgets the client's address
            # (slirp4netns keeps 16), waited 0.4 s on average. Answer at once.
            _sysctl(f"net/ipv4/neigh/{egress_if}/proxy_delay", "0")
            if self.masquerade:
                proc.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", egress_if, "-j", "MASQUERADE"])
            self._install_policy(denials_w)
            # up_w's EOF on exec tells the parent we got this far.
            proc.exec_placed(self.ocserv_argv, {0: 0, 1: log_w, 2: log_w}, open_until_exec=(up_w,))
        except BaseException as e:  # report any failure to the parent, then die
            try:
                os.write(up_w, f"error: {e}".encode()[:250])
            finally:
                os._exit(1)

    def _install_policy(self, denials_w: socket.socket) -> None:
        try:
            forward_policy.install(self.policy, self.host_addresses, resolvers=self.resolvers,
                                   egress_aliases=self.egress_aliases, masquerade_ipv6=self.ipv6)
        except OSError as e:  # no policy, no tunnel: failing open would hand workers everything
            raise GatewayError(f"cannot install the destination policy (nftables): {e}") from None
        try:  # a policy without its log still protects: losing the log is only worth a warning
            with forward_policy.open_denial_log() as denials:
                socket.send_fds(denials_w, [b"log"], [denials.fileno()])
        except OSError as e:
            denials_w.send(str(e).encode()[:500])
        denials_w.close()


def copy_log_capped(pipe_r: int, log_fd: int, path: Path, cap: int = LOG_CAP) -> None:
    """Copy ocserv's output to its log until ocserv and its workers are gone. ocserv logs every
    login, and months of batch jobs would fill the home filesystem: past ``cap`` bytes the log
    becomes ``<name>.1`` (replacing the one before) and a new one starts."""
    size = os.fstat(log_fd).st_size
    while chunk := os.read(pipe_r, min(cap, 65536)):
        try:  # a full disk or a vanished state dir costs log lines, never a stalled ocserv
            if log_fd < 0 or size and size + len(chunk) > cap:
                if log_fd >= 0:
                    os.close(log_fd)
                    log_fd = -1
                    os.replace(path, path.with_name(path.name + ".1"))
                log_fd, size = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC), 0
            size += os.write(log_fd, chunk)
        except (OSError, GatewayError):
            pass
    os.close(pipe_r)
    if log_fd >= 0:
        os.close(log_fd)


def _wait_default_route(ipr, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            oif = route.get_attr("RTA_OIF")
            if oif:
                return ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
        time.sleep(0.02)
    raise GatewayError("egress gave the namespace no default route")


def _sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)
