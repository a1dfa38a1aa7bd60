"""Spectral clustering of a dense graph held as CSR: solved as CSR (the plain path) against the dense
array that :func:`modlens.core.clustering.spectral_labels` uses above ``DENSE_SHARE`` (a
transformer's residual-stream weight graph below its kNN size is stored this way).

Each graph is a random planted-cluster graph with every entry stored; both paths run in this process
on the same graph, and the script prints CPU seconds, the ratio and whether the labels agree.
Sizes at or below 5,000 nodes use ARPACK, above it LOBPCG (``eigen_solver="auto"``).

    PYTHONPATH=src python benchmarks/dense_spectral.py [--sizes 2000,4874,6000] [--k 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from modlens.core import clustering


def planted(n: int, k: int, seed: int = 0) -> sp.csr_array:
    rng = np.random.default_rng(seed)
    group = rng.integers(0, k, n)
    a = rng.random((n, n)) * (1.0 + 3.0 * (group[:, None] == group[None, :]))
    a = (a + a.T) / 2.0
    np.fill_diagonal(a, 0.0)
    return sp.csr_array(a)


def timed(adj, k: int, share: float):
    saved = clustering.DENSE_SHARE
    clustering.DENSE_SHARE = share
    try:
        t = time.process_time()
        labels = clustering.spectral_labels(adj, k, random_state=0)
        return time.process_time() - t, labels
    finally:
        clustering.DENSE_SHARE = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,4874,6000")
    p.add_argument("--k", type=int, default=16)
    args = p.parse_args(argv)
    print(f"{'nodes':>6} {'solver':>7} {'CSR cpu-s':>10} {'dense cpu-s':>12} {'ratio':>6}  labels")
    for n in (int(s) for s in args.sizes.split(",")):
        adj = planted(n, args.k)
        plain_s, plain = timed(adj, args.k, 2.0)            # a share above 1: never dense
        dense_s, dense = timed(adj, args.k, clustering.DENSE_SHARE)
        solver = clustering.choose_eigen_solver(n)
        same = "equal" if np.array_equal(plain, dense) else f"differ at {int((plain != dense).sum())} nodes"
        print(f"{n:>6} {solver:>7} {plain_s:>10.1f} {dense_s:>12.1f} {plain_s / dense_s:>5.2f}x  {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
