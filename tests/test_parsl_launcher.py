"""Pure tests of VPNLauncher: Parsl conventions, `bash -n` on every launcher combination, then the
generated scripts run in real bash with srun/mpiexec/... replaced by shell functions (a fake
scheduler) and `vpn-provider exec --dry-run` reporting what would run inside the VPN."""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typeguard

pytest.importorskip("parsl", reason="parsl is an optional dependency: pip install vpn-provider[parsl]")

from parsl.launchers import (AprunLauncher, GnuParallelLauncher, JsrunLauncher, MpiExecLauncher,
                             MpiRunLauncher, SimpleLauncher, SingleNodeLauncher, SrunLauncher,
                             SrunMPILauncher, WrappedLauncher)
from parsl.launchers.base import Launcher
from parsl.providers import LocalProvider, SlurmProvider

from vpn_provider.parsl import VPNLauncher
from vpn_provider.transport import Transport

VP = str(Path(sys.executable).parent / "vpn-provider")

INNER = {
    "SingleNode": lambda: SingleNodeLauncher(),
    "Simple": lambda: SimpleLauncher(),
    "Srun": lambda: SrunLauncher(overrides="--exclusive"),
    "SrunMPI": lambda: SrunMPILauncher(),
    "MpiExec": lambda: MpiExecLauncher(),
    "MpiRun": lambda: MpiRunLauncher(),
    "Aprun": lambda: AprunLauncher(),
    "Jsrun": lambda: JsrunLauncher(),
    "GnuParallel": lambda: GnuParallelLauncher(),
    "Wrapped": lambda: WrappedLauncher(prepend="env"),
}

# (worker command as Parsl emits it, what must run inside the VPN: env assignments and argv)
COMMANDS = {
    "htex": ("process_worker_pool.py --max_workers_per_node=2 -a 10.0.0.1,login1 -p 0 -c 1.0 -m None "
             "--poll 10 --port=54000 --cert_dir None --logdir=/home/u/runinfo/000/htex --block_id=0 "
             "--hb_period=30 --hb_threshold=120 --drain_period=None --cpu-affinity none --mpi-launcher=mpiexec",
             None),
    "work_queue": ("PARSL_WORKER_BLOCK_ID=3 work_queue_worker --cores 1 -M parsl-wq-x --parent-death",
                   {"env": {"PARSL_WORKER_BLOCK_ID": "3"},
                    "argv": ["work_queue_worker", "--cores", "1", "-M", "parsl-wq-x", "--parent-death"]}),
    "quotes_and_dollars": ("""echo "it's $HOME" `uname` \\$x 'a  b'""",
                           {"env": {}, "argv": ["/bin/sh", "-c", """echo "it's $HOME" `uname` \\$x 'a  b'"""]}),
}


def test_is_a_parsl_launcher_that_providers_accept():
    launcher = VPNLauncher(SrunLauncher(), ticket="~/.vpn/ticket.json")
    assert isinstance(launcher, Launcher)
    SlurmProvider(launcher=launcher)
    LocalProvider(launcher=VPNLauncher())


def test_every_init_argument_is_an_attribute_of_the_same_name():
    launcher = VPNLauncher(MpiExecLauncher(), ticket="/t.json", timeout=30.0, executable="/opt/vp", debug=False)
    for name in inspect.signature(VPNLauncher.__init__).parameters:
        if name != "self":
            assert hasattr(launcher, name), name
    assert "ticket='/t.json'" in repr(launcher) and "MpiExecLauncher" in repr(launcher)
    assert isinstance(VPNLauncher().launcher, SingleNodeLauncher)


def test_init_is_typechecked():
    with pytest.raises(typeguard.TypeCheckError, match="ticket"):
        VPNLauncher(ticket=3)
    with pytest.raises(typeguard.TypeCheckError, match="launcher"):
        VPNLauncher(launcher="srun")
    assert "--ticket /t.json" in VPNLauncher(ticket=Path("/t.json")).wrap("w")


