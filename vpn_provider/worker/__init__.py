"""The compute node's side: ``exec`` builds the worker's namespace and hands it to the node helper."""

#: Seconds a running worker waits for a gateway to take its tunnel back before CMD gets SIGTERM
#: (0: forever). Ten minutes covers a gateway restart or a login node's reboot; longer than that,
#: a worker without network only holds its allocation.
DEFAULT_RECONNECT_TIMEOUT = 600.0
