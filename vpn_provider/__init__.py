"""vpn-provider: a user-level VPN that lets workers on air-gapped HPC compute nodes reach the Internet."""

__version__ = "0.1.0"

from .errors import VPNError  # noqa: E402
from .gateway.config import GatewayConfig  # noqa: E402
from .gateway.control import Gateway  # noqa: E402
from .ticket import Endpoint, Ticket  # noqa: E402

__all__ = ["Endpoint", "Gateway", "GatewayConfig", "Ticket", "VPNError", "__version__"]
