"""The TCP relay: a second transport beside the L3 tunnel, for TCP only.

The worker's namespace redirects its outgoing TCP connections (nftables, in the namespace) to a
local listener held by a helper in the node's own network namespace. The helper opens a plain
TCP connection to the gateway's relay on the login node, authenticates with the ticket's secret,
names the destination, and from then on the flow's bytes cross as encrypted records (or, with
the gateway's opt-out, spliced by the kernel). No per-packet work happens anywhere: each record
is up to 64 KiB, so a flow runs near the speed of the link.

How a worker's traffic travels (relay beside the tunnel, tunnel alone, relay alone) is one
typed value: vpn_provider/transport.py.
"""
