"""Bring the tunnel up for one command, then become that command.

Sequence (every step unprivileged):
  1. fork the node helper (``node_helper``) while we are still in the host's network namespace;
  2. enter a new user+network+mount namespace and create the tun device there;
  3. pass the helper the tun fd and the namespaces (SCM_RIGHTS); its tunnel keeper starts
     openconnect, and a preload shim makes openconnect use that tun fd;
  4. wait for openconnect's script to report the tunnel parameters (the readiness handshake);
  5. configure addresses, routes, MTU and DNS with pyroute2 and a bind-mounted resolv.conf;
  6. exec CMD in place of this process, so its exit status and signals pass straight through.
The helper stays CMD's child with a parent-death signal: when CMD ends, the tunnel ends. When
the gateway restarts, the keeper logs in again and reconfigures the namespace (``rejoin``).

In relay-only mode steps 1, 3 and 4 are skipped: no tun device, no openconnect; the namespace's
TCP and DNS go to the relay helper alone.

In preload mode (user namespaces are off) there is no namespace either: the helper listens on
the node's loopback, and CMD runs with a preloaded library (native/relay_preload.c) that sends
its TCP connects and name lookups there.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import random
import selectors
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

from .. import linux, proc
from ..errors import TunnelError
from ..transport import Transport
from ..relay.protocol import relay_key, worker_name
from ..ticket import Endpoint, Ticket
from . import (DEFAULT_RECONNECT_TIMEOUT, NATIVE_REMEDY, PRELOAD_LIBRARY, RELAY_PORTS_ENV, RELAY_PRELOAD_LIBRARY,
               netconfig, vpnc_env)
from .choice import choose
from .diagnose import classify
from .redirect import install_redirect, remove_redirect
from .node_helper import KeeperSpec, NodeHelper

log = logging.getLogger(__name__)

TUN_NAME = "vpn0"
# The relay's check runs while openconnect connects, so it is normally long done by now.
RELAY_VERDICT_WAIT = 2.0
_HELPER_GONE = "the node helper is gone"
# openconnect runs this with /bin/sh -c for every state change; we only want "connect". The
# keeper gives openconnect its report pipe as fd 3 (native/tunnel_keeper.c: OC_REPORT_FD).
_SCRIPT = "case \"$reason\" in connect) env -0 >&3; printf 'VPNP_REPORT_END=1\\0' >&3;; esac; exit 0"


def preload_library() -> str:
    if not PRELOAD_LIBRARY.exists():
        raise TunnelError(f"the tun preload library {PRELOAD_LIBRARY} is missing", NATIVE_REMEDY)
    return str(PRELOAD_LIBRARY)


def relay_preload_library() -> str:
    if not RELAY_PRELOAD_LIBRARY.exists():
        raise TunnelError(f"the relay preload library {RELAY_PRELOAD_LIBRARY} is missing", NATIVE_REMEDY)
    if any(ch in str(RELAY_PRELOAD_LIBRARY) for ch in " :"):  # LD_PRELOAD's separators
        raise TunnelError(f"the relay preload library's path {RELAY_PRELOAD_LIBRARY} has a space or a colon, "
                          "which LD_PRELOAD cannot carry", "install vpn-provider under a path without them")
    return str(RELAY_PRELOAD_LIBRARY)


def pick_endpoint(endpoints: tuple[Endpoint, ...], timeout: float, *, spread: float = 0.05) -> Endpoint | None:
    """A gateway address that accepts a TCP connection, tried in parallel; None if none does
    within ``timeout``. An address that fails is dropped, the others are waited for (a burst of
    workers makes a gateway slow to accept, not wrong). Among those that answer within
    ``spread`` seconds of the first, one is picked at random, so workers spread over gateways."""
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
    answered: list[Endpoint] = []
    # A selector, not select(): that fails outright on descriptors numbered 1024 and above.
    with selectors.DefaultSelector() as ready:
        try:
            for s in pending:
                ready.register(s, selectors.EVENT_WRITE)
            while pending and time.monotonic() < deadline:
                for key, _ in ready.select(max(0.0, deadline - time.monotonic())):
                    s = key.fileobj
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        if not answered:
                            deadline = min(deadline, time.monotonic() + spread)
                        answered.append(pending[s])
                    ready.unregister(s)
                    s.close()
                    del pending[s]
        finally:
            for s in pending:
                s.close()
    return random.choice(answered) if answered else None


def _first_then_rest(first: Endpoint, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    return (first, *(e for e in endpoints if e != first))


class Tunnel:
    def __init__(self, ticket: Ticket, *, timeout: float = 15.0, log_file: Path | None = None,
                 tcp: Transport = Transport.RELAY, reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT):
        if tcp.needs_tunnel and not ticket.tunnel:
            raise TunnelError(f"--tcp {tcp.value}: the gateway offers no tunnel (it runs the relay alone)",
                              "leave --tcp out, or pass --tcp relay-only")
        if reconnect_timeout < 0:
            raise ValueError("reconnect_timeout must be >= 0 (0: never give up)")
        self.ticket = ticket
        self.tcp = tcp
        self.timeout = timeout
        self.log_file = log_file
        self.reconnect_timeout = reconnect_timeout
        self.helper: NodeHelper | None = None
        self.endpoint: Endpoint | None = None
        self._preload_ports = ""  # preload mode: the helper's listeners, for CMD's environment

    def openconnect_argv(self) -> list[str]:
        """Without the gateway's URL: the keeper appends the one it logs in to.
        --reconnect-timeout=0: openconnect tries to resume its session once, at once, and
        exits if the gateway no longer knows it; the keeper then logs in afresh."""
        return [proc.find_tool("openconnect"), "--protocol=anyconnect", "--non-inter",
                "--passwd-on-stdin", f"--user={self.ticket.user}", "--reconnect-timeout=0",
                f"--servercert={self.ticket.pin}", f"--script={_SCRIPT}"]

    def establish(self, *, started: float | None = None) -> vpnc_env.TunnelParams | None:
        """Return once CMD may run: this process is then inside the configured namespace.
        Returns the tunnel's parameters (None in relay-only mode: there is no tunnel).

        The time-out counts from ``started`` (a ``time.monotonic()`` value; default: now).
        """
        deadline = (time.monotonic() if started is None else started) + self.timeout
        if self.tcp is Transport.RELAY_ONLY:
            self._establish_relay_only(deadline)
            return None
        if self.tcp is Transport.PRELOAD:
            self._establish_preload(deadline)
            return None
        shim = preload_library()
        argv = self.openconnect_argv()
        chosen = pick_endpoint(self.ticket.gateways, max(0.1, deadline - time.monotonic() - 1.0))
        self.endpoint = chosen or self.ticket.gateways[0]  # none answered: openconnect says why
        gateways = _first_then_rest(self.endpoint, self.ticket.gateways)
        relay_endpoint = self.ticket.relay(self.endpoint) if self.tcp is Transport.RELAY else None
        spec = KeeperSpec(openconnect_argv=tuple(argv), gateways=gateways,
                          secret=self.ticket.secret, tcp_mode=self.tcp.value, give_up_after=self.reconnect_timeout,
                          attempt_timeout=self.timeout, log_is_scratch=self.log_file is None, preload=shim,
                          worker=worker_name(os.getpid()))  # CMD keeps our pid
        # Forked first, before any descriptor below exists, so it holds none of them open.
        # The relay list in the keeper's order: when the keeper moves, the relay follows.
        helper = NodeHelper(relay_endpoint, relay_key(self.ticket.secret) if relay_endpoint else None,
                             alternatives=tuple(self.ticket.relay(g) for g in gateways[1:]) if relay_endpoint else ())
        self.helper = helper
        with _undone_on_failure(self.kill_helper):
            try:
                log_fd = (os.open(self.log_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                          if self.log_file else os.memfd_create("openconnect-log", os.MFD_CLOEXEC))
            except OSError as e:
                raise TunnelError(f"cannot open the log file {self.log_file}: {e.strerror}") from None
            try:
                _enter_worker_namespace()
                tun_fd = linux.create_tun(TUN_NAME)
                namespaces = [os.open(f"/proc/self/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
                              for ns in ("user", "net", "mnt")]
                try:
                    helper.keep_tunnel(spec, sys.executable, tun_fd=tun_fd, log_fd=log_fd, namespaces=namespaces)
                finally:
                    for fd in (tun_fd, *namespaces):
                        os.close(fd)
                params = self._await_report(log_fd, deadline)
            finally:
                os.close(log_fd)
            netconfig.configure_links(params)
            if self.tcp is Transport.TUNNEL:
                netconfig.refuse_ipv6_tcp()
            netconfig.install_resolv_conf(netconfig.resolv_conf_text(params))
            if relay_endpoint:
                _activate_relay(helper, params, deadline)
            else:
                helper.detach()
        log.debug("tunnel up via %s: %s", self.endpoint, params)
        return params

    def _start_relay_helper(self, deadline: float) -> NodeHelper:
        """The helper for a worker without a tunnel, checking the relay of the gateway that
        answers first."""
        if not self.ticket.relay_port:
            raise TunnelError("the gateway runs no TCP relay (started with --no-relay)",
                              "use --tcp relay or --tcp tunnel")
        # The host whose relay or VPN port answers first: the relay is what we use, and if only
        # the VPN port answers (the relay's is filtered), the error then names the right host.
        hosts = self.ticket.gateways
        candidates = tuple(self.ticket.relay(g) for g in hosts) + hosts
        chosen = pick_endpoint(candidates, max(0.1, deadline - time.monotonic() - 1.0))
        self.endpoint = hosts[candidates.index(chosen) % len(hosts)] if chosen else hosts[0]
        self.helper = NodeHelper(self.ticket.relay(self.endpoint), relay_key(self.ticket.secret),
                                 alternatives=tuple(self.ticket.relay(g) for g in hosts if g != self.endpoint))
        return self.helper

    def _establish_preload(self, deadline: float) -> None:
        """No namespace: the helper serves preloaded programs on the node's loopback (only our
        own user's connections: see native/preload_request.h)."""
        relay_preload_library()  # missing: say so before anything starts
        relay = self._start_relay_helper(deadline)
        with _undone_on_failure(relay.abandon):
            problem = relay.verdict(deadline - time.monotonic())
            if problem:
                raise TunnelError(problem, _relay_hint(problem))
            listeners = [_bound(socket.SOCK_STREAM, ("127.0.0.1", 0))]
            with contextlib.suppress(OSError):  # no IPv6 here: IPv6 sockets use ::ffff:127.0.0.1
                listeners.append(_bound(socket.SOCK_STREAM, ("::1", 0)))
            self._preload_ports = ",".join(str(s.getsockname()[1]) for s in listeners)
            try:
                relay.serve_programs(listeners)
            except OSError as e:
                raise TunnelError(f"{_HELPER_GONE} ({e.strerror or e})") from None

    def program_environment(self, environ: dict[str, str]) -> dict[str, str]:
        """What CMD's environment needs on top of ``environ`` (in preload mode: the library,
        ahead of any the job preloads itself, and where the helper listens)."""
        if self.tcp is not Transport.PRELOAD:
            return {}
        preload = f"{relay_preload_library()} {environ.get('LD_PRELOAD', '')}".strip()
        return {"LD_PRELOAD": preload, RELAY_PORTS_ENV: self._preload_ports}

    def _establish_relay_only(self, deadline: float) -> None:
        """No openconnect: the namespace's TCP and DNS go to the relay helper, nothing else
        leaves. The relay must answer, since there is nothing to fall back to."""
        relay = self._start_relay_helper(deadline)
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

    def _await_report(self, log_fd: int, deadline: float) -> vpnc_env.TunnelParams:
        report = self.helper.tunnel_report(deadline - time.monotonic())
        if report is None:
            raise TunnelError(f"no tunnel to {self.endpoint} within {self.timeout:g} s",
                              _timeout_hint(_read_all(log_fd)))
        if isinstance(report, str):
            raise classify(_read_all(log_fd), str(self.endpoint))
        try:
            return vpnc_env.parse(vpnc_env.parse_nul_separated(report))
        except ValueError as e:
            raise TunnelError(f"bad tunnel parameters from the gateway: {e}") from None

    def kill_helper(self) -> None:
        """End the helper, and with it openconnect (its parent-death signal)."""
        if self.helper:
            self.helper.abandon()
            self.helper = None


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
    except Exception as e:
        undo()
        raise TunnelError(f"setting up the worker namespace: {e}") from None
    except BaseException:
        undo()
        raise


