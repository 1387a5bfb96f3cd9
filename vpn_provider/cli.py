"""``vpn-provider``: gateway start|stop|status|run, exec, check. Errors print one line, exit 1."""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import CommandError, GatewayError, VPNError
from .gateway.config import DEFAULT_LISTEN, DEFAULT_POOL, GatewayConfig
from .transport import AUTO, CHOICES as TRANSPORTS, Transport
from .ticket import Endpoint

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
# Like env(1) and timeout(1): 125 means we failed before CMD could run, so callers can tell
# our failure from CMD's own exit status.
EXIT_EXEC_FAILED = 125


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ip_list(text: str) -> tuple[str, ...]:
    try:
        return tuple(str(ipaddress.ip_address(x.strip())) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _network(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .egress import CHOICES
    from .worker import DEFAULT_RECONNECT_TIMEOUT
    p = argparse.ArgumentParser(prog="vpn-provider", description=__doc__)
    p.add_argument("--version", action="version", version=f"vpn-provider {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    gw = sub.add_parser("gateway", help="run the gateway on a host with Internet access")
    gw_sub = gw.add_subparsers(dest="action", required=True)
    for action in ("start", "stop", "status", "run"):
        a = gw_sub.add_parser(action)
        a.add_argument("--state-dir", type=Path, required=True,
                       help="credentials, ticket.json, logs and sockets of this gateway")
        if action == "status":
            a.add_argument("--json", action="store_true", help="the same, as JSON for scripts")
        if action in ("start", "run"):
            a.add_argument("--listen", type=_endpoint, default=Endpoint.parse(DEFAULT_LISTEN),
                           help=f"HOST:PORT for TCP and UDP (default {DEFAULT_LISTEN})")
            a.add_argument("--dns", type=_ip_list, default=(),
                           help="resolvers pushed to clients (default: this host's resolv.conf)")
            a.add_argument("--pool", type=_network, default=ipaddress.IPv4Network(DEFAULT_POOL),
                           help=f"client address pool (default {DEFAULT_POOL})")
            a.add_argument("--egress", choices=CHOICES, default="auto")
            a.add_argument("--advertise", type=_endpoint, action="append", default=[],
                           help="address workers dial, repeatable (default: this host's addresses)")
            a.add_argument("--mtu", type=int, default=1400)
            a.add_argument("--relay-port", type=int, default=0,
                           help="TCP port of the relay for workers' TCP flows (default: listen port + 1, "
                                "so space two gateways' ports by two)")
            a.add_argument("--no-relay", dest="relay", action="store_false",
                           help="no relay: workers' TCP goes through the encrypted tunnel too")
            a.add_argument("--no-tunnel", dest="tunnel", action="store_const", const=False, default=None,
                           help="the relay alone (TCP and DNS; no ocserv, no egress needed). Default: the "
                                "tunnel too where ocserv and slirp4netns or pasta are installed, else the "
                                "relay alone (said in one line)")
            a.add_argument("--plain-relay", action="store_true",
                           help="the relay carries flows UNENCRYPTED (faster on a trusted site network; "
                                "default: AES-128-GCM)")
            a.add_argument("--allow", action="append", default=[], metavar="CIDR[:PORTS]",
                           help="workers may reach only these (repeatable; PORTS: 1094, 1094-1099 or 80,443; "
                                "IPv6 as [2001:db8::/32]:443)")
            a.add_argument("--deny", action="append", default=[], metavar="CIDR[:PORTS]",
                           help="workers may not reach these (repeatable); loopback, link-local, multicast "
                                "and the gateway's own ports are always denied")
            a.add_argument("--credentials", type=Path, default=None,
                           help="directory of credentials shared by several gateways, whose ticket.json "
                                "names them all (default: the state dir)")
            a.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    ex = sub.add_parser("exec", help="run CMD inside the VPN (on a compute node)")
    ex.add_argument("--ticket", type=Path, required=True)
    ex.add_argument("--timeout", type=_positive, default=15.0,
                    help="seconds to wait for the tunnel (default 15)")
    ex.add_argument("--tcp", choices=TRANSPORTS, default=AUTO,
                    help="auto (default): the best this node and the gateway allow, in this order: relay, "
                         "then relay-only, then preload (said in one line); relay: the full-IP tunnel, with TCP "
                         "through the gateway's encrypted relay; tunnel: all traffic in the encrypted tunnel; "
                         "relay-only: no tunnel, only TCP and DNS, through the relay (a fraction of the default's "
                         "memory per worker); "
                         "preload: where user namespaces are off, TCP and DNS through the relay for dynamically "
                         "linked programs, by a preloaded library")
    ex.add_argument("--reconnect-timeout", type=_non_negative, default=DEFAULT_RECONNECT_TIMEOUT,
                    help="when the gateway goes away, keep trying to get the tunnel back for this many "
                         f"seconds, then send CMD SIGTERM (default {DEFAULT_RECONNECT_TIMEOUT:g}; 0: forever)")
    ex.add_argument("--log-file", type=Path, default=None,
                    help="keep openconnect's log here (default: discarded on success)")
    ex.add_argument("--argv-b64", default=None,
                    help="CMD as base64 of a JSON list, instead of -- CMD (what launchers emit)")
    ex.add_argument("--dry-run", action="store_true",
                    help="print the environment assignments and argv that would run, as JSON; no tunnel")
    ex.add_argument("cmd", nargs=argparse.REMAINDER,
                    help="-- [NAME=VALUE...] CMD [ARGS...] (leading assignments set CMD's environment, as with env)")

    ck = sub.add_parser("check", help="diagnose whether this node can use the VPN")
    ck.add_argument("--ticket", type=Path, required=True)
    ck.add_argument("--timeout", type=_positive, default=15.0)
    ck.add_argument("--dns-name", default="cern.ch",
                    help="name to look up through the tunnel (default cern.ch)")
    ck.add_argument("--program", action="append", default=[], metavar="NAME",
                    help="a program of the job's: where user namespaces are off, say whether the preload "
                         "transport reaches it (repeatable; curl, python3, xrdcp and the like are always looked at)")
    return p


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    try:
        cfg = GatewayConfig(state_dir=args.state_dir.expanduser().resolve(), listen=args.listen,
                            dns=args.dns, pool=args.pool, egress=args.egress,
                            advertise=tuple(args.advertise), mtu=args.mtu, relay=args.relay,
                            relay_port=args.relay_port, plain_relay=args.plain_relay, tunnel=args.tunnel,
                            allow=tuple(args.allow), deny=tuple(args.deny),
                            credentials_dir=args.credentials.expanduser().resolve() if args.credentials else None)
    except ValueError as e:  # the reason names the option and its value; main prints it in one line
        raise GatewayError(str(e)) from None
    for warning in cfg.warnings():
        log.warning("warning: %s", warning)
    return cfg


def _gateway(args: argparse.Namespace) -> int:
    from .gateway.control import Gateway
    from .gateway.supervisor import run
    if args.action == "run":
        return run(_gateway_config(args), ready_fd=args.ready_fd)
    if args.action == "start":
        gw = Gateway(_gateway_config(args))
        info = gw.start()
        alone = f" (the relay alone, TCP and DNS: {info['relay_alone']})" if info.get("relay_alone") else ""
        print(f"gateway up{alone}: {', '.join(info['gateways'])}; ticket: {info['ticket']}")
        return 0
    gw = Gateway(GatewayConfig(state_dir=args.state_dir))
    if args.action == "stop":
        if not gw.stop():
            print(f"no gateway runs with state dir {gw.state_dir}", file=sys.stderr)
            return EXIT_FAILURE
        print("gateway stopped")
        return 0
    workers, relay = gw.status()
    refused = relay.pop("refused")
    if args.json:
        print(json.dumps({"pid": gw.pid, "relay": relay, "refused": refused,
                          "workers": [dataclasses.asdict(w) for w in workers]}, indent=2))
        return 0
    print(f"gateway pid {gw.pid}, {len(workers)} worker(s)")
    for name, value in relay.items():
        print(f"relay {name}: {value}")
    from .gateway.status import describe_refusals
    print("\n".join(describe_refusals(refused)))
    if workers:
        from .gateway.status import table
        print("\n".join(table(workers)))
    return 0


def _exec(args: argparse.Namespace) -> int:
    from .ticket import Ticket
    from .worker.command import decode_argv, split_assignments
    from .worker.tunnel import exec_in_vpn, process_start_monotonic
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.argv_b64 is not None:
        if cmd:
            raise SystemExit("vpn-provider exec: give either --argv-b64 or -- CMD, not both")
        try:
            cmd = decode_argv(args.argv_b64)
        except ValueError as e:
            raise SystemExit(f"vpn-provider exec: {e}") from None
    env, cmd = split_assignments(cmd)
    if not cmd:
        raise SystemExit("vpn-provider exec: missing CMD after --")
    if args.dry_run:
        print(json.dumps({"ticket": str(args.ticket), "env": env, "argv": cmd}))
        return 0
    # --timeout counts from the start of this process, so interpreter start-up is inside it.
    exec_in_vpn(Ticket.load(args.ticket), cmd, env=env, timeout=args.timeout, log_file=args.log_file,
                started=process_start_monotonic(), tcp=Transport.parse(args.tcp),
                reconnect_timeout=args.reconnect_timeout)
    return EXIT_EXEC_FAILED  # not reached: exec_in_vpn replaces this process or raises


def _check(args: argparse.Namespace) -> int:
    from .check import run_checks
    return run_checks(args.ticket, timeout=args.timeout, dns_name=args.dns_name, programs=tuple(args.program))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="vpn-provider: %(message)s")
    if args.verbose:  # our own debug lines only; pyroute2's are a flood
        logging.getLogger("vpn_provider").setLevel(logging.DEBUG)
    handler = {"gateway": _gateway, "exec": _exec, "check": _check}[args.command]
    try:
        return handler(args)
    except (VPNError, OSError, ValueError) as e:  # OSError/ValueError: say it in one line too
        text = str(e) if isinstance(e, VPNError) else f"{type(e).__name__}: {e}"
        if args.verbose:  # the whole story for a bug report: traceback, a failed command's output
            traceback.print_exc(file=sys.stderr)
            if isinstance(e, CommandError) and e.output.strip():
                print(f"vpn-provider: {e.argv[0]}'s whole output:\n{e.output.rstrip()}", file=sys.stderr)
        print(f"vpn-provider: {text}", file=sys.stderr)
        return EXIT_EXEC_FAILED if args.command == "exec" else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
