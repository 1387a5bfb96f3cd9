"""Bring the tunnel up for one command, then become that command.

Sequence (every step unprivileged):
  1. fork openconnect's process while we are still in the host's network namespace;
  2. enter a new user+network+mount namespace and create the tun device there;
  3. pass the tun fd to openconnect (SCM_RIGHTS); a preload shim makes openconnect use it;
  4. wait for openconnect's script to report the tunnel parameters (the readiness handshake);
  5. configure addresses, routes, MTU and DNS with pyroute2 and a bind-mounted resolv.conf;
  6. exec CMD in place of this process, so its exit status and signals pass straight through.
openconnect stays CMD's child with a parent-death signal: when CMD ends, the tunnel ends.
The relay's helper (``relay_helper``) is forked before step 2 and lives the same way.

In relay-only mode steps 1, 3 and 4 are skipped: no tun device, no openconnect; the namespace's
TCP and DNS go to the relay helper alone.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import ipaddress
import logging
import os
import select
import shutil
import socket
import time
from pathlib import Path
from typing import NoReturn

from .. import linux, proc
from ..errors import TunnelError
from ..relay import TCP_TRANSPORTS
from ..relay.protocol import relay_key
from ..ticket import Endpoint, Ticket
from . import netconfig, vpnc_env
from .diagnose import classify
from .redirect import install_redirect, remove_redirect
from .relay_helper import RelayHelper

log = logging.getLogger(__name__)

TUN_NAME = "vpn0"
# The relay's check runs while openconnect connects, so it is normally long done by now.
RELAY_VERDICT_WAIT = 2.0
_REPORT_FD, _TUN_FD = 3, 4  # fixed numbers in openconnect's process, so the script can say >&3
_END = b"VPNP_REPORT_END=1\0"
# openconnect runs this with /bin/sh -c for every state change; we only want "connect".
_SCRIPT = "case \"$reason\" in connect) env -0 >&3; printf 'VPNP_REPORT_END=1\\0' >&3;; esac; exit 0"


def preload_library() -> str:
    spec = importlib.util.find_spec("vpn_provider._tunfd_preload")
    if spec is None or not spec.origin:
        raise TunnelError("the tun preload library is missing", "reinstall vpn-provider (needs a C compiler)")
    return spec.origin


def pick_endpoint(endpoints: tuple[Endpoint, ...], timeout: float) -> Endpoint:
    """The first gateway address that accepts a TCP connection; tried in parallel."""
    if len(endpoints) == 1:
        return endpoints[0]
    pending: dict[socket.socket, Endpoint] = {}
    for ep in endpoints:
        try:
            family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex((ep.host, ep.port)) in (0, errno.EINPROGRESS):
                pending[s] = ep
            else:
                s.close()
        except OSError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], deadline - time.monotonic())
            for s in writable:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return pending[s]
                s.close()
                del pending[s]
    finally:
        for s in pending:
            s.close()
    return endpoints[0]  # none answered: let openconnect produce the precise error


class Tunnel:
    def __init__(self, ticket: Ticket, *, timeout: float = 15.0, log_file: Path | None = None,
                 tcp: str = "relay"):
        if tcp not in TCP_TRANSPORTS:
            raise ValueError(f"tcp transport must be one of {', '.join(TCP_TRANSPORTS)}")
        self.ticket = ticket
        self.tcp = tcp
        self.timeout = timeout
        self.log_file = log_file
        self.child_pid = 0
        self.endpoint: Endpoint | None = None

    def openconnect_argv(self, endpoint: Endpoint) -> list[str]:
        return [proc.find_tool("openconnect"), "--protocol=anyconnect", "--non-inter",
                "--passwd-on-stdin", f"--user={self.ticket.user}",
                f"--servercert={self.ticket.pin}", f"--script={_SCRIPT}",
                f"https://{endpoint}/"]

    def establish(self, *, started: float | None = None) -> vpnc_env.TunnelParams | None:
        """Return once CMD may run: this process is then inside the configured namespace.
        Returns the tunnel's parameters (None in relay-only mode: there is no tunnel).

        The time-out counts from ``started`` (a ``time.monotonic()`` value; default: now).
        """
        deadline = (time.monotonic() if started is None else started) + self.timeout
        if self.tcp == "relay-only":
            self._establish_relay_only(deadline)
            return None
        self.endpoint = pick_endpoint(self.ticket.gateways, min(3.0, self.timeout / 2))
        shim = preload_library()
        argv = self.openconnect_argv(self.endpoint)
        relay_endpoint = self.ticket.relay(self.endpoint) if self.tcp == "relay" else None
        # Forked first, before any pipe below exists, so it holds none of them open.
        relay = _start_relay_helper(relay_endpoint, self.ticket.secret) if relay_endpoint else None
        try:
            log_fd = (os.open(self.log_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                      if self.log_file else os.memfd_create("openconnect-log", os.MFD_CLOEXEC))
        except OSError as e:
            if relay:
                relay.abandon()
            raise TunnelError(f"cannot open the log file {self.log_file}: {e.strerror}") from None
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        passwd_r, passwd_w = os.pipe2(os.O_CLOEXEC)
        os.write(passwd_w, (self.ticket.secret + "\n").encode())  # fits the pipe buffer
        os.close(passwd_w)
        # SEQPACKET, not DGRAM: closing our end must wake the child's recv with EOF.
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.child_pid = os.fork()
        if self.child_pid == 0:
            parent_end.close()
            _openconnect_child(argv, shim, child_end, passwd_r, log_fd, report_w)
        child_end.close()
        os.close(passwd_r)
        os.close(report_w)
        try:
            with _undone_on_failure(self.kill_child):
                _enter_worker_namespace()
                tun_fd = linux.create_tun(TUN_NAME)
                try:
                    socket.send_fds(parent_end, [b"tun"], [tun_fd])
                finally:
                    os.close(tun_fd)
                parent_end.close()
                params = self._await_report(report_r, log_fd, deadline)
                netconfig.configure_links(params)
                netconfig.install_resolv_conf(netconfig.resolv_conf_text(params))
                if relay:
                    _activate_relay(relay, params, deadline)
                    relay = None
        finally:
            if relay:
                relay.abandon()
            parent_end.close()
            os.close(report_r)
            os.close(log_fd)
        log.debug("tunnel up via %s: %s", self.endpoint, params)
        return params

    def _establish_relay_only(self, deadline: float) -> None:
        """No openconnect: the namespace's TCP and DNS go to the relay helper, nothing else
        leaves. The relay must answer, since there is nothing to fall back to."""
        if not self.ticket.relay_port:
            raise TunnelError("the gateway runs no TCP relay (started with --no-relay)",
                              "use --tcp relay or --tcp tunnel")
        # The host whose relay or VPN port answers first: the relay is what we use, and if only
        # the VPN port answers (the relay's is filtered), the error then names the right host.
        hosts = self.ticket.gateways
        candidates = tuple(self.ticket.relay(g) for g in hosts) + hosts
        chosen = pick_endpoint(candidates, min(3.0, self.timeout / 2))
        self.endpoint = hosts[candidates.index(chosen) % len(hosts)]
        relay = RelayHelper(self.ticket.relay(self.endpoint), relay_key(self.ticket.secret))
        with _undone_on_failure(relay.abandon):
            _enter_worker_namespace()
            netconfig.route_tcp_to_loopback()
            netconfig.install_resolv_conf(netconfig.resolv_conf_text(None))
            problem = relay.verdict(deadline - time.monotonic())
            if not problem:
                dummy = ipaddress.IPv4Network(f"{netconfig.RELAY_ONLY_DUMMY_ADDRESS}/32")
                problem = _hand_namespace_to(relay, exclude=[dummy], relay_only=True)
            if problem:
                raise TunnelError(problem, _relay_hint(problem))

    def _await_report(self, report_r: int, log_fd: int, deadline: float) -> vpnc_env.TunnelParams:
        buf = b""
        while _END not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill_child()
                raise TunnelError(f"no tunnel to {self.endpoint} within {self.timeout:g} s",
                                  _timeout_hint(_read_all(log_fd)))
            ready, _, _ = select.select([report_r], [], [], min(left, 0.1))
            if ready:
                chunk = os.read(report_r, 65536)
                if chunk:
                    buf += chunk
                    continue
                time.sleep(0.01)  # EOF: openconnect closed the pipe, so it is exiting
            if not _still_running(self.child_pid):
                self.child_pid = 0
                raise classify(_read_all(log_fd), str(self.endpoint))
        try:
            return vpnc_env.parse(vpnc_env.parse_nul_separated(buf.split(_END)[0]))
        except ValueError as e:
            raise TunnelError(f"bad tunnel parameters from the gateway: {e}") from None

    def kill_child(self) -> None:
        if self.child_pid:
            proc.terminate(self.child_pid, grace=3)
            try:
                os.waitpid(self.child_pid, 0)
            except ChildProcessError:
                pass
            self.child_pid = 0


def _enter_worker_namespace() -> None:
    linux.enter_user_namespace(inner_uid=os.getuid(), inner_gid=os.getgid(),
                               flags=linux.CLONE_NEWNET | linux.CLONE_NEWNS)
    linux.make_mounts_private()


@contextlib.contextmanager
def _undone_on_failure(undo):
    """Call ``undo`` if the block fails; any failure but a TunnelError (OSError, pyroute2's
    NetlinkError, ...) becomes one line, never a traceback."""
    try:
        yield
    except TunnelError:
        undo()
        raise
    except Exception as e:  # noqa: BLE001
        undo()
        raise TunnelError(f"setting up the worker namespace: {e}") from None
    except BaseException:
        undo()
        raise


def _start_relay_helper(endpoint: Endpoint, secret: str) -> RelayHelper | None:
    """The helper, or None (and a warning) if it is not installed: the tunnel carries TCP then."""
    try:
        return RelayHelper(endpoint, relay_key(secret))
    except TunnelError as e:
        log.warning("TCP goes through the tunnel: %s", e.reason)
        return None


def _activate_relay(relay: RelayHelper, params: vpnc_env.TunnelParams, deadline: float) -> None:
    """Send the namespace's TCP through the relay if it answered; else leave TCP in the tunnel
    (and say so: the job works, only slower)."""
    problem = relay.verdict(min(RELAY_VERDICT_WAIT, deadline - time.monotonic()))
    if not problem:
        # The pool stays in the tunnel: only the gateway's namespace reaches other workers.
        problem = _hand_namespace_to(relay, exclude=[params.address.network], relay_only=False)
    if problem:
        relay.abandon()
        log.warning("TCP goes through the tunnel: %s", problem)


def _bound(kind: int, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _hand_namespace_to(relay: RelayHelper, *, exclude: list, relay_only: bool) -> str:
    """Redirect the namespace's TCP to a listener and hand it to the helper (in relay-only mode
    also a resolver on 127.0.0.1:53, UDP and TCP); '' or what went wrong."""
    sockets: list[socket.socket] = []
    try:
        sockets.append(_bound(socket.SOCK_STREAM, ("127.0.0.1", 0)))
        if relay_only:
            sockets += [_bound(socket.SOCK_DGRAM, ("127.0.0.1", 53)), _bound(socket.SOCK_STREAM, ("127.0.0.1", 53))]
        install_redirect(sockets[0].getsockname()[1], exclude=exclude, dns_stays=not relay_only)
    except Exception as e:  # noqa: BLE001 - NetlinkError and friends: the caller decides
        for sock in sockets:
            sock.close()
        return f"cannot redirect TCP in the namespace: {e}"
    try:
        relay.hand_over(sockets)
    except OSError as e:
        remove_redirect()
        return f"the relay helper is gone ({e.strerror or e})"
    return ""


def _relay_hint(problem: str) -> str:
    if "secret" in problem:
        return "the ticket belongs to a different gateway; copy the current ticket.json"
    return "is the gateway running, and its relay port reachable from this node? (try: vpn-provider check)"


def _still_running(pid: int) -> bool:
    """True while openconnect still runs (reaps it when it has exited)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