def _activate_relay(helper: NodeHelper, params: vpnc_env.TunnelParams, deadline: float) -> None:
    """Send the namespace's TCP through the relay if it answered; else leave TCP in the tunnel
    (and say so: the job works, only slower). The helper keeps the tunnel either way."""
    problem = helper.verdict(min(RELAY_VERDICT_WAIT, deadline - time.monotonic()))
    if not problem:
        # The pool stays in the tunnel: only the gateway's namespace reaches other workers.
        problem = _hand_namespace_to(helper, exclude=[params.address.network], relay_only=False)
        if problem.startswith(_HELPER_GONE):
            raise TunnelError(problem)  # and the tunnel's keeper with it
    if problem:
        helper.detach()
        netconfig.refuse_ipv6_tcp()
        log.warning("TCP goes through the tunnel: %s", problem)


def _bound(kind: int, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, kind)
    try:
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _hand_namespace_to(relay: NodeHelper, *, exclude: list, relay_only: bool) -> str:
    """Redirect the namespace's TCP to a listener and hand it to the helper (in relay-only mode
    also a resolver on 127.0.0.1:53, UDP and TCP); '' or what went wrong."""
    sockets: list[socket.socket] = []
    try:
        sockets.append(_bound(socket.SOCK_STREAM, ("127.0.0.1", 0)))
        if relay_only:
            sockets += [_bound(socket.SOCK_DGRAM, ("127.0.0.1", 53)), _bound(socket.SOCK_STREAM, ("127.0.0.1", 53))]
        install_redirect(sockets[0].getsockname()[1], exclude=exclude, dns_stays=not relay_only)
    except Exception as e:  # NetlinkError and friends: the caller decides
        for sock in sockets:
            sock.close()
        return f"cannot redirect TCP in the namespace: {e}"
    ipv6 = _redirect_ipv6(relay_only=relay_only)
    try:
        relay.hand_over([sockets[0], *([ipv6] if ipv6 else [])], resolver=tuple(sockets[1:]) or None)
    except OSError as e:
        remove_redirect()
        return f"{_HELPER_GONE} ({e.strerror or e})"
    return ""


