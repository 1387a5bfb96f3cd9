"""BENCH-ONLY: the published prototype's gateway configuration, for comparison.

ocserv behind slirp4netns forwarding *TCP only* (so clients cannot get DTLS, TCP-over-TCP), with
ocserv's compression on and iptables MASQUERADE, as the prototype ran it. Built from the
product's own pieces so that only those three settings differ. Runs in the foreground as the
user until SIGTERM.  Usage: python -m bench.prototype_gateway STATE_DIR PORT
"""
from __future__ import annotations

import ipaddress
import signal
import sys
from pathlib import Path

from vpn_provider import proc
from vpn_provider.egress.slirp import Slirp4netns
from vpn_provider.gateway import ocserv_conf
from vpn_provider.gateway.credentials import ensure_credentials
from vpn_provider.gateway.namespace import GatewayNamespace
from vpn_provider.sim.site import INET_ADDR, LOGIN_DOWN_ADDR
from vpn_provider.ticket import Endpoint, Ticket

# Not the product gateway's default pool (100.64.0.0/16): both run on the login host at once.
POOL = ipaddress.IPv4Network("100.65.0.0/16")


def main(state: Path, port: int) -> None:
    run_dir = state / "run"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = ensure_credentials(state, ["prototype"])
    text = ocserv_conf.render(ocserv_conf.OcservSettings(
        port=port, pool=POOL, dns=(INET_ADDR,),  # the internet host's resolver
        server_cert=creds.server_cert, server_key=creds.server_key, passwd_file=creds.passwd_file,
        run_dir=run_dir))
    text = text.replace("compression = false", "compression = true")
    text = "".join(ln + "\n" for ln in text.splitlines() if not ln.startswith("udp-port"))
    (state / "ocserv.conf").write_text(text)
    ns = GatewayNamespace([proc.find_tool("ocserv"), "--foreground", "--config", str(state / "ocserv.conf")],
                          str(state / "ocserv.log"), masquerade=True)
    ns.spawn()
    egress = Slirp4netns(run_dir)
    ns.release(egress.start(target_pid=ns.pid, forwards=[("tcp", Endpoint("0.0.0.0", port))]))
    Ticket(gateways=(Endpoint(LOGIN_DOWN_ADDR, port),), pin=creds.pin, user=creds.user,
           secret=creds.secret).save(state / "ticket.json")
    print("READY", flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        proc.terminate(ns.pid)
        egress.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main(Path(sys.argv[1]), int(sys.argv[2]))
