"""The benchmark's table and plot."""
from __future__ import annotations

from pathlib import Path

TARGETS = "targets: single stream capped >= 95% of native; uncapped >= 3000 Mbit/s; 16 workers capped >= 95% of native"


def _fmt(x, unit=""):
    return "-" if x is None else f"{x:,.0f}{unit}" if x >= 10 else f"{x:.2f}{unit}"


def table(results: dict) -> str:
    lines = []
    for cap, per_path in results["runs"].items():
        native = per_path["native"]
        workers = list(native["aggregate_mbit_s"])
        lines.append(f"\nlink {cap}: Mbit/s (ratio to native in the same run)")
        lines.append(f"{'path':<10}" + "".join(f"{'x' + str(n):>16}" for n in workers)
                     + f"{'xrootd 1 file':>18}{'CPU s/GB':>10}")
        for path, entry in per_path.items():
            cells = ""
            for n in workers:
                v, ref = entry["aggregate_mbit_s"][n], native["aggregate_mbit_s"][n]
                cells += f"{_fmt(v):>9} ({v / ref:4.0%})" if ref else f"{_fmt(v):>16}"
            cells += f"{_fmt(entry['xrootd_mbit_s']):>18}{_fmt(entry['cpu_s_per_gb']):>10}"
            lines.append(f"{path:<10}{cells}")
    lat = results.get("exec_to_cmd_s", {})
    if lat:
        lines.append("\nstart-up, seconds from launch to CMD running (median / p90): "
                     + "; ".join(f"{p} {v['median']:.3f} / {v['p90']:.3f}" for p, v in lat.items()))
    mem = results.get("memory", {})
    if mem:
        lines.append("memory (RSS MB): " + "; ".join(f"{k} {v:.1f}" for k, v in mem.items()))
    lines.append(TARGETS)
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    caps = list(results["runs"])
    fig, axes = plt.subplots(1, len(caps), figsize=(6 * len(caps), 4.2), squeeze=False)
    for ax, cap in zip(axes[0], caps):
        for path, entry in results["runs"][cap].items():
            xs = [int(n) for n in entry["aggregate_mbit_s"]]
            ax.plot(xs, list(entry["aggregate_mbit_s"].values()), marker="o", label=path)
        ax.set(xscale="log", xlabel="concurrent workers", ylabel="aggregate Mbit/s", title=f"node link {cap}")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
