"""Real Slurm on the simulated site: Debian 12's slurmctld, slurmd and munge.

    login host    munged (this cluster's own key and socket), slurmctld
    node i        slurmd -N node<i>, NodeAddr = that node's LAN address

Needs the Debian packages ``slurmctld slurmd slurm-client munge``. The daemons run as root (test
infrastructure); Slurm itself starts every job step as the site's unprivileged user, in the
directory sbatch ran in, as a child of that node's slurmd and so in that node's network namespace.

Clients find the cluster through ``env`` (SLURM_CONF), or through ``bin_dir``: wrappers for the
client commands that set it, so that putting ``bin_dir`` first on PATH is enough.
sbatch's default ``--export=ALL`` carries both into the job, where srun then finds the cluster.
There is no accounting daemon: ``sacct`` fails ("Slurm accounting storage is disabled"), and
Parsl's SlurmProvider falls back to squeue, as on many real sites.

Everything lives under ``site.workdir/NAME``. A second cluster on the same site (another
``name`` and ``port``) can run its nodes as where user namespaces are off (``userns_off``:
each slurmd, and so every job, inside sim/userns_off.py's wrapper). ``close()`` (also run
when ``start()`` fails half-way)
cancels the user's jobs, then ends any job step left and the daemons. Call it before
``site.close()``: that kills the daemons too, but not a job step still running.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .site import Host, Site

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CLIENTS = ("sbatch", "squeue", "scancel", "srun", "salloc", "sinfo", "scontrol", "sacct")
PARTITION = "compute"
CTLD_PORT = 6817  # Slurm's default; slurmd's is the next
KILL_WAIT = 2  # s from a job's SIGTERM to its SIGKILL (Slurm's default: 30)

_SLURM_CONF = """\
ClusterName={cluster}
# slurmctld refuses to start unless this names the machine it runs on; the namespaces share it.
SlurmctldHost={hostname}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
# No cgroups to track or confine jobs by: see cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# slurmctld starts batch jobs only from its once-a-second loop, and by default only every 3 s:
# make that every second (read at the first scheduling pass, some 3 s after start-up).
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true  # no mail here; the default (/bin/mail) is missing, an error in the log
# Trust the CPUs and memory below, not what each slurmd detects (all nodes share one machine).
SlurmdParameters=config_overrides
ReturnToService=2
# Short timeouts: a test waits for these, and everything is local.
MessageTimeout=5
KillWait={kill_wait}
{nodes}
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

# `ip netns exec` mounts a fresh /sys, in which nothing is mounted on fs/cgroup. slurmd loads a
# cgroup plugin even when no other plugin uses it; left to detect which, it fails ("No filesystem
# mounted on /sys/fs/cgroup"). Named, cgroup/v1 asks nothing of the file system until used.
_CGROUP_CONF = "CgroupPlugin=cgroup/v1\n"


