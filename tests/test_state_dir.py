"""Pure tests: the gateway refuses state and credentials dirs, and files in them, that another
user could have planted or could change, before it writes anything (ssh's rule); it opens files
there without following symlinks; its processes dump no core; ocserv's log stays bounded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vpn_provider.errors import GatewayError
from vpn_provider.gateway import credentials
from vpn_provider.gateway.config import GatewayConfig
from vpn_provider.gateway.namespace import copy_log_capped
from vpn_provider.gateway.supervisor import prepare_dirs

pytestmark = pytest.mark.pure


def vp(*args):
    return subprocess.run([sys.executable, "-m", "vpn_provider", *args], capture_output=True, text=True, timeout=30)


def listing(*paths: Path) -> dict:
    """Every entry under ``paths`` (each a directory or a file): what it is, its owner, mode,
    size, mtime and content or target."""
    out = {}
    for root in paths:
        for p in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            st = p.lstat()
            what = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            out[str(p)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, what)
    return out


def planted(tmp_path: Path, mode: int) -> tuple[Path, Path]:
    """A state dir with ``mode``, holding another user's client secret, a matching ocpasswd, and an
    ocserv.conf that is a symlink to one of the victim's files."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the victim's own file\n")
    state = tmp_path / "gw"
    state.mkdir()
    (state / "client-secret").write_text("the attacker's secret")
    (state / "ocpasswd").write_text("worker:*:$6$planted\n")
    (state / "ocserv.conf").symlink_to(victim)
    os.chmod(state, mode)
    return state, victim


@pytest.mark.parametrize("action", ["start", "run"])
@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_state_dir_others_can_write_is_refused_in_one_line_and_nothing_is_written(tmp_path, action, mode):
    state, victim = planted(tmp_path, mode)
    before = listing(tmp_path)
    done = vp("gateway", action, "--state-dir", str(state))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"vpn-provider: gateway: state dir {state} is writable by group or others "
                                        f"(mode 0{mode:o}); chmod go-w {state}, and remove any file in it you did "
                                        "not make"]
    assert listing(tmp_path) == before


def test_a_credentials_dir_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    os.chmod(shared, 0o775)
    done = vp("gateway", "start", "--state-dir", str(tmp_path / "gw"), "--credentials", str(shared))
    assert done.returncode == 1 and f"credentials dir {shared} is writable by group or others" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "gw").exists() and list(shared.iterdir()) == []


def test_files_left_in_a_dir_made_private_again_are_refused_one_by_one(tmp_path):
    state, victim = planted(tmp_path, 0o700)
    cfg = GatewayConfig(state_dir=state)
    with pytest.raises(GatewayError, match=f"{state / 'ocserv.conf'} is a symlink; remove it"):
        prepare_dirs(cfg)
    (state / "ocserv.conf").unlink()
    os.chmod(state / "client-secret", 0o644)
    with pytest.raises(GatewayError, match=f"client-secret can be read or written by group or others .mode 0644.; "
                                           f"chmod 600 {state / 'client-secret'}"):
        prepare_dirs(cfg)
    os.chmod(state / "client-secret", 0o600)
    os.chmod(state / "ocpasswd", 0o660)
    with pytest.raises(GatewayError, match="ocpasswd can be read or written by group or others"):
        prepare_dirs(cfg)
    assert victim.read_text() == "the victim's own file\n"


def test_a_state_dir_below_a_directory_others_can_write_is_refused_unless_it_is_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(GatewayError, match=f"is inside {shared}, which group or others can write to .mode 0777.; "
                                           f"chmod go-w {shared}"):
        prepare_dirs(GatewayConfig(state_dir=shared / "me" / "gw"))
    assert list(shared.iterdir()) == []
    os.chmod(shared, 0o1777)  # like /tmp: nobody else can rename or remove what is ours
    prepare_dirs(GatewayConfig(state_dir=shared / "me" / "gw"))
    assert (shared / "me" / "gw" / "run").is_dir()


def test_new_dirs_are_private(tmp_path):
    old = os.umask(0)
    try:
        prepare_dirs(GatewayConfig(state_dir=tmp_path / "gw", credentials_dir=tmp_path / "shared"))
    finally:
        os.umask(old)
    for d in ("gw", "gw/run", "shared"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o700, d


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_state_dir_of_another_user_is_refused(tmp_path):
    state = tmp_path / "gw"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(GatewayError, match=f"state dir {state} belongs to (nobody|uid 65534), not you; "
                                           "use a state dir of your own"):
        prepare_dirs(GatewayConfig(state_dir=state))
    os.chown(state, 0, 0)
    (state / "ca-key.pem").write_bytes(b"")
    os.chown(state / "ca-key.pem", 65534, 65534)
    with pytest.raises(GatewayError, match="ca-key.pem belongs to (nobody|uid 65534), not you; remove it"):
        prepare_dirs(GatewayConfig(state_dir=state))


def test_open_file_never_follows_a_symlink_never_hangs_on_a_fifo_and_never_truncates_what_it_refuses(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(GatewayError, match="link is a symlink"):
        credentials.write_file(tmp_path / "link", b"overwritten")
    os.mkfifo(tmp_path / "fifo")
    for flags in (os.O_RDONLY, os.O_WRONLY):
        with pytest.raises(GatewayError, match="fifo is not a regular file"):
            credentials.open_file(tmp_path / "fifo", flags)
    os.chmod(target, 0o666)
    with pytest.raises(GatewayError, match="can be written by group or others"):
        credentials.write_file(target, b"overwritten")
    assert target.read_text() == "keep"
    credentials.write_file(tmp_path / "new", b"x")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_the_gateway_dumps_no_core():
    code = "import resource; from vpn_provider import linux; linux.no_core_dumps(); " \
           "print(*resource.getrlimit(resource.RLIMIT_CORE))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "0"]


def test_ocservs_log_keeps_at_most_two_capped_files(tmp_path):
    log = tmp_path / "ocserv.log"
    r, w = os.pipe()
    fd = credentials.open_file(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    lines = [f"line {i:04d}\n".encode() for i in range(300)]
    writer = os.fork()
    if writer == 0:
        os.close(r)
        for line in lines:
            os.write(w, line)
        os._exit(0)
    os.close(w)
    copy_log_capped(r, fd, log, cap=1000)
    os.waitpid(writer, 0)
    old, new = (tmp_path / "ocserv.log.1").read_bytes(), log.read_bytes()
    assert len(old) <= 1000 and len(new) <= 1000
    assert (old + new).endswith(b"".join(lines[-(len(new) // len(lines[0])):]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ocserv.log", "ocserv.log.1"]