def _redirect_ipv6(*, relay_only: bool) -> socket.socket | None:
    """IPv6 TCP to the relay too, through a listener on [::1] (what else is IPv6 takes the
    tunnel if the gateway offers IPv6): the listener, or None if this kernel has no IPv6 or will
    not do it (then with a warning: IPv4 is unaffected)."""
    listener = None
    home = "lo" if relay_only else TUN_NAME  # of the unique-local address: see netconfig
    try:
        if not netconfig.enable_ipv6({"lo", home}):
            return None
        listener = _bound(socket.SOCK_STREAM, ("::1", 0))
        ours = ipaddress.IPv6Network(f"{netconfig.RELAY_IPV6_ADDRESS}/128")
        install_redirect(listener.getsockname()[1], exclude=[ours], dns_stays=False, version=6)
        if relay_only:
            netconfig.prefer_ipv4_in_lookups()
        netconfig.route_ipv6_tcp_to_loopback(home)  # last: it makes AAAA records visible
        return listener
    except Exception as e:  # NetlinkError, OSError: IPv6 is a bonus, never the job's end
        if listener:
            listener.close()
        log.warning("IPv6 destinations are unreachable: %s", e)
        netconfig.refuse_ipv6_tcp()
        return None


def _relay_hint(problem: str) -> str:
    if "secret" in problem:
        return "the ticket belongs to a different gateway; copy the current ticket.json"
    return "is the gateway running, and its relay port reachable from this node? (try: vpn-provider check)"


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


