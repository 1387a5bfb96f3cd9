"""``vpn-provider check``: a verdict and a remedy for each thing a new site needs."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
from pathlib import Path

from . import linux, proc
from .errors import CommandError, MissingTool, TicketError, TunnelError
from .gateway.supervisor import probe_pin
from .relay.client import probe
from .relay.protocol import Mode, relay_key
from .ticket import Endpoint, Ticket
from .transport import Transport
from .worker.choice import decide
from .worker.node_helper import helper_binary
from .worker.programs import USUAL_PROGRAMS, why_not_preloaded
from .worker.tunnel import preload_library, relay_preload_library

OK, FAIL, WARN = "ok", "FAIL", "warn"


@dataclasses.dataclass
class Finding:
    item: str
    verdict: str
    detail: str
    remedy: str = ""


_ALLOW_NAMESPACES = ("ask the site to allow unprivileged user namespaces "
                     "(user.max_user_namespaces > 0; kernel.apparmor_restrict_unprivileged_userns=0)")


def _namespaces(programs: tuple[str, ...]) -> list[Finding]:
    allowed, why = linux.user_namespaces_allowed()
    if not allowed:
        return [Finding("user namespaces", WARN, f"off ({why}): workers take the preload transport, TCP and DNS "
                        "for dynamically linked programs only", _ALLOW_NAMESPACES + " for everything"),
                _programs(programs)]
    out = [Finding("user namespaces", OK, "allowed")]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            linux.enter_user_namespace(inner_uid=0, inner_gid=0, flags=linux.CLONE_NEWNET)
            os.close(linux.create_tun("vpncheck0"))
            code = 0
        except OSError as e:
            code = 100 + (e.errno or 0) % 100
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 0:
        out.append(Finding("/dev/net/tun", OK, "a tun device can be created in a user namespace"))
    else:
        err = os.strerror(code - 100) if code >= 100 else f"exit {code}"
        out.append(Finding("/dev/net/tun", FAIL, err,
                           "ask the site to make /dev/net/tun mode 0666 (the default on most distributions); "
                           "until then workers run relay-only (TCP and DNS only), which needs no tun device"))
    return out


def _programs(programs: tuple[str, ...]) -> Finding:
    """Which of the job's programs (found on PATH) the preload transport reaches."""
    found = [p for p in dict.fromkeys((*programs, *USUAL_PROGRAMS)) if p in programs or shutil.which(p)]
    verdicts = {p: why_not_preloaded(p) for p in found}
    works = [p for p, why in verdicts.items() if not why]
    fails = [f"{p} ({why})" for p, why in verdicts.items() if why]
    detail = f"reached: {', '.join(works) or 'none'}" + (f"; NOT reached: {'; '.join(fails)}" if fails else "")
    return Finding("programs (preload)", WARN if fails else OK, detail,
                   "run those on a node with user namespaces, or use dynamically linked builds" if fails else "")


def _binaries() -> list[Finding]:
    out = []
    for tool, needed_on in (("openconnect", "compute nodes"), ("ocserv", "the gateway host"),
                            ("occtl", "the gateway host"), ("slirp4netns", "the gateway host"),
                            ("pasta", "the gateway host (optional)")):
        try:
            path = proc.find_tool(tool)
            out.append(Finding(f"binary {tool}", OK, f"{path} {proc.tool_version(tool)}".strip()))
        except MissingTool as e:
            out.append(Finding(f"binary {tool}", WARN, "not found", f"{e} (needed on {needed_on}; without it "
                               + ("workers run relay-only: TCP and DNS)" if tool == "openconnect"
                                  else "a gateway there offers the relay alone)")))
    for item, find in (("tun preload library", preload_library), ("relay preload library", relay_preload_library)):
        try:
            out.append(Finding(item, OK, find()))
        except TunnelError as e:
            out.append(Finding(item, FAIL, "missing" if "missing" in e.reason else e.reason, e.remedy))
    try:  # every mode needs it: it keeps the tunnel, and serves the relay
        out.append(Finding("node helper", OK, helper_binary()))
    except TunnelError as e:
        out.append(Finding("node helper", FAIL, "missing", e.remedy))
    return out


def _transports(ticket: Ticket) -> tuple[Finding, Transport]:
    """What the gateway offers, and what a plain `exec` takes on this node (worker/choice.py)."""
    offered = "the full-IP tunnel" + (" and the relay" if ticket.relay_port else "") if ticket.tunnel \
        else "the relay alone (TCP and DNS)"
    chosen, why = decide(ticket)
    detail = f"the gateway offers {offered}; exec takes {chosen.value}" + (f" ({why})" if why else "")
    if chosen is Transport.PRELOAD:
        return Finding("transports", WARN, detail, _ALLOW_NAMESPACES), chosen
    verdict = WARN if chosen is Transport.RELAY_ONLY and ticket.tunnel else OK
    remedy = "install openconnect and allow /dev/net/tun for the full-IP tunnel" if verdict == WARN else ""
    return Finding("transports", verdict, detail, remedy), chosen


