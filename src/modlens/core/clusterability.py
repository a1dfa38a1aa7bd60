"""Graphical clusterability (Filan et al., 2021, "Clusterability in Neural Networks").

Is the network's weight graph more clusterable than networks with the same weights in
random places? The null shuffles the edge weights within each layer (each weight block is
permuted as a whole, so every layer keeps its weight distribution), clusters each shuffled
network the way the real one was clustered, and compares n-cuts: a LOW n-cut is clusterable.

* :func:`shuffle_blocks` - ``n`` shuffled copies of a list of weight blocks, drawn in one
  batched permutation per block.
* :func:`null_test` - n-cut, null mean and standard deviation, z-score and the one-sided
  Monte Carlo p value ``(1 + #{null <= observed}) / (1 + n)``.
* :func:`clusterability_test` - both, given a function that clusters a graph's blocks and
  returns its n-cut (the caller decides how the graph is built and clustered).

This module is layer 0: numpy only.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from modlens.core.seeds import as_generator


def shuffle_blocks(blocks: Sequence[tuple], n: int, random_state=0) -> list[list[tuple]]:
    """``n`` copies of ``blocks`` (``(i, j, A)`` triples) with each ``A``'s entries permuted.

    The entries of each block are permuted as one flat array (a layer's weights keep their
    values and go to random positions of the same layer); blocks are drawn in order, each as
    an ``(n, size)`` batch with :meth:`numpy.random.Generator.permuted`.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (number of shuffled networks), got {n!r}")
    rng = as_generator(random_state)
    out: list[list[tuple]] = [[] for _ in range(n)]
    for i, j, a in blocks:
        a = np.asarray(a)
        flat = np.broadcast_to(a.reshape(-1), (int(n), a.size))
        shuffled = rng.permuted(flat, axis=1)
        for d in range(n):
            out[d].append((i, j, shuffled[d].reshape(a.shape)))
    return out


def null_test(observed: float, null) -> dict:
    """Compare an observed n-cut with n-cuts of null networks (low n-cut = clusterable).

    Returns ``ncut``, ``null_mean``, ``null_sd`` (ddof=1), ``z = (ncut - mean)/sd`` (negative
    = more clusterable than the null; NaN when sd is 0 or fewer than 2 draws), ``p_value`` =
    (1 + number of null n-cuts <= observed)/(1 + draws), whose floor is 1/(1 + draws), and
    ``n_null``.
    """
    null = np.asarray(null, dtype=float).ravel()
    observed = float(observed)
    if null.size == 0:
        raise ValueError("null_test needs at least one null n-cut")
    if not math.isfinite(observed) or not np.all(np.isfinite(null)):
        raise ValueError(f"n-cuts must be finite: observed {observed}, null has {int(np.sum(~np.isfinite(null)))} non-finite")
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    z = (observed - mean) / sd if sd > 0 else float("nan")
    p = (1.0 + float(np.sum(null <= observed))) / (1.0 + null.size)
    return {"ncut": observed, "null_mean": mean, "null_sd": sd, "z": z, "p_value": p, "n_null": int(null.size)}


def clusterability_test(
    observed: float,
    blocks: Sequence[tuple],
    ncut_of: Callable[[list[tuple], int], float],
    *,
    n_null: int = 50,
    random_state=0,
    batch_size: int = 10,
) -> dict:
    """Graphical clusterability of one partitioning against ``n_null`` shuffled networks.

    ``observed`` is the n-cut of the network's own partition; ``ncut_of(blocks, draw)``
    clusters the network made of ``blocks`` the same way and returns its n-cut (``draw`` is
    the index of the null network, for seeding). Shuffles are drawn ``batch_size`` networks at
    a time from ``random_state``. Returns :func:`null_test`'s dict plus ``null_ncuts``.
    """
    if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 1:
        raise ValueError(f"n_null must be a positive int, got {n_null!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = as_generator(random_state)
    null = []
    while len(null) < n_null:
        batch = shuffle_blocks(blocks, min(batch_size, n_null - len(null)), rng)
        for shuffled in batch:
            null.append(float(ncut_of(shuffled, len(null))))
    out = null_test(observed, null)
    out["null_ncuts"] = null
    return out
