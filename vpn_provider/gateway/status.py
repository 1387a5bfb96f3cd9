"""What an operator sees: every worker of a running gateway, from its two ends.

- The tunnel: ocserv's sessions (``occtl show users``). openconnect tells ocserv a host name
  (``--local-hostname``), and the node's keeper sets it to ``<worker>-<reconnections>``, so a
  session names its worker and how often that worker has come back. The session's bytes are
  its tun device's counters, read in ocserv's network namespace (``/proc/PID/net/dev``).
- The relay: its live flows and bytes per worker, from the relay's status socket. Each relay
  handshake names the worker (``relay/protocol.py``).

A worker seen at both ends uses the default transport ("relay"), one seen only in ocserv "tunnel",
one seen only at the relay "relay-only".
"""
from __future__ import annotations

import dataclasses
import json
import re
import socket
from pathlib import Path

from .. import proc
from .config import GatewayConfig

RELAY_STATUS_SOCKET = "relay-status.sock"
TUNNEL_REFUSALS = "tunnel-refusals.json"  # in the run dir, written by forward_policy.DenialLog
_SESSION_NAME = re.compile(r"^(?P<worker>vpnp-\d+)-(?P<reconnections>\d+)$")


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    node: str  # the node's address, as the gateway sees it
    worker: str  # "vpnp-<pid of exec, which CMD keeps>", unique on its node
    transport: str  # "relay" (tunnel + relay), "tunnel" or "relay-only"
    vpn_ip: str  # "" without a tunnel
    bytes_in: int  # from the worker, through the gateway
    bytes_out: int  # to the worker
    flows: int  # relayed TCP flows open now
    reconnections: int  # times the worker's tunnel came back (after the gateway restarted, say)
    connected: str  # how long its tunnel session has been up ("" without one)


def _tunnel_sessions(cfg: GatewayConfig) -> list[dict]:
    if not (cfg.run_dir / "occtl.sock").exists():  # the relay alone: no ocserv, no sessions
        return []
    # LC_ALL=C: we parse what occtl says, whatever the operator's locale.
    out = proc.run(["env", "LC_ALL=C", proc.find_tool("occtl"), "--socket-file", str(cfg.run_dir / "occtl.sock"),
                    "--json", "show", "users"], timeout=10).stdout
    return json.loads(out or "[]")


def _device_bytes(cfg: GatewayConfig) -> dict[str, tuple[int, int]]:
    """ocserv's tun devices: name -> (received from the worker, sent to the worker)."""
    try:
        # Not read_file: ocserv writes its pid file group-writable (0660), which read_file
        # refuses, and all it decides here is which counters are shown.
        pid = int((cfg.run_dir / "ocserv.pid").read_text().split()[0])
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except (OSError, ValueError, IndexError):
        return {}
    counters = {}
    for line in lines:
        name, _, numbers = line.partition(":")
        fields = numbers.split()
        if len(fields) >= 9:
            counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


def _relay_report(cfg: GatewayConfig) -> dict:
    """The relay's view ({"workers": [...], "encryption": ..., "policy": ..., "pump": ...}), {} if it runs
    none or does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(cfg.run_dir / RELAY_STATUS_SOCKET))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        report = json.loads(data or b"{}")
        return report if isinstance(report, dict) else {}
    except (OSError, ValueError):
        return {}


def snapshot(cfg: GatewayConfig) -> tuple[list[WorkerStatus], dict]:
    """Every worker, and how the relay carries flows and where it lets workers go (as it
    reports them), from one reading of the relay's status socket; and under "refused", how
    many requests the destination policy refused per reason, at the relay and in the tunnel."""
    report = _relay_report(cfg)
    settings: dict = {k: str(report[k]) for k in ("encryption", "policy", "pump") if k in report}
    settings["refused"] = {"relay": _counts(report.get("refused")), "tunnel": _tunnel_refusals(cfg)}
    return _workers(cfg, report.get("workers", [])), settings


def _counts(value) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(reason): n for reason, n in value.items() if isinstance(n, int)}


def _tunnel_refusals(cfg: GatewayConfig) -> dict[str, int]:
    try:
        return _counts(json.loads((cfg.run_dir / TUNNEL_REFUSALS).read_bytes()))
    except (OSError, ValueError):
        return {}


def describe_refusals(refused: dict[str, dict[str, int]]) -> list[str]:
    """``gateway status``'s lines for snapshot's "refused"."""
    lines = []
    for where in ("relay", "tunnel"):
        counts = refused.get(where, {})
        total = sum(counts.values())
        detail = "; ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda c: -c[1]))
        lines.append(f"refused by the policy ({where}): {total}" + (f" ({detail})" if detail else ""))
    return lines


def workers(cfg: GatewayConfig) -> list[WorkerStatus]:
    return snapshot(cfg)[0]


def _workers(cfg: GatewayConfig, relay_workers: list[dict]) -> list[WorkerStatus]:
    devices = _device_bytes(cfg)
    relayed = {(w["node"], w["worker"]): w for w in relay_workers}
    out = []
    for session in _tunnel_sessions(cfg):
        m = _SESSION_NAME.match(session.get("Hostname", ""))
        node = session.get("Remote IP", "")
        worker, reconnections = (m["worker"], int(m["reconnections"])) if m else (session.get("Hostname", "?"), 0)
        received, sent = devices.get(session.get("Device", ""), (0, 0))
        relay = relayed.pop((node, worker), None)
        out.append(WorkerStatus(
            node=node, worker=worker, transport="relay" if relay else "tunnel", vpn_ip=session.get("IPv4", ""),
            bytes_in=received + (relay["bytes_up"] if relay else 0),
            bytes_out=sent + (relay["bytes_down"] if relay else 0),
            flows=relay["flows"] if relay else 0, reconnections=reconnections,
            connected=session.get("_Connected at", session.get("Connected at", "")).strip()))
    for (node, worker), relay in relayed.items():
        out.append(WorkerStatus(node=node, worker=worker, transport="relay-only", vpn_ip="",
                                bytes_in=relay["bytes_up"], bytes_out=relay["bytes_down"], flows=relay["flows"],
                                reconnections=0, connected=""))
    return sorted(out, key=lambda w: (w.node, w.worker))


def table(rows: list[WorkerStatus]) -> list[str]:
    lines = [f"{'NODE':<16} {'WORKER':<14} {'TRANSPORT':<10} {'VPN IP':<16} {'BYTES IN':>12} {'BYTES OUT':>12} "
             f"{'FLOWS':>5} {'RECONN':>6}  CONNECTED"]
    for w in rows:
        lines.append(f"{w.node:<16} {w.worker:<14} {w.transport:<10} {w.vpn_ip or '-':<16} {w.bytes_in:>12,} "
                     f"{w.bytes_out:>12,} {w.flows:>5} {w.reconnections:>6}  {w.connected or '-'}")
    return lines
