"""slirp4netns: libslirp's user-mode TCP/IP stack. Proven by the prototype; available everywhere."""
from __future__ import annotations

import json
import os
import socket

from .. import proc
from ..errors import GatewayError, MissingTool
from ..ticket import Endpoint
from .base import Egress, Forward


class Slirp4netns(Egress):
    name = "slirp4netns"
    dns_forwarder = "10.0.2.3"  # libslirp answers DNS here with the host's resolvers
    guest_addr = "10.0.2.100"  # what --configure gives the namespace
    first_extra_guest = 101
    # libslirp's IPv6 network is fd00::/64 with itself at ::2. The namespace takes no router
    # advertisements (it forwards; see namespace.py): its address and route are set statically.
    ipv6_network = "fd00::/64"
    ipv6_address = "fd00::100/64"
    ipv6_router = "fd00::2"

    @classmethod
    def is_supported(cls) -> tuple[bool, str]:
        try:
            proc.find_tool("slirp4netns")
        except MissingTool as e:
            return False, str(e)
        return True, ""

    def start(self, *, target_pid: int, forwards: list[Forward], ipv6: bool = False) -> list[str]:
        api = self.run_dir / "slirp4netns.sock"
        api.unlink(missing_ok=True)
        ready_r, ready_w = os.pipe()
        try:
            self.process = self._spawn(
                [proc.find_tool("slirp4netns"), "--configure", "--mtu=65520",
                 # VPN clients must not reach services bound to the login node's loopback.
                 "--disable-host-loopback", *(["--enable-ipv6"] if ipv6 else []),
                 f"--api-socket={api}", f"--ready-fd={ready_w}", str(target_pid), "tap0"],
                pass_fds=(ready_w,))
            os.close(ready_w)
            if proc.read_message(ready_r, 10.0) != b"1":
                raise GatewayError(f"slirp4netns did not come up: {self.log_tail() or 'no output'}")
        finally:
            os.close(ready_r)
        # libslirp sends a guest's UDP datagram out of the host socket whose *guest* address
        # and port match its source. With one UDP socket per host address, each needs its own
        # guest address, so that ocserv's answer to a client leaves from the host address the
        # client dialled (ocserv replies from the address a datagram arrived on).
        udp = [ep for proto, ep in forwards if proto == "udp"]
        guest_for = {ep: (self.guest_addr if len(udp) < 2 else f"10.0.2.{self.first_extra_guest + i}")
                     for i, ep in enumerate(udp)}
        for proto, endpoint in forwards:
            self._add_hostfwd(api, proto, endpoint, guest_for.get(endpoint, self.guest_addr)
                              if proto == "udp" else self.guest_addr)
        return [f"{g}/24" for g in guest_for.values() if g != self.guest_addr] + ([self.ipv6_address] if ipv6 else [])

    @staticmethod
    def _add_hostfwd(api_path, proto: str, listen: Endpoint, guest_addr: str) -> None:
        request = {"execute": "add_hostfwd",
                   "arguments": {"proto": proto, "host_addr": listen.host, "host_port": listen.port,
                                 "guest_addr": guest_addr, "guest_port": listen.port}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(api_path))
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(s.recv(65536) or b"{}")
        if "error" in reply:
            raise GatewayError(f"cannot listen on {listen} ({proto.upper()})",
                               "the port is in use or the address is not on this host; choose --listen HOST:PORT")
