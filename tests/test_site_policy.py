"""The destination policy through the tunnel (issue 9) on the simulated site: `gateway start
--deny/--allow`, then a worker with `exec --tcp tunnel` (so every connection is a packet through
ocserv and the gateway's namespace, none through the relay) tries places it must not reach.
A refusal must come at once and be logged with the worker's VPN address and the destination.
The relay's side of the same policy is tests/test_site_security.py's."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import METADATA, wait_until

pytestmark = pytest.mark.site

LOGIN = "198.19.20.1"  # the login host, where the gateway runs
REFUSED = "ECONNREFUSED"  # a TCP reset from the gateway's namespace
REFUSED_WITHIN = 2.0  # seconds; a time-out would take 10

# Run by the worker inside the tunnel: its VPN address, then [outcome, seconds] per HOST:PORT.
PROBE = """
import errno, json, socket, sys, time
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect(("198.18.10.1", 9))
    out = {"worker": s.getsockname()[0]}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    t0 = time.monotonic()
    try:
        # IPv4 only: the tunnel carries IPv4, and a dual-stack name's AAAA would fail apart
        address = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4]
        socket.create_connection(address, timeout=10).close()
        outcome = "ok"
    except socket.timeout:
        outcome = "timeout"
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e))
    out[target] = [outcome, round(time.monotonic() - t0, 2)]
print(json.dumps(out))
"""

# (gateway options, {HOST:PORT: outcome}, (first refused target, reason logged for it)); in a
# target, {port} and {relay_port} stand for the test's gateway's.
CASES = {
    "default": ((), {
        f"{METADATA}:80": REFUSED,
        LOGIN + ":{port}": REFUSED,  # the gateway's own ports on the login host
        LOGIN + ":{relay_port}": REFUSED,
        "10.0.2.100:{port}": REFUSED,  # ocserv's port inside the gateway's namespace
        "10.0.2.3:80": REFUSED,  # slirp4netns' alias of the login host's resolver: refused by the policy
        "www.sim.test:80": "ok",  # the rest of the world, by name: DNS works too
    }, (f"{METADATA}:80", "169.254.0.0/16 is never reachable through the gateway")),
    "default-with-pasta": (("--egress", "pasta"), {  # NAT in the namespace, no slirp4netns aliases
        f"{METADATA}:80": REFUSED,
        LOGIN + ":{port}": REFUSED,
        "198.18.10.2:{port}": REFUSED,  # pasta's copy of the login host's address, in the namespace
        "www.sim.test:80": "ok",
    }, (f"{METADATA}:80", "169.254.0.0/16 is never reachable through the gateway")),
    "deny": (("--deny", "198.18.10.0/24"), {
        "198.18.10.1:80": REFUSED,
        "www.sim.test:80": REFUSED,  # the name still resolves (the pushed resolver stays reachable)
        "10.0.2.3:80": REFUSED,
    }, ("198.18.10.1:80", "denied by --deny 198.18.10.0/24")),
    "allow": (("--allow", "198.18.10.1:1094"), {
        "198.18.10.1:80": REFUSED,
        "xrootd.sim.test:1094": "ok",  # the XRootD host by name: its port and DNS stay open
        LOGIN + ":{relay_port}": REFUSED,
    }, ("198.18.10.1:80", "not in any --allow")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_destination_policy_holds_in_the_tunnel(site_env, metadata_service, start_gateway, case):
    options, expected, (first_refused, reason) = CASES[case]
    gw = start_gateway("gw-policy-tunnel", *options)
    expected = {target.format(port=gw.port, relay_port=gw.relay_port): outcome for target, outcome in expected.items()}
    done = site_env.exec_(sys.executable, "-c", PROBE, *expected, ticket=gw.ticket, extra=("--tcp", "tunnel"),
                          timeout=180)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    worker = seen.pop("worker")
    assert {target: outcome for target, (outcome, _) in seen.items()} == expected
    slow = {target: took for target, (outcome, took) in seen.items() if outcome != "ok" and took > REFUSED_WITHIN}
    assert not slow, f"refusals must come at once: {slow}"
    line = f"tunnel: refused {worker} to {first_refused} (tcp): {reason}"
    log = gw.state / "gateway.log"
    assert wait_until(lambda: line in log.read_text(), 5), f"{line!r} not in {log.read_text()}"

    def tunnel_refusals() -> dict:
        status = gw.command("status", "--json")
        return json.loads(status.stdout)["refused"]["tunnel"]
    assert wait_until(lambda: tunnel_refusals().get(reason, 0) >= 1, 5), tunnel_refusals()
    gw.stop()
    assert site_env.leftovers() == set()

