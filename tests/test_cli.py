"""Pure tests: the CLI's bad-input handling (one line, non-zero exit)."""
from __future__ import annotations

import os
import subprocess
import sys


def vp(*args):
    return subprocess.run([sys.executable, "-m", "vpn_provider", *args], capture_output=True, text=True, timeout=30)


def test_exec_without_command():
    done = vp("exec", "--ticket", "/nonexistent")
    assert done.returncode == 1 and "missing CMD" in done.stderr


def test_exec_missing_ticket_is_one_line_and_125():
    done = vp("exec", "--ticket", "/nonexistent/ticket.json", "--", "true")
    assert done.returncode == 125
    assert done.stderr.strip().splitlines() == [
        "vpn-provider: ticket /nonexistent/ticket.json: no such file; "
        "run 'vpn-provider gateway start' and copy its ticket.json"]


def test_bad_listen_address():
    done = vp("gateway", "start", "--state-dir", "/tmp/x", "--listen", "host:99999")
    assert done.returncode == 2 and "bad port" in done.stderr


def test_stop_when_nothing_runs(tmp_path):
    done = vp("gateway", "stop", "--state-dir", str(tmp_path))
    assert done.returncode == 1 and "no gateway runs" in done.stderr


def test_negative_timeout():
    done = vp("exec", "--ticket", "t", "--timeout", "-1", "--", "true")
    assert done.returncode == 2 and "must be > 0" in done.stderr


def test_bad_gateway_option_values_are_one_line(tmp_path):
    for args, needle in ((["--mtu", "10"], "--mtu 10: outside"),
                         (["--pool", "10.0.0.0/31"], "--pool 10.0.0.0/31: too small"),
                         (["--pool", "0.0.0.0/0"], "--pool 0.0.0.0/0: too large"),
                         (["--pool", "127.0.0.0/8"], "--pool 127.0.0.0/8: overlaps loopback"),
                         (["--pool", "10.0.2.0/24"], "overlaps slirp4netns' egress network"),
                         (["--dns", "0.0.0.0"], "--dns 0.0.0.0: not a resolver workers can reach (unspecified"),
                         (["--dns", "::1"], "only IPv4"),
                         (["--listen", "0.0.0.0:9000", "--relay-port", "9000"], "must differ from the listen port"),
                         (["--relay-port", "70000"], "--relay-port 70000: not a port number")):
        done = vp("gateway", "start", "--state-dir", str(tmp_path / "s"), *args)
        assert done.returncode == 1 and needle in done.stderr, done.stderr
        assert done.stderr.startswith("vpn-provider: gateway: ") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_ticket_that_is_a_directory(tmp_path):
    done = vp("exec", "--ticket", str(tmp_path), "--", "true")
    assert done.returncode == 125 and "not a regular file (a directory)" in done.stderr


def test_ticket_that_is_a_fifo_fails_at_once_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo", 0o600)
    done = vp("exec", "--ticket", str(tmp_path / "fifo"), "--", "true")  # a hang fails by vp's time-out
    assert done.returncode == 125
    assert done.stderr.strip().splitlines() == [
        f"vpn-provider: ticket {tmp_path / 'fifo'}: not a regular file (a FIFO); "
        "copy the ticket.json the gateway wrote"]


def test_loopback_listen_is_one_warning_line_not_an_error():
    # Stop short of starting a gateway: only the option handling runs.
    code = ("import sys; from vpn_provider import cli; cli._gateway = lambda args: cli._gateway_config(args) and 0; "
            "sys.exit(cli.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "gateway", "start", "--state-dir", "/nonexistent/s",
                           "--listen", "127.0.0.1:9000"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        "vpn-provider: warning: --listen 127.0.0.1:9000 is a loopback address, which compute nodes cannot "
        "reach; listen on an address they can (default 0.0.0.0:8443)"]


def test_verbose_shows_the_traceback_and_a_failed_command_s_whole_output(capsys, monkeypatch):
    """-v is for bug reports: the traceback, and all of what a failed command printed; without
    it, one line."""
    from vpn_provider import cli
    from vpn_provider.errors import CommandError

    def failing(args):
        raise CommandError(["ocserv", "--foo"], 1, "first line\nsecond line\nlast line")
    monkeypatch.setitem(cli.__dict__, "_check", failing)
    assert cli.main(["check", "--ticket", "t.json"]) == 1
    assert capsys.readouterr().err == "vpn-provider: ocserv exited with status 1: last line\n"
    assert cli.main(["-v", "check", "--ticket", "t.json"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "first line\nsecond line\nlast line" in err
    assert err.endswith("vpn-provider: ocserv exited with status 1: last line\n")