def exec_in_vpn(ticket: Ticket, argv: list[str], *, env: dict[str, str] | None = None,
                timeout: float = 15.0, log_file: Path | None = None,
                started: float | None = None, tcp: Transport | None = None,
                reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT) -> NoReturn:
    """Replace this process with ``argv`` (plus ``env`` in its environment) running inside the
    VPN. Raises TunnelError if the tunnel cannot be set up; never returns otherwise.
    ``started``: the ``time.monotonic()`` the time-out counts from (default: now).
    ``tcp``: the transport (transport.py); None chooses the best this node and gateway allow
    (worker/choice.py).
    ``reconnect_timeout``: seconds without a tunnel, after the gateway went away, before CMD gets
    SIGTERM (0: wait for a gateway forever)."""
    if not shutil.which(argv[0], path=(env or {}).get("PATH")):
        raise TunnelError(f"command not found: {argv[0]}")
    restore_core_dumps = linux.suspend_core_dumps()  # we hold the secret until CMD replaces us
    tunnel = Tunnel(ticket, timeout=timeout, log_file=log_file, tcp=tcp or choose(ticket),
                    reconnect_timeout=reconnect_timeout)
    tunnel.establish(started=started)
    os.environ.update(env or {})  # after establish: the helper must not see CMD's settings
    os.environ.update(tunnel.program_environment(os.environ))
    linux.restore_default_signals()
    restore_core_dumps()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        tunnel.kill_helper()
        raise TunnelError(f"cannot run {argv[0]}: {e.strerror}") from None
