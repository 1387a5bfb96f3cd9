"""The gateway: stop leaves nothing behind, gateways coexist, secrets stay out of argv and logs,
`check` and the Python API work, all as an unprivileged user on the simulated site."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import VP, gateway_ports, wait_until

pytestmark = pytest.mark.site


def test_two_gateways_coexist_and_stop_cleanly(site_env, start_gateway):
    site = site_env.site
    before = set(site.user_pids())
    gw = start_gateway("gw-second")
    second = set(site.user_pids()) - before
    assert second, "the second gateway started no process"
    for ticket in (site_env.ticket, gw.ticket):
        assert site_env.exec_("true", ticket=ticket).returncode == 0
    assert json.loads(gw.ticket.read_text())["pin"] != json.loads(site_env.ticket.read_text())["pin"]
    stopped = gw.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: not (second & set(site.user_pids())), 10), "stop left processes behind"
    assert site_env.exec_("true").returncode == 0, "the first gateway stopped serving"
    again = site_env.vp(site.login, "gateway", "stop", "--state-dir", str(gw.state))
    assert again.returncode == 1 and "no gateway runs" in again.stderr


def test_port_in_use_is_a_one_line_error(site_env):
    site = site_env.site
    state = site.home / "gw-same-port"
    before = set(site.user_pids())
    done = site_env.vp(site.login, "gateway", "start", "--state-dir", str(state))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen on 0.0.0.0:8443" in lines[0], done.stderr
    assert wait_until(lambda: set(site.user_pids()) <= before, 10)


def test_secret_never_in_argv_environment_or_logs(site_env):
    site = site_env.site
    from vpn_provider.relay.protocol import relay_key
    secret = json.loads(site_env.ticket.read_text())["secret"]
    needles = (secret.encode(), relay_key(secret).hex().encode())  # the relay's key is as secret
    oc_log = site.home / "secret-run.log"
    proc = site.popen_user(site_env.node, [VP, "exec", "--ticket", str(site_env.ticket), "--log-file", str(oc_log),
                                           "--", "sleep", "30"])
    try:
        assert wait_until(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep", 20)
        exposed = []
        for pid in site.user_pids():
            for what in ("cmdline", "environ"):
                try:
                    if any(n in Path(f"/proc/{pid}/{what}").read_bytes() for n in needles):
                        exposed.append((pid, what))
                except OSError:
                    pass
        assert exposed == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    logs = [oc_log, *site_env.gateway_dir.glob("*.log"), *site_env.gateway_dir.glob("run/*.log"),
            site_env.gateway_dir / "ocserv.conf"]
    assert len(logs) >= 4
    assert [p for p in logs if any(n in p.read_bytes() for n in needles)] == []
    assert site_env.leftovers() == set()


def test_check_reports_a_healthy_node(site_env):
    done = site_env.vp(site_env.node, "check", "--ticket", str(site_env.ticket), "--dns-name", "www.sim.test",
                       timeout=90)
    assert done.returncode == 0, done.stdout
    for item in ("user namespaces", "/dev/net/tun", "binary openconnect", "pin of 198.19.20.1:8443",
                 "TCP relay 198.19.20.1:8444", "destination policy", "authentication + tunnel",
                 "UDP (DTLS data channel)", "DNS through tunnel"):
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith(item))
        assert " ok " in line, line
    assert site_env.leftovers() == set()


def test_check_names_a_wrong_pin(site_env):
    data = json.loads(site_env.ticket.read_text())
    data["pin"] = "pin-sha256:" + "B" * 43 + "="
    path = site_env.write_ticket("check-pin.json", json.dumps(data))
    done = site_env.vp(site_env.node, "check", "--ticket", str(path), timeout=90)
    assert done.returncode == 1
    assert any(ln.startswith("pin of 198.19.20.1:8443") and "FAIL" in ln for ln in done.stdout.splitlines())


def _commands(pids: list[int]) -> list[str]:
    """What each process runs, for a failure message."""
    found = []
    for pid in pids:
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            pass
    return found


def test_python_api_gateway_context_manager_and_run(site_env):
    """The API as a user would call it: Gateway in a with-block on the login host, run() on a node."""
    site = site_env.site
    state = site.home / "gw-api"
    up = textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        from vpn_provider import Gateway, GatewayConfig, Endpoint
        cfg = GatewayConfig(state_dir=Path({str(state)!r}), listen=Endpoint.parse("0.0.0.0:9445"))
        with Gateway(cfg) as gw:
            print("ticket", gw.ticket_path, flush=True)
            sys.stdin.readline()   # hold the gateway until the test says so
            # ocserv drops a session a moment after its openconnect goes: wait, but not forever
            for _ in range(150):
                if not gw.workers():
                    break
                time.sleep(0.2)
            left = gw.workers()
            if left:  # the relay's view of the connections it still holds, for the failure message
                ss = subprocess.run(["ss", "-tnoeiap"], capture_output=True, text=True).stdout
                Path({str(state / 'ss-login.txt')!r}).write_text(ss)
            print("workers", len(left), *(f"{{w.transport}}:{{w.worker}}:{{w.flows}}" for w in left), flush=True)
    """)
    holder = site.popen_user(site.login, [str(Path(VP).parent / "python"), "-c", up],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().startswith("ticket")
        use = textwrap.dedent(f"""
            import vpn_provider
            done = vpn_provider.run({str(state / 'ticket.json')!r}, ["curl", "-sSf", "-o", "/dev/null",
                                    "-w", "%{{http_code}}", {site_env.http_url + '/big.bin'!r}],
                                    capture_output=True, text=True)
            print(done.returncode, done.stdout)
        """)
        done = site.run_user(site_env.node, [str(Path(VP).parent / "python"), "-c", use])
        assert done.stdout.split() == ["0", "200"], done.stderr
        holder.stdin.write("\n")
        holder.stdin.flush()
        left = holder.stdout.readline().strip()
        if left != "workers 0":  # which worker stayed, and why: shown with the failure
            node_ss = site.run_user(site_env.node, ["ss", "-tnoeia"]).stdout
            print(*_commands(site.user_pids()), (state / "ss-login.txt").read_text(), node_ss,
                  (state / "relay.log").read_text()[-1500:],
                  (state / "ocserv.log").read_text()[-3000:], sep="\n")
        assert left == "workers 0"
        assert holder.wait(timeout=20) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert site_env.leftovers() == set()


def test_gateway_run_in_foreground_cleans_up_on_ctrl_c(site_env):
    site = site_env.site
    state = site.home / "gw-foreground"
    before = set(site.user_pids())
    port, _ = gateway_ports()
    run = site.popen_user(site.login, [VP, "gateway", "run", "--state-dir", str(state), "--listen", f"0.0.0.0:{port}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (state / "gateway.pid").exists() or run.poll() is not None, 30)
        assert run.poll() is None, run.stderr.read()
        assert site_env.exec_("true", ticket=state / "ticket.json").returncode == 0
        run.send_signal(2)  # what Ctrl-C sends
        assert run.wait(timeout=15) == 0
    finally:
        if run.poll() is None:
            run.kill()
    assert wait_until(lambda: set(site.user_pids()) <= before, 10), "Ctrl-C left processes behind"
    assert not (state / "gateway.pid").exists()
