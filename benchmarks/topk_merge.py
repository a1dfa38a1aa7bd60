"""Time of the running top-k (core.knn_graph.TopK) on the two kNN graphs, against the plain merge measured in
the same run: every offered block row goes through one selection (the path before the survivor merge).

    PYTHONPATH=src python benchmarks/topk_merge.py [--units 30000] [--samples 512] [--blocks 12] [--width 3072]

* ``activations``: ``knn_activation_graph`` of random activations shaped like a wide network's
  (``--units`` units over ``--samples`` samples, float32 ranks).
* ``weights``: ``residual_weight_graph(mode="knn")`` of ``--blocks`` random MLP blocks of ``--width`` hidden
  units on a residual stream of ``--width / 4`` (a ViT-B/32's shape at the defaults), float32 products.

Both paths run in one process, one thread is advised (``OMP_NUM_THREADS=1``). Prints seconds, the ratio, and how
far the graphs differ: they are equal except where a node's k-th weight is exactly tied (float32 weights make
ties likelier), where the two paths may keep different tied edges.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modlens.core import knn_graph
from modlens.core.knn_graph import TopK, knn_activation_graph
from modlens.core.residual_graph import MLPBlockWeights, residual_weight_graph


def plain_update(self, rows, cols, vals, *, transposed=False):
    """The reference: one selection over every offered candidate of every row."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    vals = np.asarray(vals)
    self._merge_all(rows, cols, np.ascontiguousarray(vals.T) if transposed else vals)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare(name, build):
    fast_update = TopK.update
    fast, t_fast = timed(build)
    TopK.update = plain_update
    try:
        plain, t_plain = timed(build)
    finally:
        TopK.update = fast_update
    differ = (fast != 0).astype(np.int8) - (plain != 0).astype(np.int8)
    differ.eliminate_zeros()
    both = (fast != 0).multiply(plain != 0)
    diff = float(abs(fast.multiply(both) - plain.multiply(both)).max()) if both.nnz else 0.0
    print(f"{name}: {fast.shape[0]} nodes, {fast.nnz} stored entries; survivor merge {t_fast:.2f} s, "
          f"plain {t_plain:.2f} s, ratio {t_plain / t_fast:.2f}x; entries in one graph only: {differ.nnz} "
          f"(exact ties at a node's k-th weight), max weight difference on shared edges {diff:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=30000)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--k", type=int, default=knn_graph.DEFAULT_K)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(args.samples, args.units)).astype(np.float32)
    acts[:, : args.units // 2] += rng.normal(size=(args.samples, 1)).astype(np.float32)  # some structure
    compare("activations", lambda: knn_activation_graph(acts, args.k, dtype=np.float32))
    d = args.width // 4
    blocks = [MLPBlockWeights(w_in=rng.normal(size=(args.width, d)) / np.sqrt(d),
                              w_out=rng.normal(size=(d, args.width)) / np.sqrt(args.width))
              for _ in range(args.blocks)]
    compare("weights", lambda: residual_weight_graph(blocks, mode="knn", k=args.k, dtype=np.float32)[0])


if __name__ == "__main__":
    main()
