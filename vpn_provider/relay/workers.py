"""The gateway relay's view of its workers, for ``gateway status``: per worker (its node's
address and its number there), whether it is present, its open flows and the bytes they moved.

A worker is present while its helper holds its idle PRESENT connection (the helper keeps one for
the job's whole life), so the table lists workers that have no flow open as well. It is
forgotten once that connection ended (the worker ended) and no flow of it is open, whichever of
the two ends last: a job's last flow and its PRESENT connection end together, in either order.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import socket
import threading
import time

from .protocol import worker_name
from .pump import Flow

# Seconds a worker seen only by its flows stays listed after they ended: its helper opens its
# PRESENT connection alongside its first flows, and retries it every second until the relay answers.
PRESENCE_GRACE = 30.0


@dataclasses.dataclass
class _Tally:
    present: int = 0  # PRESENT connections (one, but briefly two while it reconnects)
    was_present: bool = False
    flows: set = dataclasses.field(default_factory=set)
    idle_since: float = 0.0  # time.monotonic() when its last flow ended
    done_up: int = 0  # bytes of ended flows, node -> destination
    done_down: int = 0


class WorkerTable:
    def __init__(self):
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str, int], _Tally] = {}
        self._refusals: collections.Counter[str] = collections.Counter()

    def refused(self, reason: str) -> None:
        """Count a request the destination policy refused, by its reason."""
        with self._lock:
            self._refusals[reason] += 1

    def refusals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refusals)

    @contextlib.contextmanager
    def present(self, node: str, worker: int):
        with self._lock:
            tally = self._tallies.setdefault((node, worker), _Tally())
            tally.present += 1
            tally.was_present = True
        try:
            yield
        finally:
            with self._lock:
                self._tallies[(node, worker)].present -= 1
                self._forget_if_gone((node, worker))

    def add_flow(self, node: str, worker: int, flow: Flow) -> None:
        """Count ``flow`` (node side first: moved[0] is the worker's upload) until it ends."""
        key = (node, worker)
        with self._lock:
            self._tallies.setdefault(key, _Tally()).flows.add(flow)

        def ended(f: Flow) -> None:
            with self._lock:
                tally = self._tallies[key]
                tally.flows.discard(f)
                tally.done_up += f.moved[0]
                tally.done_down += f.moved[1]
                tally.idle_since = time.monotonic()
                self._forget_if_gone(key)
        flow.on_end = ended

    def _forget_if_gone(self, key, now: float | None = None) -> None:
        """Forget a worker that has neither a PRESENT connection nor a flow open if it has been
        present (it left), or, given ``now``, if its flows ended over PRESENCE_GRACE ago and its
        PRESENT connection never came. Until then, one whose PRESENT connection is yet to come
        keeps its first flows' bytes."""
        tally = self._tallies[key]
        if tally.present or tally.flows:
            return
        if tally.was_present or (now is not None and now - tally.idle_since > PRESENCE_GRACE):
            del self._tallies[key]

    def snapshot(self) -> list[dict]:
        with self._lock:
            now = time.monotonic()
            for key in list(self._tallies):
                self._forget_if_gone(key, now)
            return [{"node": node, "worker": worker_name(worker), "flows": len(t.flows),
                     "bytes_up": t.done_up + sum(f.moved[0] for f in t.flows),
                     "bytes_down": t.done_down + sum(f.moved[1] for f in t.flows)}
                    for (node, worker), t in sorted(self._tallies.items())]


def serve_status(listener: socket.socket, table: WorkerTable, settings: dict[str, str]) -> None:
    """Answer every connection on the status socket with the table and ``settings`` as JSON,
    then close it."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # EMFILE and friends: breathe, or the loop would starve the flows
            time.sleep(0.1)
            continue
        with conn:
            try:
                conn.settimeout(5)
                conn.sendall(json.dumps({**settings, "workers": table.snapshot(),
                                         "refused": table.refusals()}).encode())
            except OSError:
                pass
