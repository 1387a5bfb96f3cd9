"""Benchmark figures for issue 8: recovery after a gateway restart, and bursts of workers.

- recovery: a worker polls DNS + HTTP every 0.1 s; the gateway is stopped and started again; the
  figure is the time from `gateway start` returning to the worker's first successful poll.
- bursts: many workers started at the same moment (64 default-mode on one node, 256 relay-only
  over four): the time until every CMD ran, and the gateway's memory while they are all up.
"""
from __future__ import annotations

import subprocess
import time

from vpn_provider.sim.site import HTTP_NAME

GATEWAY_PROCS = {"ocserv-main", "ocserv-sm", "ocserv-worker", "slirp4netns", "vpnp-gw-relay"}
_POLL = (f"while :; do if getent hosts {HTTP_NAME} >/dev/null && curl -s -m 1 -o /dev/null "
         f"http://{HTTP_NAME}/hello.txt; then date +%s.%N; fi; sleep 0.1; done")


def _gateway(bench, action: str) -> float:
    done = bench.site.run_user(bench.site.login, [bench.vp, "gateway", action, "--state-dir", str(bench.home / "gw")])
    if done.returncode != 0 and action == "start":
        raise RuntimeError(f"gateway start: {done.stderr.strip()}")
    return time.time()


def _first_line_after(proc: subprocess.Popen, since: float, timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if float(line) > since:
            return float(line) - since
    return None


def recovery_s(bench, path: str, restarts: int) -> list[float]:
    """Seconds from `gateway start` returning to the first good poll, one per restart."""
    [worker] = bench.start(path, ["sh", "-c", _POLL], "rec")[:1]
    out = []
    try:
        if _first_line_after(worker, 0, 30) is None:
            raise RuntimeError(f"{path}: the polling worker never got through")
        for _ in range(restarts):
            _gateway(bench, "stop")
            time.sleep(2)
            returned = _gateway(bench, "start")
            took = _first_line_after(worker, returned, 60)
            if took is None:
                raise RuntimeError(f"{path}: no recovery within 60 s of gateway start")
            out.append(took)
    finally:
        worker.kill()
        worker.wait(timeout=15)
    return out


def burst(bench, path: str, per_node: int, nodes: int) -> dict:
    """Start ``per_node`` workers on each of ``nodes`` nodes at once; how long until every CMD
    ran, and the gateway's memory (MB, RSS) with all of them up."""
    site = bench.site
    _, extra = bench.exec_paths[path]
    t0 = time.time()
    procs = [site.popen_user(site.nodes[i % nodes], [bench.vp, "exec", *extra, "--timeout", "240",
                                                     "--ticket", str(bench.home / "gw" / "ticket.json"),
                                                     "--", "sh", "-c", "date +%s.%N; exec sleep 600"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(per_node * nodes)]
    try:
        ran = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"{path} burst: a worker failed: {p.communicate()[1].strip()[-300:]}")
            ran.append(float(line) - t0)
        memory = bench.memory_kb_by_comm(GATEWAY_PROCS)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    ran.sort()
    return {"workers": len(procs), "nodes": nodes, "all_running_s": ran[-1], "median_s": ran[len(ran) // 2],
            "gateway_mb": sum(memory.values()) / 1024,
            "gateway_by_process_mb": {c: round(kb / 1024, 1) for c, kb in sorted(memory.items())}}
