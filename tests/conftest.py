"""Fixtures for the three test tiers: pure, user-namespace, and the simulated site (root builds it;
every product process runs as the site's unprivileged user)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

VP = str(Path(sys.executable).parent / "vpn-provider")
SUPPORT = Path(__file__).resolve().parent / "support"
DEBIAN_WORK_QUEUE = Path("/usr/lib/python3/dist-packages/work_queue.py")

# Parsl imports ndcctools.* once, when its executors module is first imported: put the TEST-ONLY
# aliases in tests/support on the path before any test does that (see tests/support/ndcctools).
if importlib.util.find_spec("ndcctools") is None and DEBIAN_WORK_QUEUE.exists():
    sys.path.append(str(SUPPORT))
def taskvine_unavailable() -> str | None:
    """Why CCTools' TaskVine cannot be used here (scripts/setup builds it), or None."""
    try:  # a submodule's spec imports its parent, which may be missing altogether
        found = importlib.util.find_spec("ndcctools.taskvine") is not None
    except ModuleNotFoundError:
        found = False
    if found and (Path(sys.executable).parent / "vine_worker").exists():
        return None
    why = Path(__file__).resolve().parent.parent / "build" / "taskvine-unavailable"
    if why.exists():
        return why.read_text().strip()
    return "TaskVine is not installed in this venv (scripts/setup builds it)"


SITE_TOOLS = ("ocserv", "openconnect", "slirp4netns", "dnsmasq", "xrootd", "xrdcp", "curl", "iptables")
BENCH_TOOLS = ("iperf3", "vpnns")  # the benchmark's alone: its smoke test skips without them