def _timeout_hint(openconnect_log: str) -> str:
    if "Connected to" not in openconnect_log and "SSL negotiation" not in openconnect_log:
        return "the gateway address is not answering; is a firewall dropping it?"
    return "the gateway answered but the tunnel did not come up; raise --timeout or see --log-file"


def _read_all(fd: int) -> str:
    chunks, offset = [], 0
    while True:
        data = os.pread(fd, 65536, offset)
        if not data:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(data)
        offset += len(data)


def _openconnect_child(argv: list[str], shim: str, fd_sock: socket.socket, passwd_r: int,
                       log_fd: int, report_w: int) -> NoReturn:
    """Runs in the forked child: wait for the tun fd, then become openconnect."""
    try:
        linux.die_with_parent()
        _, fds, _, _ = socket.recv_fds(fd_sock, 16, 1)
        if not fds:
            os._exit(1)  # the parent gave up before creating the tun device
        # Lift every source above the targets first: if stdin was closed, a source may *be* fd 0.
        sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (passwd_r, log_fd, report_w, fds[0])]
        for src, dst in zip(sources, (0, 1, _REPORT_FD, _TUN_FD)):
            os.dup2(src, dst)  # dup2 clears close-on-exec on dst
        os.dup2(1, 2)
        os.closerange(_TUN_FD + 1, _max_fd())
        env = dict(os.environ)
        env["LD_PRELOAD"] = shim + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
        env["VPNP_TUN_FD"] = str(_TUN_FD)
        linux.restore_default_signals()
        os.execve(argv[0], argv, env)
    except BaseException:  # noqa: BLE001 - never return into the parent's code
        pass
    os._exit(1)


