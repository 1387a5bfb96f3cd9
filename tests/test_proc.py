"""proc.py: the one way we start programs (pure tier: plain processes, no namespaces)."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time

from vpn_provider import proc

# Prints which of its first 64 descriptors are open, and writes its name on 3 and 4.
_REPORT = """
import json, os
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
for fd in (3, 4):
    os.write(fd, b"fd%d" % fd)
print(json.dumps([fd for fd in range(64) if is_open(fd)]))
"""


def _pipe_above_4() -> tuple[int, int]:
    """A pipe whose ends the test's own placements on 3 and 4 cannot overwrite."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 20))
        os.close(fd)
    return ends[0], ends[1]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_exec_placed_gives_exactly_the_descriptors_asked_for_even_when_they_cross():
    """Crossing sources, a gap (0), an inheritable stray: the program holds 1 to 4 alone."""
    out_r, out_w = _pipe_above_4()
    three_r, three_w = _pipe_above_4()
    four_r, four_w = _pipe_above_4()
    told_r, told_w = _pipe_above_4()  # open until the exec: its EOF says the exec happened
    devnull = os.open(os.devnull, os.O_RDONLY)
    stray = fcntl.fcntl(devnull, fcntl.F_DUPFD, 20)  # inheritable, as a wrapper could leave one to us
    os.close(devnull)
    pid = os.fork()
    if pid == 0:
        try:
            # Crossing: the source for 4 may already sit on 3 and the one for 3 on 4.
            os.dup2(four_w, 3)
            os.dup2(three_w, 4)
            proc.exec_placed([sys.executable, "-c", _REPORT], {1: out_w, 2: 2, 3: 4, 4: 3}, open_until_exec=(told_w,))
        finally:
            os._exit(127)
    for fd in (out_w, three_w, four_w, told_w, stray):
        os.close(fd)
    assert os.read(told_r, 1) == b""  # EOF: closed by the exec, not before and not never
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(os.read(out_r, 4096)) == [1, 2, 3, 4]
    assert os.read(three_r, 10) == b"fd3"
    assert os.read(four_r, 10) == b"fd4"
    for fd in (out_r, three_r, four_r, told_r):
        os.close(fd)


def test_exec_placed_raises_when_the_program_cannot_run(tmp_path):
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            proc.exec_placed([str(tmp_path / "missing")], {}, open_until_exec=(status_w,))
        except OSError as e:
            os.write(status_w, str(e.errno).encode())
        finally:
            os._exit(127)
    os.close(status_w)
    assert os.read(status_r, 16) == str(2).encode()  # ENOENT, told on the pipe that stayed open
    os.waitpid(pid, 0)
    os.close(status_r)


def test_a_spawned_child_ends_when_its_parent_is_killed():
    """Without a detached session the child gets SIGTERM as soon as the process that spawned
    it dies, even by SIGKILL: no gateway helper outlives its gateway."""
    report_r, report_w = os.pipe()
    parent = os.fork()
    if parent == 0:
        try:
            child = proc.spawn([sys.executable, "-c", "import time; time.sleep(60)"], output=2)
            os.write(report_w, str(child.pid).encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(report_w)
    child_pid = int(os.read(report_r, 32))
    os.close(report_r)
    assert proc.alive(child_pid)
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    assert _wait_gone(child_pid, 10), "the spawned child outlived its parent"


def test_a_detached_child_leads_its_own_session_in_the_root_directory():
    out_r, out_w = os.pipe()
    child = proc.spawn([sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid(), os.getcwd())"],
                       output=out_w, detached=True)
    os.close(out_w)
    assert child.wait(10) == 0
    assert os.read(out_r, 100).decode().split() == ["True", "/"]
    os.close(out_r)
