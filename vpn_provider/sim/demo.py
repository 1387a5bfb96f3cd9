"""The demo: a simulated site, a gateway on the login host, and an analysis step on an offline
compute node that reads a ROOT file over XRootD by DNS name through the VPN.

Run as root (it builds network namespaces); every vpn-provider process runs as a throwaway
unprivileged user. Usage: python -m vpn_provider.sim.demo [--events N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import data, services
from .site import XROOTD_NAME, Site

BIN = Path(sys.executable).parent
VP, PY = str(BIN / "vpn-provider"), str(BIN / "python")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def bar(count: int, peak: int, width: int = 40) -> str:
    return "#" * max(1 if count else 0, round(width * count / peak)) if peak else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root; it builds network namespaces for the simulated site", file=sys.stderr)
        return 2
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)  # as shipped by most distributions; see README
    try:
        with Site(nodes=1) as site:
            node = site.nodes[0]
            step(f"simulated site {site.prefix}: internet {site.inet.addr}, login {site.login.addr}, "
                 f"compute node {node.addr} (no route out); user {site.user} (unprivileged)")
            docroot = services.docroot(site)
            data.nanoaod_file(docroot / "events.root", n_events=args.events)
            services.start_dns(site)
            services.start_http(site, docroot)
            url = services.start_xrootd(site, docroot) + "/data/events.root"
            print(f"internet host serves {url} ({(docroot / 'events.root').stat().st_size / 1e6:.1f} MB), "
                  f"DNS for {XROOTD_NAME}")

            step("without the VPN, the compute node cannot reach it")
            offline = site.run_user(node, [PY, "-m", "vpn_provider.sim.read_root", url], timeout=60)
            print(f"read_root exit {offline.returncode}: "
                  f"{(offline.stderr.strip().splitlines() or ['?'])[-1][:120]}")

            step("login host: vpn-provider gateway start (as the user)")
            state = site.home / "vpn-gateway"
            up = site.run_user(site.login, [VP, "gateway", "start", "--state-dir", str(state)])
            print(up.stdout.strip() or up.stderr.strip())
            if up.returncode != 0:
                return 1
            try:
                step("compute node: vpn-provider exec --ticket ticket.json -- python read_root.py URL")
                t0 = time.monotonic()
                run = site.run_user(node, [VP, "exec", "--ticket", str(state / "ticket.json"), "--",
                                           PY, "-m", "vpn_provider.sim.read_root", url], timeout=300)
                wall = time.monotonic() - t0
                if run.returncode != 0:
                    print(f"failed (exit {run.returncode}): {run.stderr.strip()}")
                    return 1
                result = json.loads(run.stdout.strip().splitlines()[-1])
                report(result, wall)
            finally:
                status = site.run_user(site.login, [VP, "gateway", "status", "--state-dir", str(state)])
                print("\n" + status.stdout.strip())
                site.run_user(site.login, [VP, "gateway", "stop", "--state-dir", str(state)])
                print("gateway stopped; tearing the site down")
    finally:
        os.chmod("/dev/net/tun", tun_mode)
    return 0


def report(r: dict, wall: float) -> None:
    mb = r["bytes"] / 1e6
    print(f"read {r['entries']:,} events, {r['muons']:,} muons from {r['url']}")
    print(f"opposite-sign dimuon events: {r['opposite_sign_pairs']:,}; mean muon pT {r['mean_pt']:.2f} GeV")
    print(f"{mb:.1f} MB in {r['seconds']:.2f} s = {8 * mb / r['seconds']:.0f} Mbit/s "
          f"(whole exec incl. tunnel set-up: {wall:.2f} s)")
    h = r["pt_histogram"]
    peak = max(h["counts"])
    print("muon pT [GeV]")
    for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
        print(f"  {lo:5.0f}-{hi:<5.0f} {c:>9,} {bar(c, peak)}")


if __name__ == "__main__":
    raise SystemExit(main())
