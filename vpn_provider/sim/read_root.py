"""Read a NanoAOD-like ROOT file with uproot and report what was read (used by the demo and tests
inside the VPN). Prints one JSON line."""
from __future__ import annotations

import json
import sys
import time


def main(url: str) -> int:
    import socket
    from urllib.parse import urlparse
    host = urlparse(url).hostname
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host} ({e.strerror})") from None
    import awkward as ak
    import numpy as np
    import uproot
    t0 = time.perf_counter()
    with uproot.open(url, timeout=30) as f:
        tree = f["Events"]
        muons = tree.arrays(["nMuon", "Muon_pt", "Muon_eta", "Muon_charge"], library="ak")
        nbytes = sum(b.compressed_bytes for b in tree.branches)
    elapsed = time.perf_counter() - t0
    pt = ak.flatten(muons.Muon_pt)
    two_mu = muons[(muons.nMuon == 2) & (ak.sum(muons.Muon_charge, axis=1) == 0)]
    counts, edges = np.histogram(np.asarray(pt), bins=10, range=(0, 100))
    print(json.dumps({"url": url, "entries": int(tree.num_entries), "muons": int(len(pt)),
                      "mean_pt": float(ak.mean(pt)), "opposite_sign_pairs": int(len(two_mu)),
                      "bytes": int(nbytes), "seconds": elapsed,
                      "pt_histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1]))
    except OSError as e:  # e.g. no route or no DNS: say so in one line
        print(f"cannot read {sys.argv[1]}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        raise SystemExit(1) from None
