"""Bad input to `vpn-provider exec`: one line naming the problem, non-zero exit within the
time-out, and no process left behind."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import gateway_ports

pytestmark = pytest.mark.site

DEFAULT_TIMEOUT = 15


def _ticket_text(site_env, **changes) -> str:
    data = json.loads(site_env.ticket.read_text())
    data.update(changes)
    return json.dumps(data)


def _user_file(env, name: str, create) -> Path:
    """A file of the site's user that ``create(path)`` makes (a FIFO, a sparse file), mode 0600."""
    path = env.site.home / name
    path.unlink(missing_ok=True)
    create(path)
    os.chmod(path, 0o600)
    shutil.chown(path, env.site.user, env.site.user)
    return path


def _sparse_100_mb(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(100 << 20)


CASES = {
    "missing file": (lambda env: env.site.home / "no-such-ticket.json", "no such file"),
    "malformed json": (lambda env: env.write_ticket("bad.json", "{not json"), "not valid JSON"),
    "wrong pin": (lambda env: env.write_ticket("pin.json", _ticket_text(
        env, pin="pin-sha256:" + "A" * 43 + "=")), "does not match the ticket's pin"),
    "wrong secret": (lambda env: env.write_ticket("secret.json", _ticket_text(
        env, secret="not-the-secret-0123456789")), "rejected the ticket's user or secret"),
    "gateway refuses": (lambda env: env.write_ticket("refused.json", _ticket_text(
        env, gateways=["198.19.20.1:9"])), "connection refused"),
    "readable by others": (lambda env: env.write_ticket("open.json", env.ticket.read_text(), mode=0o644),
                           "readable by other users"),
    "a FIFO": (lambda env: _user_file(env, "fifo.json", os.mkfifo), "not a regular file (a FIFO)"),
    "/dev/zero": (lambda env: Path("/dev/zero"), "not a regular file (a character device)"),
    "deep JSON": (lambda env: env.write_ticket("deep.json", "[" * 30000 + "]" * 30000), "nested too deeply"),
    "huge numbers": (lambda env: env.write_ticket("huge-number.json", _ticket_text(env).replace(
        '"version": 1', '"version": 1e400')), "'version' must be an integer"),
    "huge file": (lambda env: _user_file(env, "huge.json", _sparse_100_mb), "larger than 64 KiB"),
    "3000 gateways": (lambda env: env.write_ticket("many.json", _ticket_text(
        env, gateways=[f"198.19.{i // 250}.{i % 250 + 1}:9" for i in range(3000)])),
        "3000 entries, a worker takes at most 64"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_ticket_fails_fast_with_one_line(site_env, case):
    make, expected = CASES[case]
    path = make(site_env)
    t0 = time.monotonic()
    done = site_env.exec_("true", ticket=path, timeout=60)
    elapsed = time.monotonic() - t0
    assert done.returncode == 125
    assert elapsed < DEFAULT_TIMEOUT, f"took {elapsed:.1f} s"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert site_env.leftovers() == set()


@pytest.mark.parametrize("timeout", [DEFAULT_TIMEOUT, 4])
def test_silent_gateway_times_out_as_configured(site_env, timeout):
    """A firewall that drops packets gives no error at all: only the time-out ends the wait."""
    silent, _ = gateway_ports()
    site_env.site.drop(silent, "tcp")
    path = site_env.write_ticket("blackhole.json", _ticket_text(site_env, gateways=[f"198.19.20.1:{silent}"]))
    extra = () if timeout == DEFAULT_TIMEOUT else ("--timeout", str(timeout))
    t0 = time.monotonic()
    done = site_env.exec_("true", ticket=path, extra=extra, timeout=60)
    elapsed = time.monotonic() - t0
    assert done.returncode == 125
    assert timeout - 1 < elapsed < timeout + 0.9, f"took {elapsed:.1f} s for --timeout {timeout}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"within {timeout} s" in lines[0], done.stderr
    assert site_env.leftovers() == set()


def test_missing_command(site_env):
    done = site_env.exec_("no-such-command-xyz")
    assert done.returncode == 125 and "command not found" in done.stderr
    assert site_env.leftovers() == set()