def _reachability(ticket: Ticket, timeout: float) -> list[Finding]:
    if not ticket.tunnel:  # nothing listens on the VPN port: the relay is all there is
        return [f for ep in ticket.gateways for f in _relay(ticket, ep, timeout)]
    out, unreachable = [], []
    for ep in ticket.gateways:
        try:
            with socket.create_connection((ep.host, ep.port), timeout=min(timeout, 5)):
                pass
            out.append(Finding(f"TCP to {ep}", OK, "connected"))
        except OSError as e:
            unreachable.append(Finding(f"TCP to {ep}", FAIL, e.strerror or str(e),
                                       "is the gateway running? can this node reach that address?"))
            continue
        try:
            pin = probe_pin(ep, timeout=min(timeout, 5))
            if pin == ticket.pin:
                out.append(Finding(f"pin of {ep}", OK, "matches the ticket"))
            else:
                out.append(Finding(f"pin of {ep}", FAIL, f"server presents {pin}",
                                   "the ticket is from another gateway; copy the current ticket.json"))
        except (OSError, ssl.SSLError) as e:
            out.append(Finding(f"pin of {ep}", FAIL, f"TLS handshake failed: {e}",
                               "is something other than the gateway listening there?"))
        if ticket.relay_port:
            out += _relay(ticket, ep, timeout)
    if out:  # another address of the ticket works: workers will use that one
        for f in unreachable:
            f.verdict, f.remedy = WARN, "workers use another address of the ticket"
    if not ticket.relay_port:
        out.append(Finding("TCP relay", WARN, "the gateway runs none; TCP goes through the tunnel",
                           "start the gateway without --no-relay for near-native TCP throughput"))
    return out + unreachable


def _relay(ticket: Ticket, gateway: Endpoint, timeout: float) -> list[Finding]:
    relay = ticket.relay(gateway)
    answer = probe((relay.host, relay.port), relay_key(ticket.secret), timeout=min(timeout, 5))
    if answer.problem:
        return [Finding(f"TCP relay {relay}", WARN, answer.problem,
                        f"allow TCP to port {relay.port} of the login node; until then TCP uses the slower tunnel")]
    policy = [Finding("destination policy", OK, answer.policy)] if answer.policy else []
    if answer.mode is Mode.PLAIN:
        return [Finding(f"TCP relay {relay}", WARN,
                        "answers, but carries flows UNENCRYPTED (the gateway's --plain-relay)",
                        "start the gateway without --plain-relay unless the site network is trusted")] + policy
    return [Finding(f"TCP relay {relay}", OK, "answers, knows the ticket's secret, encrypts (AES-128-GCM)")] + policy


_DNS_PROBE = """
import socket, sys
try:
    print(socket.gethostbyname(sys.argv[1])); sys.exit(0)
except socket.gaierror as e:
    print(e); sys.exit(3 if e.errno == socket.EAI_NONAME else 4)
"""


def _tunnel(ticket_path: Path, timeout: float, dns_name: str, chosen: Transport) -> list[Finding]:
    """A plain `exec` on this node, as a job would run it: does it come up, and resolve a name?"""
    with tempfile.NamedTemporaryFile(prefix="vpn-check-", suffix=".log") as log:
        argv = [sys.executable, "-m", "vpn_provider", "exec", "--ticket", str(ticket_path),
                "--timeout", str(timeout), "--log-file", log.name, "--",
                sys.executable, "-c", _DNS_PROBE, dns_name]
        try:
            done = proc.run(argv, timeout=timeout + 30, check=False)
        except CommandError:  # only its time-out: check=False
            return [Finding("tunnel", FAIL, f"no result within {timeout + 30:g} s")]
        oc_log = Path(log.name).read_text(errors="replace")
    relay_only = not chosen.needs_tunnel
    row, via = (f"{chosen.value} worker", "the relay") if relay_only else ("authentication + tunnel", "tunnel")
    if done.returncode == 125:
        return [Finding(row, FAIL, done.stderr.strip().splitlines()[-1].removeprefix("vpn-provider: "))]
    out = [Finding(row, OK, "the relay answered" if relay_only else "tunnel came up")]
    if relay_only:
        pass  # no tunnel: no data channel to look at
    elif re.search(r"Established DTLS connection", oc_log):
        out.append(Finding("UDP (DTLS data channel)", OK, "DTLS established"))
    else:
        out.append(Finding("UDP (DTLS data channel)", WARN, "DTLS did not come up; traffic uses TLS over TCP",
                           "allow UDP to the gateway's port for better throughput"))
    answer = done.stdout.strip()
    if done.returncode == 0:
        out.append(Finding(f"DNS through {via} ({dns_name})", OK, f"resolves to {answer}"))
    elif done.returncode == 3:
        out.append(Finding(f"DNS through {via} ({dns_name})", OK, "resolver answered: no such name"))
    else:
        out.append(Finding(f"DNS through {via} ({dns_name})", FAIL, answer or done.stderr.strip(),
                           "check the gateway's --dns resolvers; on a site without Internet name a "
                           "local host with --dns-name"))
    return out


def run_checks(ticket_path: Path, *, timeout: float = 15.0, dns_name: str = "cern.ch",
               programs: tuple[str, ...] = ()) -> int:
    """``programs``: the job's own, besides the usual ones, for the preload transport's verdict."""
    findings = _namespaces(programs) + _binaries()
    try:
        ticket = Ticket.load(ticket_path)
        findings.append(Finding("ticket", OK, f"{len(ticket.gateways)} gateway address(es), user {ticket.user}"))
    except TicketError as e:
        findings.append(Finding("ticket", FAIL, e.problem, e.remedy))
        ticket = None
    if ticket:
        transports, chosen = _transports(ticket)
        reach = _reachability(ticket, timeout)
        findings += [transports, *reach]
        if any(f.verdict == OK and f.item.startswith("TCP relay" if not chosen.needs_tunnel else "pin") for f in reach):
            findings += _tunnel(ticket_path, timeout, dns_name, chosen)
    width = max(len(f.item) for f in findings)
    for f in findings:
        line = f"{f.item:<{width}}  {f.verdict:<4}  {f.detail}"
        print(line + (f"\n{'':<{width}}        -> {f.remedy}" if f.remedy and f.verdict != OK else ""))
    failed = [f for f in findings if f.verdict == FAIL]
    print(f"\nsummary: {len(findings) - len(failed)} of {len(findings)} checks without failure")
    return 1 if failed else 0