def test_tcp_transport_choice_reaches_the_exec_command():
    assert "--tcp" not in VPNLauncher().wrap("w")  # the default: chosen on the node
    assert "--tcp" not in VPNLauncher(tcp="auto").wrap("w")
    assert "--tcp tunnel" in VPNLauncher(tcp="tunnel").wrap("w")
    assert "--tcp relay-only" in VPNLauncher(tcp=Transport.RELAY_ONLY).wrap("w")
    assert "tcp='relay-only'" in repr(VPNLauncher(tcp=Transport.RELAY_ONLY))  # Parsl shows it so
    with pytest.raises(ValueError, match="transport 'udp' is not one of auto, relay, tunnel, relay-only"):
        VPNLauncher(tcp="udp")


def test_reconnect_timeout_reaches_the_exec_command_and_survives_repr():
    assert "--reconnect-timeout" not in VPNLauncher().wrap("w")  # the default: exec's own
    launcher = VPNLauncher(reconnect_timeout=0)
    assert "--reconnect-timeout 0" in launcher.wrap("w")
    assert "reconnect_timeout=0" in repr(launcher)
    with pytest.raises(ValueError, match="reconnect_timeout"):
        VPNLauncher(reconnect_timeout=-1)


def test_three_argument_launchers_still_work():
    class OldLauncher(Launcher):
        def __call__(self, command, tasks_per_node, nodes_per_block):
            return f"OLD {command}"

    assert VPNLauncher(OldLauncher())("w", 1, 1, "/tmp").startswith("OLD vpn-provider exec")


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("inner", list(INNER))
def test_generated_script_is_valid_bash(inner, command, tmp_path):
    text = VPNLauncher(INNER[inner](), ticket="$HOME/.vpn/ticket.json")(COMMANDS[command][0], 2, 2, str(tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(text)
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# srun, mpiexec and friends as shell functions: run the given command once per task.
FAKE_SCHEDULER = r"""
_fanout() { local n=$1; shift; for i in $(seq 1 "$n"); do "$@" & done; wait; }
srun() { local n=1; while [ $# -gt 0 ]; do case $1 in --ntasks|-n|-N) n=$2; shift 2;; --ntasks=*) n=${1#*=}; shift;;
         -*) shift;; *) break;; esac; done; _fanout "$n" "$@"; }
mpiexec() { local n=1; while [ $# -gt 0 ]; do case $1 in -n) n=$2; shift 2;; --bind-to|--hostfile) shift 2;;
            -*) shift;; *) break;; esac; done; _fanout "$n" "$@"; }
export SLURM_JOB_NAME=job1 SLURM_CPUS_ON_NODE=2 SLURM_JOB_NUM_NODES=2 JOBNAME=job1
"""


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("inner", ["SingleNode", "Srun", "MpiExec"])
def test_generated_script_delivers_the_worker_command(inner, command, tmp_path):
    # `vpn-provider` on PATH inserts --dry-run: the real CLI then prints what it would run.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "vpn-provider"
    shim.write_text(f'#!/bin/sh\nsub=$1; shift\nexec {VP} "$sub" --dry-run "$@"\n')
    shim.chmod(0o755)
    worker_command, expected = COMMANDS[command]
    text = VPNLauncher(INNER[inner](), ticket="$HOME/.vpn/ticket.json")(worker_command, 2, 1, str(tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(FAKE_SCHEDULER + text)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", HOME="/home/u")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    # Workers print concurrently, so reports may share a line: decode each from its start.
    decoder = json.JSONDecoder()
    reports = [decoder.raw_decode(done.stdout, m.start())[0] for m in re.finditer(r'\{"ticket"', done.stdout)]
    assert len(reports) == 2, done.stdout  # one per task
    for report in reports:
        assert report["ticket"] in ("$HOME/.vpn/ticket.json", "/home/u/.vpn/ticket.json")
        if expected is None:
            assert report["env"] == {} and report["argv"] == worker_command.split()
        else:
            assert {k: report[k] for k in ("env", "argv")} == expected
