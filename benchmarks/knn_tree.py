"""KD-tree against matrix products for the kNN activation graph of few samples.

``knn_activation_graph`` finds each unit's ``k`` largest squared Spearman correlations either with
chunked matrix products (``method="matmul"``, ``m n^2`` flops for ``n`` units and ``m`` samples, here
in float32 as ``partition`` runs it) or with a KD-tree over the standardized ranks and their negations
(``method="tree"``). This times both on random activations for each sample count, in the same process,
and checks the tree against a brute-force top-``k`` of a few hundred units (their sorted kept weights
equal: exact ties in rank data make *which* neighbour is kept arbitrary) and the two graphs' edge
weight totals. It prints the ratio matmul / tree; ``TREE_MAX_SAMPLES`` is set from such runs.

    python benchmarks/knn_tree.py --units 20000 100000 --samples 4 6 8 10 12
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modlens.core.knn_graph import knn_activation_graph, standardized_ranks, tree_neighbours


def check_rows(z, k, rows, cols, vals, probe):
    """The tree's kept weights of the ``probe`` units equal a brute-force top k of their correlations."""
    for u in probe:
        r2 = np.square(z[:, u] @ z)
        r2[u] = -1.0
        want = np.sort(r2)[::-1][:k]
        got = np.sort(vals[rows == u])[::-1]
        if not np.allclose(got, want, atol=1e-12):
            raise AssertionError(f"unit {u}: tree kept {got[:4]}..., brute force {want[:4]}...")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--samples", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="the tree's threads (match OMP_NUM_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"{'units':>8} {'samples':>7} {'matmul s':>9} {'tree s':>8} {'ratio':>6}")
    for n in args.units:
        for m in args.samples:
            acts = rng.standard_normal((m, n)).astype(np.float32)
            t = time.perf_counter()
            g_mat = knn_activation_graph(acts, args.k, dtype=np.float32, method="matmul")
            t_mat = time.perf_counter() - t
            t = time.perf_counter()
            g_tree = knn_activation_graph(acts, args.k, method="tree", workers=args.workers)
            t_tree = time.perf_counter() - t
            z = standardized_ranks(acts)
            probe = rng.choice(n, size=min(n, 200), replace=False)
            rows, cols, vals = tree_neighbours(z, args.k, workers=args.workers)
            check_rows(z, args.k, rows, cols, vals, probe)
            print(f"{n:>8} {m:>7} {t_mat:>9.1f} {t_tree:>8.1f} {t_mat / t_tree:>6.2f}"
                  f"   edges {g_mat.nnz // 2} / {g_tree.nnz // 2}, weight {g_mat.sum() / 2:.1f} / {g_tree.sum() / 2:.1f}")


if __name__ == "__main__":
    main()
