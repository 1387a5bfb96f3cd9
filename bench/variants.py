"""The tunnel's own settings, weighed one at a time (issue 4's list): single-stream iperf3 through
`vpn-provider exec --tcp tunnel` to gateways that differ in one option, beside native and the
relay, on one site in one run.

    python -m bench.variants [--seconds 5] [--repeats 3] [--out bench/results]      (as root)

Prints a table and writes variants.json. (DTLS vs TLS, compression and vpnns vs the tun fd are
the "prototype" path of bench.run.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vpn_provider.sim.site import Site

from .run import VP, Bench, median

# name -> extra `gateway start` options; each gets its own gateway and port.
VARIANTS = {
    "tunnel, mtu 1400 (default)": [],
    "tunnel, mtu 1200": ["--mtu", "1200"],
    "tunnel, pasta egress": ["--egress", "pasta"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root; it builds the simulated site", file=sys.stderr)
        return 2
    args.file_mb = 50
    Site.clean_up_on_sigterm()
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    results: dict = {}
    try:
        with Site(nodes=1) as site:
            bench = Bench(site, args)
            states, skipped = [], {}
            try:
                bench.setup()
                for i, (name, options) in enumerate(VARIANTS.items()):
                    state = site.home / f"variant{i}"
                    up = site.run_user(site.login, [VP, "gateway", "start", "--state-dir", str(state), "--no-relay",
                                                    "--listen", f"0.0.0.0:{9600 + 2 * i}", *options])
                    if up.returncode != 0:  # pasta missing, say: report it, measure the rest
                        skipped[name] = up.stderr.strip()
                        print(f"skipped {name}: {skipped[name]}", flush=True)
                        continue
                    states.append(state)
                    bench.exec_paths[name] = (state / "ticket.json", ["--tcp", "tunnel"])
                for cap, rate in (("1gbit", "1gbit"), ("uncapped", None)):
                    bench.cap(rate)
                    for path in ("native", "ours", *(v for v in VARIANTS if v not in skipped)):
                        try:
                            runs = [bench.iperf(path, 1) for _ in range(args.repeats)]
                        except RuntimeError as e:  # Debian 12's pasta, for one, is flaky: record it
                            results.setdefault(path, {})[cap] = {"mbit_s": None, "cpu_s_per_gb": None,
                                                                 "error": str(e)}
                            print(f"{cap:>8}  {path:<28} failed: {e}", flush=True)
                            continue
                        results.setdefault(path, {})[cap] = {
                            "mbit_s": median([r["mbit_s"] for r in runs]),
                            "cpu_s_per_gb": median([r["cpu_s_per_gb"] for r in runs if r["cpu_s_per_gb"]])}
                        print(f"{cap:>8}  {path:<28} {results[path][cap]['mbit_s']:8.0f} Mbit/s", flush=True)
            finally:
                for state in states:
                    site.run_user(site.login, [VP, "gateway", "stop", "--state-dir", str(state)])
                bench.close()
    finally:
        os.chmod("/dev/net/tun", tun_mode)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps({"results": results, "skipped": skipped}, indent=2) + "\n")
    print(f"\n{'single stream':<30}{'1 Gbit/s cap':>14}{'uncapped':>12}{'CPU s/GB (capped)':>20}")
    def cell(x, fmt):
        return "failed" if x is None else format(x, fmt)
    for path, by_cap in results.items():
        print(f"{path:<30}{cell(by_cap['1gbit']['mbit_s'], ',.0f'):>14}"
              f"{cell(by_cap['uncapped']['mbit_s'], ',.0f'):>12}{cell(by_cap['1gbit']['cpu_s_per_gb'], '.1f'):>20}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
