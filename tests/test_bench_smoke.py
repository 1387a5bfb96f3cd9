"""The benchmark's smoke run (about a minute): it builds its own site, measures every path once,
and writes its table, JSON and plot. Speed targets are reported by the full run, not asserted."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.site
REPO = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run_writes_table_json_and_plot(tmp_path):
    from conftest import BENCH_TOOLS
    missing = [tool for tool in BENCH_TOOLS if not shutil.which(tool)]
    if missing:
        pytest.skip(f"the benchmark's tools are missing: {', '.join(missing)} (scripts/setup installs them)")
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio to native" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for path in ("native", "ours", "ours-relay-only", "ours-preload", "prototype"):
        assert results["runs"]["1gbit"][path]["aggregate_mbit_s"]["1"] > 0
    assert results["exec_to_cmd_s"]["ours"]["median"] > 0 and results["exec_to_cmd_s"]["ours-preload"]["median"] > 0
    assert results["memory"]["ours_worker_tunnel_mb"] > 0
    assert 0 < results["memory"]["ours-relay-only_worker_tunnel_mb"] < results["memory"]["ours_worker_tunnel_mb"]
    for path in ("ours", "ours-tunnel", "ours-relay-only", "ours-preload"):
        assert 0 < results["recovery_s"][path]["median"] < 60
    assert results["bursts"]["ours"]["workers"] == 8 and results["bursts"]["ours"]["gateway_mb"] > 0
    assert results["bursts"]["ours-relay-only"]["nodes"] == 4
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
