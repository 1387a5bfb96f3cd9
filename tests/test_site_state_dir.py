"""On the simulated site, as the site's unprivileged user: a state dir another user planted files
in is refused in one line and nothing is written; a busy relay port fails at once, in one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import comm, gateway_ports, wait_until
from test_state_dir import listing

pytestmark = pytest.mark.site


def start(site_env, state: Path, port: int | None = None) -> subprocess.CompletedProcess:
    """`gateway start` (which these tests expect to fail) on ``port``, by default one of its own."""
    port = port or gateway_ports()[0]
    return site_env.vp(site_env.site.login, "gateway", "start", "--state-dir", str(state),
                       "--listen", f"0.0.0.0:{port}")


def test_a_planted_state_dir_is_refused_and_nothing_is_written(site_env):
    site = site_env.site
    # The victim's own file, and a state dir the victim left writable by everyone.
    victim = site.home / "notes.txt"
    victim.write_text("the victim's notes\n")
    state = site.home / "gw-planted"
    state.mkdir()
    for path in (victim, state):
        shutil.chown(path, site.user, site.user)
    os.chmod(state, 0o777)
    # Another user (root, here) plants a secret of theirs, a matching password file, and a config
    # that is a symlink to the victim's file.
    secret = "the-attacker-knows-this-secret"
    hashed = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=secret + "\n", capture_output=True,
                            text=True, check=True).stdout.strip()
    (state / "client-secret").write_text(secret)
    (state / "ocpasswd").write_text(f"worker:*:{hashed}\n")
    for name in ("client-secret", "ocpasswd"):
        os.chmod(state / name, 0o644)
    (state / "ocserv.conf").symlink_to(victim)
    pids = set(site.user_pids())

    _refused_untouched(site_env, state, victim, f"state dir {state} is writable by group or others (mode 0777); "
                       f"chmod go-w {state}, and remove any file in it you did not make")
    assert wait_until(lambda: set(site.user_pids()) <= pids, 10)

    # The victim follows the advice but keeps the planted files: each is refused in turn.
    os.chmod(state, 0o700)
    _refused_untouched(site_env, state, victim, f"{state / 'ocserv.conf'} is a symlink; "
                       f"remove it (rm {state / 'ocserv.conf'})")
    (state / "ocserv.conf").unlink()
    _refused_untouched(site_env, state, victim, f"{state / 'client-secret'} belongs to root, not you; "
                       f"remove it (rm {state / 'client-secret'})")
    assert wait_until(lambda: set(site.user_pids()) <= pids, 10)


def _refused_untouched(site_env, state: Path, victim: Path, why: str) -> None:
    """`gateway start` fails with exactly one line, ``why``, and changes nothing in ``state`` or ``victim``."""
    before = listing(state, victim)
    done = start(site_env, state)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"vpn-provider: gateway: {why}"]
    assert listing(state, victim) == before


def test_a_state_dir_of_another_user_is_refused(site_env):
    site = site_env.site
    state = site.home / "gw-not-mine"
    state.mkdir(mode=0o755)  # root's, in the user's home
    done = start(site_env, state)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"vpn-provider: gateway: state dir {state} belongs to root, not you; "
                                        "use a state dir of your own"]
    assert list(state.iterdir()) == []


def test_a_busy_relay_port_fails_at_once_in_one_line(site_env):
    site = site_env.site
    state = site.home / "gw-busy-relay"
    port, relay_port = gateway_ports()
    holder = subprocess.Popen(site.as_root(site.login, [
        sys.executable, "-c", "import socket, time; s = socket.socket(); "
        f"s.bind(('0.0.0.0', {relay_port})); s.listen(); print('ready', flush=True); time.sleep(120)"]),
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        pids = set(site.user_pids())
        began = time.monotonic()
        done = start(site_env, state, port)
        took = time.monotonic() - began
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"vpn-provider: gateway: cannot listen on 0.0.0.0:{relay_port} "
                                        "(TCP relay): Address already in use; choose --relay-port PORT, or --no-relay"]
    assert took < 5, f"a busy relay port took {took:.1f} s to report"
    assert wait_until(lambda: set(site.user_pids()) <= pids, 10)
    assert not (state / "ocserv.conf").exists(), "ocserv was configured before the relay port was bound"


def test_gateway_processes_dump_no_core_use_every_descriptor_allowed_and_log(site_env):
    limits = {}
    for pid in site_env.baseline:  # the main gateway's processes: supervisor, ocserv, egress, relay
        lines = Path(f"/proc/{pid}/limits").read_text().splitlines()
        limits[comm(pid)] = {ln[:26].strip(): ln[26:].split()[:2] for ln in lines[1:]}
    assert any(name.startswith("ocserv") for name in limits), limits
    for name, limit in limits.items():
        assert limit["Max core file size"] == ["0", "0"], name
        assert limit["Max open files"][0] == limit["Max open files"][1], name
    ocserv = next(pid for pid in site_env.baseline if comm(pid).startswith("ocserv"))
    assert b"LC_ALL=C\0" in Path(f"/proc/{ocserv}/environ").read_bytes()
    assert (site_env.gateway_dir / "ocserv.log").stat().st_size > 0
