"""The compute node's side: ``exec`` builds the worker's namespace and hands it to the node helper."""
from pathlib import Path

#: Seconds a running worker waits for a gateway to take its tunnel back before CMD gets SIGTERM
#: (0: forever). Ten minutes covers a gateway restart or a login node's reboot; longer than that,
#: a worker without network only holds its allocation.
DEFAULT_RECONNECT_TIMEOUT = 600.0

_PACKAGE = Path(__file__).resolve().parent.parent
#: The native parts a worker runs, built by setup.py next to the package's Python.
HELPER_BINARY = _PACKAGE / "_node_helper"
PRELOAD_LIBRARY = _PACKAGE / "_tunfd_preload.so"
RELAY_PRELOAD_LIBRARY = _PACKAGE / "_relay_preload.so"
#: The preloaded library's environment variable: the node helper's listeners, "PORT4[,PORT6]".
#: Also defined in native/preload_request.h (tests/test_transport.py checks they agree).
RELAY_PORTS_ENV = "VPNP_RELAY_PORTS"
#: What to do when one is missing: an install built without a C compiler (setup.py).
NATIVE_REMEDY = "install vpn-provider from its wheel, which carries them (README: installing)"
