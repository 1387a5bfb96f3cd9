"""The simulated internet host's services: dnsmasq, an HTTP server and an XRootD server."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .site import DOMAIN, HTTP_NAME, INET_ADDR, INET_ADDR6, IPV6_ONLY_NAME, XROOTD_NAME, Site

XROOTD_PORT = 1094


def _wait_tcp(site: Site, port: int, what: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until ``proc`` listens on ``port`` on both the IPv4 and the IPv6 address."""
    probe = ("import socket,sys\n"
             f"for a in ({INET_ADDR!r},{INET_ADDR6!r}):\n"
             "  s=socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET);s.settimeout(0.5)\n"
             f"  if s.connect_ex((a,{port})): sys.exit(1)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}; see {site.workdir}/{what}.log")
        if subprocess.run(site.as_root(site.inet, [sys.executable, "-c", probe])).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


def start_dns(site: Site) -> None:
    """Authoritative for sim.test only; nothing is forwarded anywhere. The service names are
    dual-stack (A and AAAA), IPV6_ONLY_NAME has an AAAA record alone (its A query: no data)."""
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={INET_ADDR}", f"--listen-address={INET_ADDR6}",
            f"--local=/{DOMAIN}/",
            *(f"--host-record={name},{INET_ADDR},{INET_ADDR6}" for name in (HTTP_NAME, XROOTD_NAME)),
            f"--host-record={IPV6_ONLY_NAME},{INET_ADDR6}",
            f"--pid-file={site.workdir}/dnsmasq.pid", "--user=nobody", "--group=nogroup",
            f"--log-facility={site.workdir}/dnsmasq-queries.log"]
    p = site.start_service(site.inet, argv, "dnsmasq")
    time.sleep(0.2)
    if p.poll() is not None:
        raise RuntimeError(f"dnsmasq exited; see {site.workdir}/dnsmasq.log")


def start_http(site: Site, docroot: Path, port: int = 80) -> str:
    # "::": http.server's dual-stack socket, so the IPv4 and the IPv6 address
    p = site.start_service(site.inet, [sys.executable, "-m", "http.server", str(port), "--bind", "::",
                                       "--directory", str(docroot)], "http")
    _wait_tcp(site, port, "http", p)
    return f"http://{HTTP_NAME}" + ("" if port == 80 else f":{port}")


def start_xrootd(site: Site, docroot: Path) -> str:
    """Serve ``docroot`` read-only and anonymously as root://xrootd.sim.test//data/..."""
    admin = site.workdir / "xrootd-admin"
    admin.mkdir(exist_ok=True)
    shutil.chown(admin, "nobody", "nogroup")
    export = docroot.parent / "xrd-root"
    (export).mkdir(exist_ok=True)
    link = export / "data"
    if not link.exists():
        os.symlink(docroot, link)
    cfg = site.workdir / "xrootd.cfg"
    cfg.write_text(f"""all.export /data r/o
oss.localroot {export}
xrd.port {XROOTD_PORT}
all.adminpath {admin}
all.pidpath {admin}
xrd.network nodnr
""")
    p = site.start_service(site.inet, ["xrootd", "-c", str(cfg), "-R", "nobody", "-n", site.prefix], "xrootd")
    _wait_tcp(site, XROOTD_PORT, "xrootd", p)
    return f"root://{XROOTD_NAME}/"


def docroot(site: Site) -> Path:
    d = site.workdir / "www"
    d.mkdir(exist_ok=True, mode=0o755)
    return d


__all__ = ["docroot", "start_dns", "start_http", "start_xrootd"]
