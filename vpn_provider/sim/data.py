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


def nanoaod_file(path: Path, n_events: int = 200_000, seed: int = 2) -> None:
    """An ``Events`` tree with jagged muon branches, as in CMS NanoAOD, written by uproot."""
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
    muon = ak.zip({"pt": jagged(pt), "eta": jagged(eta), "phi": jagged(phi),
                   "mass": jagged(np.full(total, 0.1057, dtype=np.float32)), "charge": jagged(charge)})
    with uproot.recreate(path) as f:
        # mktree, not assignment: uproot 5.7 writes an RNTuple for a plain assignment.
        tree = f.mktree("Events", {"Muon": muon.type.content})
        tree.extend({"Muon": muon})
    os.chmod(path, 0o644)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
