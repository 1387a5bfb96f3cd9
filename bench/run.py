"""Benchmark the data path on the simulated site: native routing vs vpn-provider vs the prototype's
configuration, with the node<->login link capped at 1 Gbit/s (tbf) and uncapped.

    python -m bench.run [--smoke] [--out bench/results]      (as root)

Also: recovery after gateway restarts, and bursts of workers (bench/resilience.py).
Prints a table, writes results.json and throughput.png. Targets are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyroute2 import NetNS

from vpn_provider.sim import data, services

from . import resilience
from vpn_provider.sim.site import INET_ADDR, LAN, LOGIN_DOWN_ADDR, LOGIN_UP_ADDR, Site

BIN = Path(sys.executable).parent
VP, PY = str(BIN / "vpn-provider"), str(BIN / "python")
# ours: the defaults (TCP through the encrypted relay, the rest through the tunnel); ours-plain: the
# same with the gateway's --plain-relay opt-out; ours-tunnel: --tcp tunnel; ours-relay-only:
# --tcp relay-only (no tunnel); ours-preload: a plain exec on a node where user namespaces are
# off (sim/userns_off.py), which takes the preload transport.
PATHS = ("native", "ours", "ours-plain", "ours-tunnel", "ours-relay-only", "ours-preload", "prototype")
USERNS_OFF_PATHS = {"ours-preload"}
PLAIN_PORT = "8460"  # the --plain-relay gateway's listen port (its relay: + 1)
PROTOTYPE_PORT = "8450"
IPERF_BASE_PORT = 5201
DATA_PATH_PROCS = {"openconnect", "vpnns", "ocserv-worker", "slirp4netns", "vpnp-helper", "vpnp-gw-relay"}
_START_AT = ("import os, sys, time; time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
             "os.execvp(sys.argv[2], sys.argv[2:])")
_WAIT_ROUTE = "for i in $(seq 200); do ip route | grep -q default && break; sleep 0.05; done; exec \"$@\""


class Bench:
    def __init__(self, site: Site, args: argparse.Namespace):
        self.site, self.args = site, args
        self.node = site.nodes[0]
        self.home = site.home
        self._proto_gw: subprocess.Popen | None = None
        self.vp = VP
        ticket = self.home / "gw" / "ticket.json"
        #: paths that run `vpn-provider exec`: name -> (ticket, extra exec options)
        self.exec_paths: dict[str, tuple[Path, list[str]]] = {
            "ours": (ticket, []), "ours-tunnel": (ticket, ["--tcp", "tunnel"]),
            "ours-relay-only": (ticket, ["--tcp", "relay-only"]), "ours-preload": (ticket, []),
            "ours-plain": (self.home / "gw-plain" / "ticket.json", [])}

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        site = self.site
        docroot = services.docroot(site)
        data.random_file(docroot / "large.bin", self.args.file_mb)
        (docroot / "hello.txt").write_text("hello\n")
        services.start_dns(site)
        services.start_http(site, docroot)
        services.start_xrootd(site, docroot)
        self._next_port = IPERF_BASE_PORT
        up = site.run_user(site.login, [VP, "gateway", "start", "--state-dir", str(self.home / "gw")])
        assert up.returncode == 0, up.stderr
        up = site.run_user(site.login, [VP, "gateway", "start", "--state-dir", str(self.home / "gw-plain"),
                                        "--listen", f"0.0.0.0:{PLAIN_PORT}", "--plain-relay"])
        assert up.returncode == 0, up.stderr
        self._proto_gw = site.popen_user(site.login, [PY, "-m", "bench.prototype_gateway", str(self.home / "proto"),
                                                      PROTOTYPE_PORT],
                                         env={"PYTHONPATH": str(Path(__file__).parent.parent)},
                                         stdout=subprocess.PIPE, text=True)
        assert self._proto_gw.stdout.readline().strip() == "READY"
        self._native_route()
        time.sleep(1)

    def _native_route(self) -> None:
        """A routed path node -> login -> internet, added only for the benchmark's baseline."""
        subprocess.run(self.site.as_root(self.site.login, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]), check=True)
        with NetNS(self.node.ns) as ns:
            ns.route("add", dst="0.0.0.0/0", gateway=LOGIN_DOWN_ADDR)
        with NetNS(self.site.inet.ns) as ns:
            ns.route("add", dst=str(LAN), gateway=LOGIN_UP_ADDR)

    def cap(self, rate: str | None) -> None:
        """tbf on both ends of the node<->login link (None removes it)."""
        for host, ifname in ((self.node, f"{self.site.prefix}n0"), (self.site.login, f"{self.site.prefix}L0")):
            with NetNS(host.ns) as ns:
                idx = ns.link_lookup(ifname=ifname)[0]
                # A root qdisc is deleted by its handle; a bare "del" answers ENOENT and would
                # leave the cap on (which once made "uncapped" read 956 Mbit/s).
                for qdisc in ns.get_qdiscs(index=idx):
                    if qdisc.get_attr("TCA_KIND") == "tbf":
                        ns.tc("del", index=idx, handle=qdisc["handle"], parent=qdisc["parent"])
                if any(q.get_attr("TCA_KIND") == "tbf" for q in ns.get_qdiscs(index=idx)):
                    raise RuntimeError(f"cannot remove the rate cap on {ifname}")
                if rate:
                    ns.tc("add", "tbf", index=idx, rate=rate, burst=256 * 1024, latency="20ms")

    def close(self) -> None:
        if self._proto_gw and self._proto_gw.poll() is None:
            self._proto_gw.terminate()
            self._proto_gw.wait(timeout=15)
        for state in ("gw", "gw-plain"):
            self.site.run_user(self.site.login, [VP, "gateway", "stop", "--state-dir", str(self.home / state)])

    # -- running a command over a path ---------------------------------------------------------
    def start(self, path: str, argv: list[str], tag: str) -> list[subprocess.Popen]:
        """Start ``argv`` on the node over ``path``; the first process's stdout is the result."""
        site = self.site
        if path == "native":
            return [site.popen_user(self.node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        if path in self.exec_paths:
            ticket, extra = self.exec_paths[path]
            return [site.popen_user(self.node, [VP, "exec", *extra, "--ticket", str(ticket), "--", *argv],
                                    userns_off=path in USERNS_OFF_PATHS, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)]
        # The prototype: `vpnns -- CMD` creates the namespace, openconnect attaches to it.
        cmd = site.popen_user(self.node, ["vpnns", "--name", tag, "--", "sh", "-c", _WAIT_ROUTE, "sh", *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)
        ticket = json.loads((self.home / "proto" / "ticket.json").read_text())
        oc = site.popen_user(self.node, ["openconnect", "--no-dtls", "--non-inter", "--passwd-on-stdin",
                                         f"--user={ticket['user']}", f"--servercert={ticket['pin']}",
                                         "--script-tun", "--script", f"vpnns --attach --name {tag}",
                                         f"https://{ticket['gateways'][0]}/"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        oc.stdin.write(ticket["secret"] + "\n")
        oc.stdin.close()
        return [cmd, oc]

    def run(self, path: str, argv_for, n: int, timeout: float = 300) -> list[str]:
        groups = [self.start(path, argv_for(i), f"b{i}") for i in range(n)]
        outputs = []
        for group in groups:
            out, err = group[0].communicate(timeout=timeout)
            if group[0].returncode != 0:
                raise RuntimeError(f"{path}: {err.strip()[-300:]}")
            outputs.append(out)
        for group in groups:
            for p in group[1:]:
                p.terminate()
                p.wait(timeout=15)
        return outputs

    # -- figures -------------------------------------------------------------------------------
    def iperf(self, path: str, n: int) -> dict:
        # Fresh one-off servers on fresh ports for every client: when a tunnel ends, its last
        # packets can be lost, and a reused server could still be "busy" with the old test.
        first, self._next_port = self._next_port, self._next_port + n
        servers = [subprocess.Popen(self.site.as_root(self.site.inet, ["iperf3", "-s", "-1", "-p", str(first + i)]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
        time.sleep(0.3)

        # Every client waits for one start time, so that their measuring windows coincide and
        # the sum of their rates is an aggregate; tunnels that come up at different moments
        # would otherwise each measure a window with less competition.
        start_at = time.time() + 1.5 + 0.3 * n

        def argv(i):
            # -O 1: leave out the first second (slow start, and the relay's buffers filling).
            return [PY, "-c", _START_AT, f"{start_at:.3f}",
                    "iperf3", "-c", INET_ADDR, "-p", str(first + i), "-R", "-t", str(self.args.seconds), "-O", "1",
                    "-J"]
        sampler = CpuSampler(self)
        try:
            with sampler:
                outs = self.run(path, argv, n)
        finally:
            for server in servers:
                server.kill()
                server.wait()
        cpu = sampler.seconds()
        reports = [json.loads(o) for o in outs]
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            raise RuntimeError(f"iperf3 over {path} x{n}: {errors[0]}")
        results = [r["end"] for r in reports]
        bits = sum(r["sum_received"]["bits_per_second"] for r in results)
        moved = sum(r["sum_received"]["bytes"] for r in results)
        # The CPU was spent over the omitted first second too, so divide by every byte moved.
        moved_all = sum(i["sum"]["bytes"] for rep in reports for i in rep["intervals"])
        return {"mbit_s": bits / 1e6, "bytes": moved,
                "cpu_s_per_gb": cpu / (moved_all / 1e9) if moved_all else None}

    def xrootd(self, path: str) -> float:
        # By address: the native path has no DNS (the node's resolver is offline by design).
        script = (f"t0=$(date +%s.%N); xrdcp -s -f root://{INET_ADDR}//data/large.bin /dev/null || exit 1; "
                  "t1=$(date +%s.%N); echo \"$t0 $t1\"")
        for _ in range(3):  # a lost output (seen once from the prototype's vpnns) costs a rerun, not the run
            [out] = self.run(path, lambda i: ["sh", "-c", script], 1)
            times = out.split()
            if len(times) == 2:
                t0, t1 = map(float, times)
                return self.args.file_mb * 8 * 1.048576 / (t1 - t0)
            print(f"bench: {path}: xrdcp printed {out!r}; again", file=sys.stderr, flush=True)
        raise RuntimeError(f"{path}: xrdcp gave no times in three tries")

    def start_latency(self, path: str) -> float:
        t0 = time.time()
        [out] = self.run(path, lambda i: ["date", "+%s.%N"], 1)
        return float(out.strip()) - t0

    def cpu(self) -> dict[int, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for pid in self.site.user_pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if comm in DATA_PATH_PROCS:
                out[pid] = (int(fields[11]) + int(fields[12])) / ticks
        return out


    def memory_kb_by_comm(self, comms: set[str], field: str = "Rss") -> dict[str, int]:
        """A /proc/PID/smaps_rollup field (kB) of the user's processes named in ``comms``,
        summed per name. "Private" is Private_Clean + Private_Dirty (what the process alone holds)."""
        by_comm: dict[str, int] = {}
        for pid in self.site.user_pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                if comm not in comms:
                    continue
                rollup = {name: int(text.split()[0]) for name, text in _rollup(pid).items() if text.split()}
                value = rollup["Private_Clean"] + rollup["Private_Dirty"] if field == "Private" else rollup[field]
                by_comm[comm] = by_comm.get(comm, 0) + value
            except (OSError, KeyError, ValueError):
                pass
        return by_comm

    def _hold(self, path: str, n: int, seconds: float, settle: float, measure):
        """Start ``n`` idle workers over ``path``, call ``measure()`` once they are up, end them."""
        groups = [self.start(path, ["sleep", str(seconds)], f"m{i}") for i in range(n)]
        time.sleep(settle)
        try:
            return measure()
        finally:
            for group in groups:
                group[0].wait(timeout=30)
                for p in group[1:]:
                    p.terminate()
                    p.wait(timeout=15)

    def memory(self, paths: tuple[str, ...]) -> dict:
        """RSS of one worker's tunnel processes (the issue's measure; it counts shared library
        pages in full), and with four workers on the node their PSS and private memory each."""
        out = {}
        for path, comms in (("ours", {"openconnect", "vpnp-helper"}), ("ours-tunnel", {"openconnect", "vpnp-helper"}),
                            ("ours-relay-only", {"vpnp-helper"}), ("ours-preload", {"vpnp-helper"}),
                            ("prototype", {"openconnect", "vpnns"})):
            if path not in paths:
                continue
            # vpnns counts twice in the prototype: the `--attach` copier and the namespace's parent.
            rss = self._hold(path, 1, 4, 2.5, lambda: self.memory_kb_by_comm(comms))
            out[f"{path}_worker_tunnel_mb"] = sum(rss.values()) / 1024
            pss, private = self._hold(path, 4, 5, 3.5, lambda: (self.memory_kb_by_comm(comms, "Pss"),
                                                                self.memory_kb_by_comm(comms, "Private")))
            out[f"{path}_worker_tunnel_pss_mb"] = sum(pss.values()) / 4 / 1024
            out[f"{path}_worker_tunnel_private_mb"] = sum(private.values()) / 4 / 1024
        if "ours" not in paths:
            return out
        gw = {"ocserv-main", "ocserv-sm", "ocserv-worker", "slirp4netns", "vpnp-gw-relay"}
        by_comm = self._hold("ours", 16, 6, 4, lambda: self.memory_kb_by_comm(gw))
        out["gateway_16_clients_mb"] = sum(by_comm.values()) / 1024
        out["gateway_16_clients_by_process_mb"] = {c: round(kb / 1024, 1) for c, kb in sorted(by_comm.items())}
        return out


def _rollup(pid: int) -> dict[str, str]:
    """/proc/PID/smaps_rollup's fields, read through a live thread: a process whose main thread
    has ended (the node helper in tunnel mode, where only the keeper's thread goes on) shows
    none through its own PID."""
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda t: t.name != str(pid)):
        try:
            lines = (task / "smaps_rollup").read_text().splitlines()[1:]
        except ProcessLookupError:  # that thread has ended
            continue
        if lines:
            return dict(ln.split(":", 1) for ln in lines)
    return {}


class CpuSampler:
    """CPU seconds used by data-path processes during a block: sampled every 0.1 s, because the
    client-side processes are gone by the time the block ends."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()

    def __enter__(self):
        self.first = self.bench.cpu()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.1):
            self.last.update(self.bench.cpu())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def seconds(self) -> float:
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="about a minute: checks the benchmark works")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure, median taken (default 3; smoke 1)")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated paths to measure (default all: {','.join(PATHS)}); native always")
    args = ap.parse_args(argv)
    asked = set(args.paths.split(","))
    if asked - set(PATHS):
        ap.error(f"unknown paths: {', '.join(sorted(asked - set(PATHS)))}")
    args.paths = tuple(p for p in PATHS if p in asked or p == "native")
    repeats, args.seconds = (1, 1) if args.smoke else (3, 5)
    args.repeats = args.repeats or repeats
    args.workers = [1, 2] if args.smoke else [1, 2, 4, 8, 16]
    args.file_mb = 50 if args.smoke else 500
    args.latency_runs = 3 if args.smoke else 20
    args.restarts = 1 if args.smoke else 5
    args.burst_default, args.burst_relay_only = (8, 16) if args.smoke else (64, 256)
    caps = {"1gbit": "1gbit"} if args.smoke else {"1gbit": "1gbit", "uncapped": None}
    if os.geteuid() != 0:
        print("bench: run as root; it builds the simulated site", file=sys.stderr)
        return 2
    Site.clean_up_on_sigterm()
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "runs": {}}
    try:
        with Site(nodes=4) as site:  # four for the relay-only burst; the rest uses node0
            bench = Bench(site, args)
            try:
                bench.setup()
                for cap_name, rate in caps.items():
                    bench.cap(rate)
                    per_cap: dict = {}
                    for path in args.paths:
                        entry: dict = {"aggregate_mbit_s": {}, "cpu_s_per_gb": [], "xrootd_mbit_s": []}
                        for n in args.workers:
                            runs = [bench.iperf(path, n) for _ in range(args.repeats)]
                            entry["aggregate_mbit_s"][str(n)] = median([r["mbit_s"] for r in runs])
                            if n == 1:
                                entry["cpu_s_per_gb"] = median([r["cpu_s_per_gb"] for r in runs if r["cpu_s_per_gb"]])
                            rate = entry["aggregate_mbit_s"][str(n)]
                            print(f"{cap_name:>8} {path:>15} x{n:<2} {rate:8.0f} Mbit/s", flush=True)
                        entry["xrootd_mbit_s"] = median([bench.xrootd(path) for _ in range(args.repeats)])
                        per_cap[path] = entry
                    results["runs"][cap_name] = per_cap
                bench.cap(None)
                latency = {p: sorted(bench.start_latency(p) for _ in range(args.latency_runs))
                           for p in ("native", "ours", "ours-relay-only", "ours-preload") if p in args.paths}
                results["exec_to_cmd_s"] = {p: {"median": median(v), "p90": v[int(0.9 * (len(v) - 1))]}
                                            for p, v in latency.items()}
                results["memory"] = bench.memory(args.paths)
                results["recovery_s"] = {}
                for path in ("ours", "ours-tunnel", "ours-relay-only", "ours-preload"):  # all on the restarted gateway
                    if path not in args.paths:
                        continue
                    runs = resilience.recovery_s(bench, path, args.restarts)
                    results["recovery_s"][path] = {"runs": runs, "median": median(runs)}
                    print(f"recovery {path:>15}: {', '.join(f'{r:.2f}' for r in runs)} s", flush=True)
                bursts = {"ours": (args.burst_default, 1), "ours-relay-only": (args.burst_relay_only // 4, 4)}
                results["bursts"] = {path: resilience.burst(bench, path, *size) for path, size in bursts.items()
                                     if path in args.paths}
            finally:
                bench.close()
    finally:
        os.chmod("/dev/net/tun", tun_mode)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    from .report import plot, table
    print(table(results))
    plot(results, args.out / "throughput.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
