"""Reconfigure a running worker's namespace when its tunnel goes or comes back.

    python -I -m vpn_provider.worker.rejoin down|up TCP_MODE

Run by the node helper's tunnel keeper (``native/tunnel_keeper.c``), never by users. Descriptors
3, 4 and 5 are the worker's user, network and mount namespaces; for ``up``, stdin carries
openconnect's report (``env -0`` of its script) for the new tunnel. The keeper runs as the user
who created those namespaces, in their parent user namespace, so it may enter them and gets the
capabilities it needs inside (as ``nsenter -U`` would).
"""
from __future__ import annotations

import sys

from .. import linux

_USER_NS, _NET_NS, _MNT_NS = 3, 4, 5


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m vpn_provider.worker.rejoin up|down TCP_MODE", file=sys.stderr)
        return 2
    action, tcp_mode = argv
    report = sys.stdin.buffer.read() if action == "up" else b""
    # The user namespace first (only a single-threaded process may enter one): it gives us
    # the capabilities that entering the other two needs.
    for fd in (_USER_NS, _NET_NS, _MNT_NS):
        linux.setns(fd)
    from . import netconfig, vpnc_env  # pyroute2 only once inside
    from .redirect import redirect_installed
    from .tunnel import TUN_NAME
    if action == "down":
        # No redirect in the namespace (--tcp tunnel, or the relay did not answer at the start):
        # the tunnel carried every TCP connection.
        try:
            netconfig.take_tunnel_down(TUN_NAME, all_tcp=tcp_mode == "tunnel" or not redirect_installed())
        except OSError as e:
            print(f"vpn-provider: cannot reset the tunnel's TCP connections ({e.strerror or e}; the kernel "
                  "needs CONFIG_INET_DIAG_DESTROY): they end by TCP's own time-outs", file=sys.stderr)
        return 0
    params = vpnc_env.parse(vpnc_env.parse_nul_separated(report))
    netconfig.configure_links(params)
    netconfig.rewrite_resolv_conf(netconfig.resolv_conf_text(params))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except Exception as e:  # pyroute2's NetlinkError too: one line on the job's stderr
        print(f"vpn-provider: reconfiguring the worker's namespace: {e}", file=sys.stderr)
        raise SystemExit(1) from None
