"""The TCP relay: a second transport beside the L3 tunnel, for TCP only.

The worker's namespace redirects its outgoing TCP connections (nftables, in the namespace) to a
local listener held by a helper in the node's own network namespace. The helper opens a plain
TCP connection to the gateway's relay on the login node, authenticates with the ticket's secret,
names the destination, and from then on the kernel moves the bytes (splice(2)) on both sides.
No per-packet work happens in user space, so a flow runs near the speed of the link.
"""

#: How a worker's TCP travels: through this relay beside the tunnel (default), inside the
#: encrypted tunnel, or through the relay with no tunnel at all ("relay-only": TCP and DNS
#: only, and no openconnect: the smallest footprint per worker).
TCP_TRANSPORTS = ("relay", "tunnel", "relay-only")
