"""The gateway relay's view of its workers, for ``gateway status``: per worker (its node's
address and its number there), whether it is present, its open flows and the bytes they moved.

A worker is present while its helper holds its idle PRESENT connection (the helper keeps one for
the job's whole life), so the table lists workers that have no flow open as well. It is
forgotten when that connection ends (the worker ended) and no flow of it is open.
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


@dataclasses.dataclass
class _Tally:
    present: int = 0  # PRESENT connections (one, but briefly two while it reconnects)
    flows: set = dataclasses.field(default_factory=set)
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
            self._tallies.setdefault((node, worker), _Tally()).present += 1
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
        flow.on_end = ended

    def _forget_if_gone(self, key) -> None:
        """A worker is forgotten when its PRESENT connection ends with no flow open, not when a
        flow ends: its helper may be between two PRESENT connections (after a relay restart),
        and its bytes would be lost."""
        tally = self._tallies[key]
        if not tally.present and not tally.flows:
            del self._tallies[key]

    def snapshot(self) -> list[dict]:
        with self._lock:
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