def process_start_monotonic() -> float:
    """When this process started, on the monotonic clock: --timeout counts from there, so the
    interpreter's start-up is inside the promised time."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # seconds since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def _max_fd() -> int:
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return 1024


def exec_in_vpn(ticket: Ticket, argv: list[str], *, env: dict[str, str] | None = None,
                timeout: float = 15.0, log_file: Path | None = None,
                started: float | None = None, tcp: str = "relay") -> NoReturn:
    """Replace this process with ``argv`` (plus ``env`` in its environment) running inside the
    VPN. Raises TunnelError if the tunnel cannot be set up; never returns otherwise.
    ``started``: the ``time.monotonic()`` the time-out counts from (default: now).
    ``tcp``: "relay" sends TCP through the gateway's relay when it has one, "tunnel" keeps all
    traffic in the encrypted tunnel."""
    if not shutil.which(argv[0], path=(env or {}).get("PATH")):
        raise TunnelError(f"command not found: {argv[0]}")
    tunnel = Tunnel(ticket, timeout=timeout, log_file=log_file, tcp=tcp)
    tunnel.establish(started=started)
    os.environ.update(env or {})  # after establish: openconnect must not see CMD's settings
    linux.restore_default_signals()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        tunnel.kill_child()
        raise TunnelError(f"cannot run {argv[0]}: {e.strerror}") from None
