"""Memory and time of what is read from a built weight graph after clustering: the n-cut of the hidden
neurons' labels and the share of squared weight inside clusters, against the plain way of getting them (a
copy of the hidden neurons' subgraph for the n-cut, on a graph shaped like a deep residual network's: every pair
of layers joined by a dense block; a transformer's edge blocks through the residual stream computed again for
the weight share, on its dense residual weight graph).

    PYTHONPATH=src python benchmarks/graph_reads_memory.py [--width 1000] [--layers 8]

Both ways run in one process; memory is the peak of the numpy allocations during each (tracemalloc), beside
the size of the graph. Prints the ratios and checks that both ways give the same numbers.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp

from modlens.core.graph import UNCLUSTERED, layer_offsets, ncut, weight_graph
from modlens.core.residual_graph import MLPBlockWeights, StageMap, residual_edge_blocks, residual_weight_graph
from modlens.core.weight_share import weight_share, weight_share_of_graph


def plain_hidden_ncut(adj, sizes, hidden, labels) -> float:
    """The reference: the n-cut on a copy of the hidden neurons' subgraph, itself copied without the
    unclustered neurons."""
    offsets = layer_offsets(sizes)
    idx = np.concatenate([np.arange(offsets[h], offsets[h + 1]) for h in hidden])
    lab = np.concatenate(labels)
    sub = adj[idx][:, idx]
    keep = np.flatnonzero(lab != UNCLUSTERED)
    sub = sub[keep][:, keep]
    _, inv = np.unique(lab[keep], return_inverse=True)
    k = int(inv.max()) + 1
    onehot = sp.csr_array((np.ones(keep.size), (np.arange(keep.size), inv)), shape=(keep.size, k))
    between = (onehot.T @ (sub @ onehot)).toarray()
    vol = between.sum(axis=1)
    return float(0.5 * np.sum(np.divide(vol - np.diag(between), vol, out=np.zeros(k), where=vol > 0)))


def modlens_hidden_ncut(adj, sizes, hidden, labels) -> float:
    offsets = layer_offsets(sizes)
    full = np.full(int(offsets[-1]), UNCLUSTERED, dtype=np.int64)
    for h, l in zip(hidden, labels):
        full[offsets[h]:offsets[h + 1]] = l
    return ncut(adj, full)


def measured(fn, *args):
    tracemalloc.start()
    t = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return value, peak / 2**30, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w, n_layers = args.width, args.layers
    sizes = [w] * n_layers
    blocks = [(i, j, np.abs(rng.standard_normal((w, w)))) for i in range(n_layers) for j in range(i + 1, n_layers)]
    adj = weight_graph(sizes, blocks)
    hidden = list(range(1, n_layers - 1))
    labels = [rng.integers(-1, args.clusters, w) for _ in hidden]
    graph_gib = (adj.data.nbytes + adj.indices.nbytes + adj.indptr.nbytes) / 2**30
    print(f"graph: {adj.shape[0]:,} nodes, {adj.nnz:,} stored entries, {graph_gib:.2f} GiB")
    rows = [("hidden n-cut", (plain_hidden_ncut, adj, sizes, hidden, labels),
             (modlens_hidden_ncut, adj, sizes, hidden, labels))]
    # a transformer: the edge blocks are products through the residual stream, computed again by the plain way
    # shaped like timm's tiny_vit_5m: stages of widths 64, 128, 160, 320 with 2, 2, 6, 2 blocks of MLP ratio 4,
    # joined by 3x3 stride-2 convolutions (the composed maps have up to 225 taps)
    widths, depths = (64, 128, 160, 320), (2, 2, 6, 2)
    mlps = [MLPBlockWeights(rng.standard_normal((4 * d, d)), rng.standard_normal((d, 4 * d)), rng.random(d) + 0.5,
                            stage=s) for s, (d, n) in enumerate(zip(widths, depths)) for _ in range(n)]
    maps = [StageMap(0.1 * rng.standard_normal((b, a, 3, 3)), (2, 2)) for a, b in zip(widths, widths[1:])]
    t_adj, t_sizes = residual_weight_graph(mlps, mode="dense", transitions=maps)
    t_labels = [rng.integers(-1, args.clusters, b.width) for b in mlps]
    t_hidden = list(range(len(mlps)))
    print(f"transformer graph: {t_adj.shape[0]:,} nodes, {t_adj.nnz:,} stored entries")
    rows.append(("residual share",
                 (lambda: weight_share(residual_edge_blocks(mlps, neurons_only=True, transitions=maps), t_labels,
                                       t_hidden),),
                 (weight_share_of_graph, t_adj, t_sizes, t_labels, t_hidden)))
    for name, plain, ours in rows:
        a, a_gib, a_s = measured(*plain)
        b, b_gib, b_s = measured(*ours)
        if isinstance(a, dict):
            for key in ("share", "expected", "total"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-10)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-10)
        print(f"{name:14s} plain {a_gib:.3f} GiB {a_s:.2f} s | modlens {b_gib:.3f} GiB {b_s:.2f} s | "
              f"memory {a_gib / max(b_gib, 1e-9):.1f}x less, time {a_s / max(b_s, 1e-9):.1f}x faster (same value)")


if __name__ == "__main__":
    main()
