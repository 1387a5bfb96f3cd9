"""``gateway run``: bring the gateway up in the foreground and keep it up until told to stop.

Process tree: this supervisor -> {egress backend, ocserv (in its namespace) -> sec-mod, workers}.
Every child gets a parent-death signal, so even a SIGKILLed supervisor leaves nothing behind.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path

from .. import egress, linux, proc
from ..errors import GatewayError, VPNError
from ..ticket import Endpoint, Ticket
from . import forward_policy, ocserv_conf, registry
from .config import SLIRP_NETWORK, TUNNEL_IPV6_POOL, GatewayConfig, host_resolvers
from .credentials import (check_dir, check_existing, check_file, ensure_credentials, open_file, pin_of, read_file,
                          write_file)
from .namespace import GatewayNamespace
from .relay import RelayProcess
from .status import RELAY_STATUS_SOCKET, TUNNEL_REFUSALS

log = logging.getLogger(__name__)

#: What a gateway keeps in its state dir besides the credentials (those: credentials.py).
STATE_FILES = ("gateway.lock", "gateway.pid", "gateway.log", "ocserv.conf", "ocserv.log", "ocserv.log.1", "relay.log")


def prepare_dirs(cfg: GatewayConfig) -> None:
    """Refuse a state or credentials dir, or a file in them, that another user made or can
    change (credentials.check_dir and check_file), before anything is written there; then
    create the directories that are missing, private."""
    dirs = ((cfg.state_dir, "state dir"), (cfg.run_dir, "run dir"), (cfg.credentials, "credentials dir"))
    for path, what in dirs:
        check_dir(path, what)
    for name in STATE_FILES:
        check_file(cfg.state_dir / name)
    check_existing(cfg.credentials)
    registry.check(cfg.credentials)
    for path, _ in dirs:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)


def host_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses, each once, in the kernel's order."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)]
    # One address may sit on several interfaces; a second UDP forward for it could not bind.
    return list(dict.fromkeys(a for a in addrs if a and not a.startswith("127.")))


def has_ipv6_route() -> bool:
    """Whether this host routes IPv6 beyond itself: then the tunnel carries IPv6 as well."""
    from pyroute2 import IPRoute
    try:
        with IPRoute() as ipr:
            return bool(ipr.get_default_routes(family=socket.AF_INET6))
    except OSError:  # a kernel without IPv6
        return False


def advertised_endpoints(cfg: GatewayConfig, hosts: list[str]) -> tuple[Endpoint, ...]:
    if cfg.advertise:
        return cfg.advertise
    if cfg.listen.host not in ("0.0.0.0", "", "::"):
        return (cfg.listen,)
    if not hosts:
        raise GatewayError("this host has no non-loopback IPv4 address to advertise",
                           "pass --advertise HOST:PORT")
    return tuple(Endpoint(h, cfg.listen.port) for h in hosts)


def probe_pin(endpoint: Endpoint, timeout: float) -> str:
    """TLS-handshake with ``endpoint`` and return the pin of the certificate it presents."""
    host = "127.0.0.1" if endpoint.host in ("0.0.0.0", "") else endpoint.host
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we compare the pin ourselves
    with socket.create_connection((host, endpoint.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    return pin_of(ssl.DER_cert_to_PEM_cert(der).encode())


def _check_port_free(listen: Endpoint) -> None:
    """The egress binds the listen port only once ocserv runs; try it now."""
    with socket.socket(socket.AF_INET6 if ":" in listen.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((listen.host, listen.port))
        except OSError as e:
            raise GatewayError(f"cannot listen on {listen} (TCP): {e.strerror}", "choose --listen HOST:PORT") from None


def why_relay_alone(cfg: GatewayConfig) -> str:
    """Why this gateway offers no tunnel ("" if it does): --no-tunnel, or ocserv, occtl, openssl
    (it hashes the tunnel's password) or every egress missing on this host. An error instead
    where the tunnel is required (GatewayConfig(tunnel=True)) or would be all (--no-relay); an
    --egress that was named but is missing fails later, as its own error."""
    if cfg.tunnel is False:
        return "started with --no-tunnel"
    missing = [tool for tool in ("ocserv", "occtl", "openssl") if not proc.installed(tool)]
    if missing:
        names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        why = f"{names} {'is' if len(missing) == 1 else 'are'} not installed on this host"
    elif cfg.egress == "auto" and not any(b.is_supported()[0] for b in egress.BACKENDS.values()):
        why = "neither slirp4netns nor pasta is installed on this host"
    else:
        return ""
    if cfg.tunnel or not cfg.relay:  # the tunnel was asked for, or is all there would be
        raise GatewayError(f"no tunnel: {why}", "" if cfg.tunnel else "leave out --no-relay: the relay alone needs "
                           "none of them")
    return why


def _wait_accepting(cfg: GatewayConfig, pin: str, alive, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise GatewayError("ocserv exited during start-up",
                               f"see {cfg.state_dir / 'ocserv.log'}")
        try:
            if probe_pin(cfg.listen, timeout=2.0) == pin:
                return
            last = "a different certificate answers (another gateway on this port?)"
        except (OSError, ssl.SSLError) as e:
            last = str(e)
        time.sleep(0.05)
    raise GatewayError(f"not accepting connections on {cfg.listen} after {timeout:g} s ({last})")


class Supervisor:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.ns: GatewayNamespace | None = None
        self.egress: egress.Egress | None = None
        self.relay: RelayProcess | None = None
        self.relay_alone = ""  # why the gateway offers no tunnel, once bring_up decided
        self._stop = False

    def bring_up(self) -> Ticket:
        cfg = self.cfg
        self.relay_alone = why_relay_alone(cfg)
        # Busy ports first, so they fail at once rather than once ocserv and the egress are up.
        if not self.relay_alone:
            _check_port_free(cfg.listen)
        if cfg.relay:
            self.relay = RelayProcess(cfg.relay_endpoint, cfg.state_dir / "relay.log",
                                      status_socket=cfg.run_dir / RELAY_STATUS_SOCKET)
            self.relay.bind()
        hosts = host_addresses()
        endpoints = advertised_endpoints(cfg, hosts)
        relay_port = cfg.relay_endpoint.port if cfg.relay else 0
        with registry.locked(cfg.credentials):  # another gateway may be creating them right now
            registry.others(cfg.credentials, registry.entry_name(cfg.state_dir), relay_port)  # fail fast
            creds = ensure_credentials(cfg.credentials, [e.host for e in endpoints], tunnel=not self.relay_alone)
        if self.relay_alone:
            log.warning("the relay alone (TCP and DNS, no tunnel): %s", self.relay_alone)
            (cfg.run_dir / "occtl.sock").unlink(missing_ok=True)  # a tunnel's, from an earlier run
        else:
            self._start_tunnel(creds, hosts)
        if self.relay:
            # The relay runs in this host's network, so this host's resolvers serve its DNS
            # streams (relay-only workers), loopback ones included.
            relay_resolvers = cfg.dns or tuple(host_resolvers(loopback=True))
            if not relay_resolvers:
                log.warning("no IPv4 resolver in /etc/resolv.conf: relay-only workers cannot "
                            "resolve names; pass --dns IP")
            self.relay.start(creds.secret, relay_resolvers, plain=cfg.plain_relay, policy=cfg.policy)
            if cfg.plain_relay:
                log.warning("the relay carries workers' flows UNENCRYPTED (--plain-relay)")
        if not self.relay_alone:
            _wait_accepting(cfg, creds.pin, self._ocserv_alive)
        with registry.locked(cfg.credentials):
            every = registry.register(cfg.credentials, registry.entry_name(cfg.state_dir), endpoints, relay_port,
                                      tunnel=not self.relay_alone)
            ticket = Ticket(gateways=every.gateways, pin=creds.pin, user=creds.user, secret=creds.secret,
                            relay_port=relay_port, tunnel=every.tunnel)
            ticket.save(cfg.ticket_path)
        if every.tunnel != (not self.relay_alone):
            log.warning("the ticket offers workers no tunnel: another gateway sharing %s runs the relay alone",
                        cfg.credentials)
        log.info("gateway up on %s (%s)", cfg.listen,
                 "the relay alone" if self.relay_alone else f"egress {self.egress.name}")
        return ticket

    def _start_tunnel(self, creds, hosts: list[str]) -> None:
        """ocserv in its namespace, and the egress that gives the namespace the Internet."""
        cfg = self.cfg
        backend = egress.select(cfg.egress)
        dns = cfg.dns or tuple(host_resolvers()) or (
            (backend.dns_forwarder,) if backend.dns_forwarder else ())
        if not dns:
            raise GatewayError("no DNS resolver to push to clients", "pass --dns IP[,IP]")
        ipv6 = has_ipv6_route()
        if ipv6 and (why := forward_policy.ipv6_masquerade_refused()):
            log.warning("the tunnel carries no IPv6: this kernel refuses IPv6 masquerade (%s)", why)
            ipv6 = False
        conf = cfg.state_dir / "ocserv.conf"
        write_file(conf, ocserv_conf.render(ocserv_conf.OcservSettings(
            port=cfg.listen.port, pool=cfg.pool, dns=dns, server_cert=creds.server_cert,
            server_key=creds.server_key, passwd_file=creds.passwd_file, run_dir=cfg.run_dir,
            mtu=cfg.mtu, pool6=TUNNEL_IPV6_POOL if ipv6 else None)).encode())
        aliases = ((str(SLIRP_NETWORK), *([egress.Slirp4netns.ipv6_network] if ipv6 else []))
                   if backend is egress.Slirp4netns else ())
        self.ns = GatewayNamespace([proc.find_tool("ocserv"), "--foreground", "--config", str(conf)],
                                   str(cfg.state_dir / "ocserv.log"), masquerade=backend.needs_nat,
                                   policy=cfg.policy, resolvers=dns, egress_aliases=aliases,
                                   ipv6=ipv6, ipv6_router=backend.ipv6_router,
                                   refusals_path=cfg.run_dir / TUNNEL_REFUSALS)
        self.ns.spawn()
        self.egress = backend(cfg.run_dir)
        extra = self.egress.start(target_pid=self.ns.pid, forwards=egress.listen_forwards(cfg.listen, hosts),
                                  ipv6=ipv6)
        self.ns.release(extra)
        log.info("tunnel: egress %s, dns %s", backend.name, ",".join(dns))

    def _ocserv_alive(self) -> bool:
        if not self.ns or not self.ns.pid:
            return False
        try:
            return os.waitpid(self.ns.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    def serve(self) -> int:
        """Block until SIGTERM/SIGINT, or until ocserv or the egress dies (then exit non-zero)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        while not self._stop:
            if self.ns and not self._ocserv_alive():
                log.error("ocserv exited; stopping the gateway")
                return 1
            if self.relay and not self.relay.alive():
                log.error("the TCP relay exited (see %s); stopping the gateway", self.relay.log_path)
                return 1
            if self.egress and not self.egress.alive():
                log.error("%s exited (%s); stopping the gateway", self.egress.name, self.egress.log_tail())
                return 1
            time.sleep(0.2)
        return 0

    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    def tear_down(self) -> None:
        if self.ns and self.ns.pid and self._ocserv_alive():
            proc.terminate(self.ns.pid, grace=5)
        if self.ns and self.ns.pid:
            try:
                os.waitpid(self.ns.pid, 0)
            except ChildProcessError:
                pass
        if self.egress:
            self.egress.stop()
        if self.relay:
            self.relay.stop()


def run(cfg: GatewayConfig, ready_fd: int | None = None) -> int:
    """Foreground gateway. ``ready_fd`` gets one line, ``READY {json}`` or ``ERROR message``."""
    ready = _ReadyPipe(ready_fd)
    pidfile = cfg.state_dir / "gateway.pid"
    # This process and its children (ocserv, the relay) hold the server key and the client secret.
    linux.no_core_dumps()
    # Every client of ocserv and every relayed flow holds descriptors; children inherit the limit.
    linux.raise_open_file_limit()
    os.umask(0o077)  # what ocserv and the egress create in the state dir (pid file, sockets) is ours alone
    os.environ["LC_ALL"] = "C"  # we parse and log the tools' messages: keep them in English
    try:
        prepare_dirs(cfg)
        lock = _lock_state_dir(cfg.state_dir)
    except GatewayError as e:
        ready.send(f"ERROR {e}")
        raise
    sup = Supervisor(cfg)
    try:
        # Signals during start-up must still clean up, so turn them into an exception.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _raise_interrupt)
        ticket = sup.bring_up()
        write_file(pidfile, f"{os.getpid()}\n".encode())
        ready.send("READY " + json.dumps({"gateways": [str(g) for g in ticket.gateways],
                                          "ticket": str(cfg.ticket_path), "relay_alone": sup.relay_alone}))
        return sup.serve()
    except VPNError as e:
        ready.send(f"ERROR {e}")
        raise
    except KeyboardInterrupt:
        ready.send("ERROR interrupted during start-up")
        return 130
    except Exception as e:  # anything else still ends as one line for `gateway start`
        ready.send(f"ERROR {type(e).__name__}: {e}")
        raise GatewayError(f"{type(e).__name__}: {e}") from e
    finally:
        sup.tear_down()
        pidfile.unlink(missing_ok=True)
        os.close(lock)


class _ReadyPipe:
    """The one start-up line to ``gateway start``; later sends are no-ops."""

    def __init__(self, fd: int | None):
        self.fd = fd
        if fd is not None:
            os.set_inheritable(fd, False)  # ocserv and the egress must not hold it open

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        finally:
            os.close(fd)


def _lock_state_dir(state_dir: Path) -> int:
    """One gateway per state dir: hold an flock for the supervisor's lifetime."""
    fd = open_file(state_dir / "gateway.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = read_pid(state_dir)
        who = f" (pid {other})" if other else ""
        raise GatewayError(f"a gateway{who} already runs or is starting with state dir {state_dir}",
                           "stop it first, or use another --state-dir") from None
    return fd


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def read_pid(state_dir: Path) -> int:
    """PID of the live gateway supervisor for ``state_dir``, or 0. Without a pid file (the
    state dir was deleted or unmounted under it), look for it among this user's processes."""
    try:
        pid = int(read_file(state_dir / "gateway.pid").split()[0])
    except (OSError, ValueError, IndexError, GatewayError):
        pid = 0
    # Guard against a recycled pid: it must be a gateway run for this very state dir.
    if pid and _runs_gateway_for(pid, state_dir):
        return pid
    return _find_supervisor(state_dir)


def _find_supervisor(state_dir: Path) -> int:
    """The oldest of this user's processes that runs a gateway for ``state_dir``, or 0."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():  # a second `run` must not find itself
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            start = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
        if _runs_gateway_for(int(entry), state_dir):
            found.append((start, int(entry)))
    return min(found)[1] if found else 0


def _runs_gateway_for(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` runs ``... gateway run ... --state-dir STATE_DIR ...``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="surrogateescape").split("\0")
    except OSError:
        return False
    if not any(args[i:i + 2] == ["gateway", "run"] for i in range(len(args))):
        return False
    values = [b for a, b in zip(args, args[1:]) if a == "--state-dir"]
    values += [a.removeprefix("--state-dir=") for a in args if a.startswith("--state-dir=")]
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")  # a relative --state-dir is relative to it
    except OSError:
        cwd = ""
    return any(Path(os.path.normpath(os.path.join(cwd, os.path.expanduser(v)))) == state_dir for v in values)
