"""How a worker reaches the gateway: one typed value, parsed and checked here and nowhere else.

``None`` (``--tcp auto``, the default everywhere) lets the worker choose on its node
(worker/choice.py): the best transport that the node and the gateway allow.
"""
from __future__ import annotations

import enum

AUTO = "auto"


class Transport(enum.Enum):
    RELAY = "relay"            # the full-IP tunnel, with TCP through the relay beside it
    TUNNEL = "tunnel"          # all traffic in the encrypted tunnel
    RELAY_ONLY = "relay-only"  # no tunnel and no openconnect: TCP and DNS through the relay
    PRELOAD = "preload"        # no namespace at all (user namespaces off): TCP and DNS through
                               # the relay, by a library preloaded into the job's programs

    @property
    def needs_tunnel(self) -> bool:
        return self in (Transport.RELAY, Transport.TUNNEL)

    @classmethod
    def parse(cls, value: "Transport | str | None") -> "Transport | None":
        """A Transport, its name, or None / "auto" (choose on the node); else ValueError."""
        if value is None or value == AUTO:
            return None
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"transport {value!r} is not one of {', '.join(CHOICES)}") from None


CHOICES = (AUTO, *(t.value for t in Transport))


def name(transport: Transport | None) -> str:
    """The command-line form: the value, or "auto"."""
    return transport.value if transport else AUTO
