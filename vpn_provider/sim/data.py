"""Test data for the simulated internet host: a random blob and a small CMS-like NanoAOD file."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def random_file(path: Path, size_mb: int, seed: int = 1) -> str:
    """Write ``size_mb`` MiB of pseudo-random bytes; return the sha256."""
    import numpy as np
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size_mb):
            chunk = rng.integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes()
            digest.update(chunk)
            f.write(chunk)
    os.chmod(path, 0o644)
    return digest.hexdigest()


def nanoaod_file(path: Path, n_events: int = 200_000, seed: int = 2, first_event: int = 1) -> None:
    """An ``Events`` tree as in CMS NanoAOD: event IDs and jagged muon branches, written by uproot.
    About one event in ten holds a Z -> mu mu candidate, so the dimuon mass shows a peak."""
    import awkward as ak
    import numpy as np
    import uproot
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.5, n_events).astype(np.int32)
    total = int(counts.sum())

    def jagged(values):
        return ak.unflatten(values, counts)

    pt = rng.exponential(25.0, total).astype(np.float32) + 3.0
    eta = rng.uniform(-2.4, 2.4, total).astype(np.float32)
    phi = rng.uniform(-np.pi, np.pi, total).astype(np.float32)
    charge = rng.choice(np.array([-1, 1], dtype=np.int32), total)
    # Z candidates: back-to-back opposite-sign pairs with pT near m_Z / 2.
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    z_events = np.flatnonzero((counts == 2) & (rng.random(n_events) < 0.5))
    first = offsets[z_events]
    pt[first] = pt[first + 1] = rng.normal(45.6, 2.5, len(z_events)).astype(np.float32)
    eta[first] = eta[first + 1] = 0.0
    phi[first + 1] = phi[first] + np.pi
    charge[first], charge[first + 1] = 1, -1
    muon = ak.zip({"pt": jagged(pt), "eta": jagged(eta), "phi": jagged(phi),
                   "mass": jagged(np.full(total, 0.1057, dtype=np.float32)), "charge": jagged(charge)})
    event = np.arange(first_event, first_event + n_events, dtype=np.uint64)
    ids = {"run": np.ones(n_events, dtype=np.uint32), "luminosityBlock": (event // 1000 + 1).astype(np.uint32),
           "event": event}
    with uproot.recreate(path) as f:
        # mktree, not assignment: uproot 5.7 writes an RNTuple for a plain assignment.
        tree = f.mktree("Events", {**{k: v.dtype for k, v in ids.items()}, "Muon": muon.type.content})
        tree.extend({**ids, "Muon": muon})
    os.chmod(path, 0o644)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