class SlurmCluster:
    def __init__(self, site: Site, *, cpus: int | None = None, start_timeout: float = 30, name: str = "slurm",
                 port: int = CTLD_PORT, userns_off: bool = False):
        if not site.nodes:
            raise ValueError("a Slurm cluster needs at least one compute node")
        self.site = site
        self.cpus = cpus or os.cpu_count() or 1
        self.start_timeout = start_timeout
        self.name, self.port, self.userns_off = name, port, userns_off
        self.dir = site.workdir / name
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.bin_dir = self.dir / "bin"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.node_names = [f"node{i}" for i in range(len(site.nodes))]
        self._daemons: dict[str, subprocess.Popen] = {}  # in start order
        self._user_namespaces: set[int] = set()  # our slurmd's: where our job steps run

    # -- starting ---------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        if missing := missing_programs():
            raise FileNotFoundError(f"{', '.join(missing)} not found: apt-get install {' '.join(PACKAGES)}")
        try:
            self._make_dirs()
            self._write_config()
            self._write_wrappers()
            self._start_munged()
            self._daemon(self.site.login, ["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
            wrapper = [sys.executable, "-m", "vpn_provider.sim.userns_off"] if self.userns_off else []
            # Clients and slurmd's that find no controller yet retry only a second later.
            self._wait_for(self._ctld_listening, "slurmctld's port")
            for name, node in zip(self.node_names, self.site.nodes):
                self._daemon(node, [*wrapper, "slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}")
            self._wait_for(self._all_nodes_idle, "every node idle")
            # Another cluster's steps may share the nodes' namespaces, but not this user namespace
            # as well (unless both are the init one, and then only one cluster runs).
            self._user_namespaces = {_ns_inode(p.pid, "user") for name, p in self._daemons.items()
                                     if name.startswith("slurmd")}
            self._first_job()
            return self
        except BaseException:
            self.close()
            raise

    def _make_dirs(self) -> None:
        # slurmd makes its own spool directory, but not its parent ("fatal: mkdir(...)").
        for sub in ("state", "run", "log", "munge", "bin", *(f"spool/{n}" for n in self.node_names)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def _write_config(self) -> None:
        memory_mb = _memory_mb()
        nodes = "\n".join(f"NodeName={name} NodeAddr={node.addr} CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN"
                          for name, node in zip(self.node_names, self.site.nodes))
        self.conf.write_text(_SLURM_CONF.format(
            cluster=f"{self.site.prefix}{self.name.replace('-', '')}"[:40],
            hostname=socket.gethostname().split(".")[0], ctld_addr=self.site.login.addr,
            munge_socket=self.munge_socket, dir=self.dir, nodes=nodes, partition=PARTITION, kill_wait=KILL_WAIT,
            ctld_port=self.port, slurmd_port=self.port + 1))
        (self.dir / "cgroup.conf").write_text(_CGROUP_CONF)

    def _write_wrappers(self) -> None:
        for name in CLIENTS:
            path, real = self.bin_dir / name, shutil.which(name, path=SYSTEM_PATH)
            path.write_text(f'#!/bin/sh\nexport SLURM_CONF={self.conf}\nexec {real} "$@"\n')
            path.chmod(0o755)

    def _start_munged(self) -> None:
        """A munged of this cluster's own (key, socket), not the system's: nothing outside the
        site is touched, and other sites' clusters cannot talk to this one."""
        d = self.munge_socket.parent
        key = d / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)  # munged refuses a readable key
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        # In the foreground munged logs to stderr alone.
        self._daemon(self.site.login, ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                                       f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"], "munged")
        self._wait_for(self.munge_socket.exists, "munged's socket")

    def _daemon(self, host: Host, argv: list[str], name: str) -> None:
        # As a site service, site.close() kills it even if close() is never called. Its stderr
        # (why it would not start) goes to site.workdir/slurm-NAME.log, the rest to self.dir/log.
        self._daemons[name] = self.site.start_service(host, argv, f"{self.name}-{name}")

    def _ctld_listening(self) -> bool:
        """slurmctld listens on its port, in the login host's namespace (what /proc/PID/net shows)."""
        pid = self._daemons["slurmctld"].pid
        return _netns_inode(pid=pid) == _netns_inode(self.site.login.ns) and self.port in _listening(pid)

    def _all_nodes_idle(self) -> bool:
        done = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], timeout=10)
        states = dict(line.split() for line in done.stdout.splitlines())
        return done.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names)

    def _first_job(self) -> None:
        """A job step on every node, as root (40 ms): a cluster that cannot start one (munge,
        spool, cgroup plugin) fails here, not in a test's first job."""
        done = self.run(["srun", f"--nodes={len(self.site.nodes)}", "true"], timeout=self.start_timeout)
        if done.returncode != 0:
            raise RuntimeError(f"the first job failed: {done.stderr.strip()}; see {self.dir / 'log'}")

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            dead = [name for name, p in self._daemons.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited: see {self.site.workdir / f'{self.name}-{dead[0]}.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}: see {self.dir / 'log'}")
            time.sleep(0.05)

    # -- using --------------------------------------------------------------------------------
    def run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command, as root on the login host (administration, not product)."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return subprocess.run(self.site.as_root(self.site.login, ["env", *env, *argv]), capture_output=True,
                              text=True, timeout=timeout)

    # -- tearing down -----------------------------------------------------------------------
    def close(self) -> None:
        if not self._daemons:
            return
        self._cancel_all_jobs()
        self._kill_steps()  # what is left is stuck, and slurmd's shutdown would wait for it
        for p in reversed(self._daemons.values()):  # slurmd's, slurmctld, munged last: all need it
            _stop(p)
        self._daemons.clear()
        self._kill_steps()  # any step started meanwhile

    def _cancel_all_jobs(self) -> None:
        """scancel, so that jobs end as on a real cluster (SIGTERM, then SIGKILL after KillWait),
        and wait a little for that: stopping slurmd leaves running steps behind."""
        ctld = self._daemons.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        try:
            if self.run(["scancel", f"--user={self.site.user}"], timeout=10).returncode != 0:
                return
            # KillWait, and a second for the nodes to report; a step whose srun is gone can take
            # many more to give up on it, and _kill_steps does not wait for that.
            deadline = time.monotonic() + KILL_WAIT + 1
            while time.monotonic() < deadline:
                left = self.run(["squeue", "--noheader", "--format=%i"], timeout=10)
                if left.returncode != 0 or not left.stdout.strip():
                    return
                time.sleep(0.1)
        except subprocess.TimeoutExpired:
            pass

    def _kill_steps(self) -> None:
        """SIGKILL each slurmstepd still in a node's namespace, with every process under it."""
        inodes = {_netns_inode(node.ns) for node in self.site.nodes} - {None}
        users = self._user_namespaces or {_ns_inode(os.getpid(), "user")}
        for _ in range(3):  # again, for anything forked meanwhile
            children: dict[int, list[int]] = {}
            steps = []
            for pid in _pids():
                children.setdefault(_ppid(pid), []).append(pid)
                if _comm(pid) == "slurmstepd" and _netns_inode(pid=pid) in inodes and _ns_inode(pid, "user") in users:
                    steps.append(pid)
            if not steps:
                return
            while steps:
                pid = steps.pop()
                steps.extend(children.get(pid, ()))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def missing_programs() -> list[str]:
    """The programs of PACKAGES this machine lacks (for a test to skip on)."""
    return [p for p in ("munged", "slurmctld", "slurmd", *CLIENTS) if not shutil.which(p, path=SYSTEM_PATH)]


def _stop(p: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM (each daemon saves or ends what it must), SIGKILL to its whole group if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:  # the fields after the name, which may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _listening(pid: int) -> set[int]:
    """TCP ports with a listening socket in ``pid``'s network namespace."""
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in map(str.split, lines):
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _netns_inode(ns: str | None = None, pid: int | None = None) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}" if ns else f"/proc/{pid}/ns/net").st_ino
    except OSError:  # gone, or not ours to inspect
        return None
