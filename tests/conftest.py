"""Fixtures for the three test tiers: pure, user-namespace, and the simulated site (root builds it;
every product process runs as the site's unprivileged user)."""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
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


class SiteEnv:
    """A built site with DNS/HTTP/XRootD on the internet host and one running gateway."""

    def __init__(self, site, http_url, xrootd_url, big_sha, gateway_dir):
        self.site, self.http_url, self.xrootd_url, self.big_sha = site, http_url, xrootd_url, big_sha
        self.gateway_dir = gateway_dir
        self.ticket = gateway_dir / "ticket.json"
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
    reason = _site_skip_reason()
    if reason:
        pytest.skip(reason)
    from vpn_provider.sim import data, services
    from vpn_provider.sim.site import Site
    prior_mode = os.stat("/dev/net/tun").st_mode & 0o777
    # Model an ordinary compute node: distributions ship /dev/net/tun as 0666 (see README).
    os.chmod("/dev/net/tun", 0o666)
    site = Site(nodes=2).build()  # two: jobs that span nodes (srun -N2)
    try:
        docroot = services.docroot(site)
        big_sha = data.random_file(docroot / "big.bin", 200)
        data.nanoaod_file(docroot / "events.root", n_events=20_000)
        services.start_dns(site)
        http_url = services.start_http(site, docroot)
        xrootd_url = services.start_xrootd(site, docroot)
        gateway_dir = site.home / "gw-main"
        env = SiteEnv(site, http_url, xrootd_url, big_sha, gateway_dir)
        started = env.vp(site.login, "gateway", "start", "--state-dir", str(gateway_dir))
        assert started.returncode == 0, started.stderr
        env.baseline = set(site.user_pids())
        yield env
        env.vp(site.login, "gateway", "stop", "--state-dir", str(gateway_dir))
    finally:
        site.close()
        os.chmod("/dev/net/tun", prior_mode)


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
