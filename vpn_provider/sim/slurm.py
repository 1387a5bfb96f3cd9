"""A stand-in for Slurm on the simulated site (no real Slurm can run here).

The user-side commands ``sbatch``, ``sacct``, ``squeue``, ``scancel`` and ``srun`` are small
shell scripts in ``bin_dir``; put it first on the PATH of the process that runs Parsl's real
``SlurmProvider``. Job scripts land in a spool directory. A runner thread, owned by the root
process that built the site, starts each job on a compute node as the site's unprivileged user,
and records its state, which ``squeue`` reports. ``srun`` fans a command out as N local tasks.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from .site import Site

_SBATCH = """#!/bin/sh
set -e
spool={spool}
id=1000
while ! mkdir "$spool/lock.$id" 2>/dev/null; do id=$((id + 1)); done
cp "$1" "$spool/$id.sh"
echo PD > "$spool/$id.state"
echo "Submitted batch job $id"
"""
_SACCT = """#!/bin/sh
echo "Slurm accounting storage is disabled" >&2
exit 1
"""
_SQUEUE = """#!/bin/sh
# squeue --noheader --format='%i %t' --job 'ID,ID'
spool={spool}
for arg in "$@"; do ids=$arg; done
for id in $(echo "$ids" | tr ',' ' '); do
  [ -f "$spool/$id.state" ] && echo "$id $(cat "$spool/$id.state")"
done
exit 0
"""
_SCANCEL = """#!/bin/sh
for id in "$@"; do touch {spool}/$id.cancel; done
"""
_SRUN = """#!/bin/bash
# srun --ntasks N [options] CMD...: N local tasks of CMD, like srun on one node.
n=1
while [ $# -gt 0 ]; do
  case $1 in
    --ntasks|-n) n=$2; shift 2;;
    --ntasks=*) n=${1#*=}; shift;;
    -*) shift;;
    *) break;;
  esac
done
pids=()
for i in $(seq 0 $((n - 1))); do SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


class SimSlurm:
    def __init__(self, site: Site, *, userns_off: bool = False):
        """``userns_off``: jobs run as on nodes where user namespaces are off (sim/userns_off.py)."""
        self.site = site
        self.userns_off = userns_off
        name = "slurm-userns-off" if userns_off else "slurm"  # each its own jobs
        self.bin_dir = site.workdir / f"{name}-bin"
        self.spool = site.workdir / f"{name}-spool"
        self._jobs: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_node = 0

    def start(self) -> "SimSlurm":
        self.bin_dir.mkdir(exist_ok=True)
        self.spool.mkdir(exist_ok=True)
        shutil.chown(self.spool, self.site.user, self.site.user)
        for name, text in (("sbatch", _SBATCH), ("sacct", _SACCT), ("squeue", _SQUEUE),
                           ("scancel", _SCANCEL), ("srun", _SRUN)):
            path = self.bin_dir / name
            path.write_text(text.replace("{spool}", str(self.spool)) if name != "srun" else text)
            path.chmod(0o755)
        self._thread = threading.Thread(target=self._run, name="sim-slurm", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for script in sorted(self.spool.glob("*.sh")):
                job_id = script.stem
                if job_id not in self._jobs:
                    self._launch(job_id, script)
            for job_id, proc in list(self._jobs.items()):
                state = self.spool / f"{job_id}.state"
                if (self.spool / f"{job_id}.cancel").exists() and proc.poll() is None:
                    _kill_group(proc)
                    state.write_text("CA\n")
                elif proc.poll() is not None and state.read_text().strip() == "R":
                    state.write_text("CD\n" if proc.returncode == 0 else "F\n")
            time.sleep(0.2)

    def _launch(self, job_id: str, script: Path) -> None:
        text = script.read_text()
        node = self.site.nodes[self._next_node % len(self.site.nodes)]
        self._next_node += 1
        out = _sbatch_option(text, "output") or str(self.spool / f"{job_id}.out")
        err = _sbatch_option(text, "error") or str(self.spool / f"{job_id}.err")
        env = {"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "SLURM_JOB_ID": job_id,
               "SLURM_JOB_NAME": _sbatch_option(text, "job-name") or "job", "SLURM_CPUS_ON_NODE": str(os.cpu_count()),
               "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURMD_NODENAME": node.ns}
        (self.spool / f"{job_id}.state").write_text("R\n")
        with open(out, "ab") as o, open(err, "ab") as e:
            self._jobs[job_id] = self.site.popen_user(node, ["bash", str(script)], env=env, stdout=o, stderr=e,
                                                      userns_off=self.userns_off, cwd=str(script.parent),
                                                      start_new_session=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for proc in self._jobs.values():
            if proc.poll() is None:
                _kill_group(proc)


def _sbatch_option(text: str, name: str) -> str | None:
    m = re.search(rf"^#SBATCH --{name}=(\S+)", text, flags=re.M)
    return m.group(1) if m else None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