def _site_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "building the simulated site needs root (run the README's test command as root)"
    missing = [t for t in SITE_TOOLS if not shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if missing:
        return f"missing site tools {missing}: run the README's test command, which installs them"
    return None


TIERS = ("pure", "userns", "site")  # in the order they run: the fast tiers first


def pytest_collection_modifyitems(config, items):
    reason = _site_skip_reason()
    for item in items:
        if not any(tier in item.keywords for tier in TIERS[1:]):
            item.add_marker(pytest.mark.pure)
        if reason and "site" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
    items.sort(key=lambda item: next(i for i, tier in enumerate(TIERS) if tier in item.keywords))


def comm(pid: int) -> str:
    """A process's name, or '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def sha_lines(stdout: str) -> list[str]:
    """The SHA-256 sums that start lines of ``stdout`` (sha256sum's output), in order."""
    return re.findall(r"^([0-9a-f]{64})\b", stdout, flags=re.M)


@contextmanager
def own_site(**kw):
    """A simulated site of a test's own (``Site(**kw)``, not the session's), with /dev/net/tun as
    an ordinary compute node has it (distributions ship it 0666); afterwards the site is closed
    and the device's mode restored."""
    reason = _site_skip_reason()
    if reason:
        pytest.skip(reason)
    from vpn_provider.sim.site import Site
    prior_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    try:
        with Site(**kw) as site:
            yield site
    finally:
        os.chmod("/dev/net/tun", prior_mode)


# Each gateway a test starts listens on a port of its own and its relay on the next (`--relay-port`
# defaults to PORT + 1). From 10000 on, the pairs are clear of every fixed port of the site and its
# tests, all below 10000 (the session gateway's 8443 and 8444, Slurm's 68xx, the managers' 91xx,
# the Python API test's 9445 and 9446, ports tests hold or drop), and of the ephemeral range.
_GATEWAY_PORTS = itertools.count(10000, 2)
DEFAULT_PORTS = (8443, 8444)  # a gateway started without --listen: the session gateway's


def gateway_ports() -> tuple[int, int]:
    """A port for a gateway and the next, for its relay; no other gateway of the session gets them."""
    port = next(_GATEWAY_PORTS)
    return port, port + 1


class SiteGateway:
    """A gateway on a simulated site, run by `vpn-provider gateway` as the site's user on ``host``
    with state dir ``state`` and the options ``args``. ``listen``: on ports of its own (from
    gateway_ports()), or (False) on the default listen address. ``vp``: the vpn-provider to run;
    ``run``: Site.run_user's keyword arguments (env, cwd, hide) for each of its commands."""

    def __init__(self, site, host, state: Path, *args: str, listen: bool = True, vp: str = VP, **run):
        self.site, self.host, self.state, self.args, self.vp, self.run = site, host, state, args, vp, run
        self.port, self.relay_port = gateway_ports() if listen else DEFAULT_PORTS
        self.listen = ("--listen", f"0.0.0.0:{self.port}") if listen else ()
        self.ticket = state / "ticket.json"
        self.started: subprocess.CompletedProcess | None = None  # the last `gateway start`
        self.running = False  # as far as start() and stop() know (a test may kill it otherwise)

    @property
    def pid(self) -> int:
        """The supervisor's, from gateway.pid."""
        return int((self.state / "gateway.pid").read_text().split()[0])

    def command(self, action: str, *args: str) -> subprocess.CompletedProcess:
        return self.site.run_user(self.host, [self.vp, "gateway", action, "--state-dir", str(self.state), *args],
                                  **self.run)

    def start(self) -> subprocess.CompletedProcess:
        """`gateway start`, which must succeed; again after a stop or a crash."""
        self.running = True  # a start that timed out may have left it up
        self.started = self.command("start", *self.listen, *self.args)
        self.running = self.started.returncode == 0
        assert self.started.returncode == 0, self.started.stderr
        return self.started

    def stop(self) -> subprocess.CompletedProcess:
        """`gateway stop`, whether or not one runs (its result says)."""
        self.running = False
        return self.command("stop")

    def tunnel_clients(self) -> int:
        """Workers with a tunnel session at this gateway."""
        done = self.command("status", "--json")
        assert done.returncode == 0, done.stderr
        return sum(w["vpn_ip"] != "" for w in json.loads(done.stdout)["workers"])


@pytest.fixture
def start_gateway(request):
    """Starts gateways of the test's own: ``start_gateway(name, *args, site=None, host=None, **kw)``
    runs `gateway start` with state dir ~/NAME and the options ``args``, on ``host`` of ``site``
    (by default the session's site and its login host), on ports of its own unless ``listen=False``
    (SiteGateway takes ``kw``), and returns the running SiteGateway. Whatever the test left running
    is stopped at its end, failed or not."""
    with ExitStack() as stops:
        def start(name: str, *args: str, site=None, host=None, **kw) -> SiteGateway:
            site = site or request.getfixturevalue("site_env").site
            gw = SiteGateway(site, host or site.login, site.home / name, *args, **kw)
            stops.callback(lambda: gw.running and gw.stop())
            gw.start()
            return gw
        yield start


class SiteEnv:
    """A built site with DNS/HTTP/XRootD on the internet host and one running gateway."""

    def __init__(self, site, http_url, xrootd_url, big_sha, gateway_dir):
        self.site, self.http_url, self.xrootd_url, self.big_sha = site, http_url, xrootd_url, big_sha
        self.gateway = SiteGateway(site, site.login, gateway_dir, listen=False)
        self.gateway_dir, self.ticket = gateway_dir, self.gateway.ticket
        self.node = site.nodes[0]
        self.baseline: set[int] = set()

    def vp(self, host, *args, timeout=120, **kw):
        return self.site.run_user(host, [VP, *args], timeout=timeout, **kw)

    def exec_(self, *cmd, ticket=None, extra=(), timeout=120, **kw):
        return self.vp(self.node, "exec", "--ticket", str(ticket or self.ticket), *extra, "--", *cmd,
                       timeout=timeout, **kw)

    def leftovers(self, timeout: float = 10.0) -> set[int]:
        """User processes beyond the gateway's own, after waiting for them to go away."""
        wait_until(lambda: set(self.site.user_pids()) <= self.baseline, timeout)
        return set(self.site.user_pids()) - self.baseline

    def write_ticket(self, name: str, text: str, mode: int = 0o600) -> Path:
        path = self.site.home / name
        path.write_text(text)
        os.chmod(path, mode)
        shutil.chown(path, self.site.user, self.site.user)
        return path


@pytest.fixture(scope="session")
def site_env():
    from vpn_provider.sim import data, services
    with own_site(nodes=2) as site:  # two: jobs that span nodes (srun -N2)
        docroot = services.docroot(site)
        big_sha = data.random_file(docroot / "big.bin", 200)
        data.nanoaod_file(docroot / "events.root", n_events=20_000)
        services.start_dns(site)
        http_url = services.start_http(site, docroot)
        xrootd_url = services.start_xrootd(site, docroot)
        env = SiteEnv(site, http_url, xrootd_url, big_sha, site.home / "gw-main")
        env.gateway.start()
        env.baseline = set(site.user_pids())
        yield env
        env.gateway.stop()


@pytest.fixture(scope="session")
def slurm(site_env):
    """Real Slurm (Debian's) on the site: slurmctld on the login host, a slurmd on each node."""
    from vpn_provider.sim.slurm import SlurmCluster, missing_programs
    if missing_programs():
        pytest.skip(f"Slurm is not installed ({', '.join(missing_programs())}); scripts/setup installs it")
    cluster = SlurmCluster(site_env.site).start()
    yield cluster
    cluster.close()


def root_helper(site, host, script: str, *args: str) -> subprocess.Popen:
    """Run a Python ``script`` as root on ``host``; returns once it printed "ready"."""
    path = site.workdir / f"helper-{secrets.token_hex(4)}.py"
    path.write_text(script)
    p = subprocess.Popen(site.as_root(host, [sys.executable, str(path), *args]), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


METADATA = "169.254.169.254"  # where a cloud login node's metadata service answers


def native_reach(site, host: str, port: int) -> bool:
    """Whether the login host itself (as root, no policy) connects to host:port."""
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3).close()"
    return subprocess.run(site.as_root(site.login, [sys.executable, "-c", probe]), capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def metadata_service(site_env):
    """169.254.169.254 on the internet host, reachable from the login host as a cloud login
    node's metadata service is: so only the policy stands between a worker and it. Removed
    afterwards."""
    from pyroute2 import NetNS

    from vpn_provider.sim.services import _wait_tcp, docroot
    site = site_env.site
    (docroot(site) / "hello.txt").write_text("hello\n")
    with NetNS(site.inet.ns) as ns:
        link = ns.link_lookup(ifname=f"{site.prefix}i")[0]
        ours = not ns.get_addr(address=METADATA)
        if ours:
            ns.addr("add", index=link, address=METADATA, prefixlen=32)
    server = None
    if not native_reach(site, METADATA, 80):
        server = site.start_service(site.inet, [sys.executable, "-m", "http.server", "80", "--bind", METADATA,
                                                "--directory", str(docroot(site))], "metadata-policy")
        _wait_tcp(site, 80, "metadata-policy", server)
    assert wait_until(lambda: native_reach(site, METADATA, 80), 15, 0.2), \
        "the login host cannot reach the metadata service: nothing to prove"
    yield
    if server:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    if ours:
        with NetNS(site.inet.ns) as ns:
            ns.addr("del", index=link, address=METADATA, prefixlen=32)
