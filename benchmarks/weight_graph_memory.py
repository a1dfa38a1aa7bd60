"""Memory and time of weight-graph assembly (``modlens.core.graph.weight_graph``) against the plain
assembly it replaced (both directions of every edge as int64 triples, one sparse conversion), on a
graph shaped like a deep residual network's: every pair of layers joined by a dense block.

    PYTHONPATH=src python benchmarks/weight_graph_memory.py [--width 1500] [--layers 6]

Each path runs in a fresh process (peak resident memory is per process); prints the extra peak
memory, the time and their ratios, and checks that both give the same matrix.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp


def plain_weight_graph(layer_sizes, blocks) -> sp.csr_array:
    """The reference: both directions of every edge listed as int64 (row, col, value) triples."""
    offsets = np.concatenate([[0], np.cumsum(layer_sizes)])
    rows, cols, vals = [], [], []
    for i, j, a in blocks:
        r, c = np.nonzero(a)
        v = a[r, c]
        r, c = r + offsets[j], c + offsets[i]
        rows += [r, c]
        cols += [c, r]
        vals += [v, v]
    n = int(offsets[-1])
    adj = sp.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    adj.sum_duplicates()
    return adj


def _child(path: str, width: int, layers: int) -> None:
    rng = np.random.default_rng(0)
    sizes = [width] * layers
    blocks = [(i, j, np.abs(rng.standard_normal((width, width)))) for i in range(layers) for j in range(i + 1, layers)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if path == "plain":
        adj = plain_weight_graph(sizes, blocks)
    else:
        from modlens.core.graph import weight_graph
        adj = weight_graph(sizes, blocks)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = np.random.default_rng(1).standard_normal(adj.shape[0])
    print(json.dumps({"nnz": int(adj.nnz), "peak_gib": (peak - base) / 2**20, "seconds": seconds,
                      "probe": (adj @ probe).tolist()[:50]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.width, args.layers)
        return
    out = {}
    for path in ("plain", "modlens"):
        res = subprocess.run([sys.executable, __file__, "--child", path, "--width", str(args.width), "--layers",
                              str(args.layers)], capture_output=True, text=True, check=True)
        out[path] = json.loads(res.stdout)
        print(f"{path:8s} nnz {out[path]['nnz']:,}  extra peak memory {out[path]['peak_gib']:.2f} GiB  "
              f"{out[path]['seconds']:.1f} s")
    assert out["plain"]["nnz"] == out["modlens"]["nnz"]
    np.testing.assert_allclose(out["modlens"]["probe"], out["plain"]["probe"], rtol=1e-12)
    print(f"memory {out['plain']['peak_gib'] / out['modlens']['peak_gib']:.2f}x less, "
          f"time {out['plain']['seconds'] / out['modlens']['seconds']:.2f}x faster (same matrix)")


if __name__ == "__main__":
    main()
