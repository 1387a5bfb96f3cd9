"""The demo: a Coffea analysis on a simulated HPC site whose compute nodes have no route out.

It builds the site (internet host with DNS and XRootD, login host, two compute nodes with
Debian's Slurm), starts the gateway on the login host, and runs the example notebook's code
there: Parsl submits one two-node job to Slurm, whose srun starts workers inside the VPN on
each compute node, and they read the ROOT files over XRootD by DNS name. Prints a progress bar,
a result table and the throughput, and saves the histogram as a PNG.

Run as root (it builds network namespaces); every vpn-provider process runs as a throwaway
unprivileged user. Usage: python -m vpn_provider.sim.demo [--files N] [--events N] [--png PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from . import data, services
from .site import XROOTD_NAME, Site
from .slurm import SlurmCluster

NODES = 2  # one Slurm job spanning both: srun starts a VPN-wrapped worker pool on each

BIN = Path(sys.executable).parent
VP, PY = str(BIN / "vpn-provider"), str(BIN / "python")
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "dimuon_xrootd.ipynb"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--events", type=int, default=250_000, help="events per file")
    ap.add_argument("--workers", type=int, default=2, help="Parsl workers on each compute node")
    ap.add_argument("--png", type=Path, default=Path("out/dimuon_mass.png"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root; it builds network namespaces for the simulated site", file=sys.stderr)
        return 2
    Site.clean_up_on_sigterm()
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)  # as shipped by most distributions; see README
    try:
        with Site(nodes=NODES) as site:
            return run(site, args)
    finally:
        os.chmod("/dev/net/tun", tun_mode)


def run(site: Site, args: argparse.Namespace) -> int:
    node = site.nodes[0]
    step(f"simulated site {site.prefix}: internet {site.inet.addr}, login {site.login.addr}, "
         f"compute nodes {', '.join(n.addr for n in site.nodes)} (no route out); user {site.user} (unprivileged)")
    docroot = services.docroot(site)
    urls = []
    for i in range(args.files):
        data.nanoaod_file(docroot / f"dimuon_{i}.root", n_events=args.events, seed=100 + i,
                          first_event=1 + i * args.events)
        urls.append(f"root://{XROOTD_NAME}//data/dimuon_{i}.root")
    services.start_dns(site)
    services.start_xrootd(site, docroot)
    size = sum((docroot / f"dimuon_{i}.root").stat().st_size for i in range(args.files)) / 1e6
    print(f"internet host serves {args.files} NanoAOD files ({size:.0f} MB) as root://{XROOTD_NAME}//data/...")

    step("without the VPN, the compute node cannot read them")
    offline = site.run_user(node, [PY, "-m", "vpn_provider.sim.read_root", urls[0]], timeout=60)
    print(f"exit {offline.returncode}: {(offline.stderr.strip().splitlines() or ['?'])[-1][:150]}")

    step("login host: vpn-provider gateway start --state-dir ~/vpn-gateway")
    state = site.home / "vpn-gateway"
    up = site.run_user(site.login, [VP, "gateway", "start", "--state-dir", str(state)])
    print(up.stdout.strip() or up.stderr.strip())
    if up.returncode != 0:
        return 1
    slurm = SlurmCluster(site).start()
    png = site.home / "dimuon_mass.png"
    try:
        step(f"login host: Coffea + Parsl (notebooks/{NOTEBOOK.name}); {args.workers} workers in the VPN "
             f"on each of {NODES} compute nodes via VPNLauncher(SrunLauncher()), one Slurm job")
        env = {"PATH": f"{slurm.bin_dir}:{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "VPN_TICKET": str(state / "ticket.json"),
               "DIMUON_FILES": " ".join(urls), "WORKERS": str(args.workers), "NODES": str(NODES), "CHUNKSIZE": "50000",
               "DIMUON_PNG": str(png), "WORKER_INIT": f"export PATH={BIN}:$PATH", "MPLBACKEND": "Agg",
               "COLUMNS": os.environ.get("COLUMNS", "100"), "TERM": os.environ.get("TERM", "xterm")}
        analysis = site.popen_user(site.login, [PY, "-m", "vpn_provider.sim.notebook", "script", str(NOTEBOOK)],
                                   env=env, cwd=str(site.home))
        code = analysis.wait(timeout=1200)
        if code != 0:
            print(f"analysis failed with exit status {code}")
            return 1
        args.png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.png)
        print(f"histogram saved as {args.png.resolve()}")
    finally:
        slurm.close()
        status = site.run_user(site.login, [VP, "gateway", "status", "--state-dir", str(state)])
        print("\n" + status.stdout.strip())
        site.run_user(site.login, [VP, "gateway", "stop", "--state-dir", str(state)])
        print("gateway stopped; tearing the site down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
