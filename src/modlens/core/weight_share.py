"""The share of squared weight inside clusters, and its chance levels (docs/language-models.md, section 10).

Beside the n-cut, published analyses of GPT-2 and Pythia MLP neurons compare the share of weight
that falls inside clusters with ``1/k``. Over the edges between hidden neurons (node layers
``hidden`` of a weight graph given one block pair at a time),

    ``S = sum_{(a,b): label a = label b >= 0} w_ab^2 / sum_{(a,b)} w_ab^2``

with two baselines: ``1/k`` (``k`` = the number of clusters), and the size-matched expectation of a
random relabelling that keeps every layer's cluster sizes,
``B = sum_{i<j} s_ij sum_c p_ci p_cj`` (``s_ij``: block pair ``(i, j)``'s share of the squared
weight, ``p_ci``: the share of layer ``i``'s neurons in cluster ``c``). ``B = 1/k`` when every cluster
of every layer has the same size; neurons without a cluster (label -1) count as outside.

Layer 0: numpy only.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def weight_share(triples: Iterable, labels: Sequence[np.ndarray], hidden: Sequence[int]) -> dict:
    """``{"share", "expected", "uniform", "k", "total"}`` for edge blocks ``triples`` ``(i, j, A)``
    (``A[b, a]`` joins node ``a`` of layer ``i`` to node ``b`` of layer ``j``; blocks touching a layer
    outside ``hidden`` are skipped) and ``labels``, one array per hidden node layer in the order of
    ``hidden``. ``share`` and ``expected`` are NaN when there is no hidden-to-hidden weight."""
    position = {h: p for p, h in enumerate(hidden)}
    labels = [np.asarray(l, dtype=np.int64) for l in labels]
    clusters = np.unique(np.concatenate([l[l >= 0] for l in labels])) if labels else np.zeros(0, dtype=np.int64)
    index = {int(c): n for n, c in enumerate(clusters)}
    k = len(clusters)

    def one_hot(l: np.ndarray) -> np.ndarray:
        m = np.zeros((k, l.size))
        keep = l >= 0
        m[[index[int(c)] for c in l[keep]], np.flatnonzero(keep)] = 1.0
        return m

    hots = [one_hot(l) for l in labels]
    shares = [h.sum(1) / max(1, h.shape[1]) for h in hots]   # p_ci per layer
    total = inside = expected = 0.0
    for i, j, a in triples:
        if i not in position or j not in position:
            continue
        pi, pj = position[i], position[j]
        sq = np.square(np.asarray(a, dtype=np.float64))
        t = float(sq.sum())
        total += t
        inside += float(np.sum((hots[pj] @ sq) * hots[pi]))
        expected += t * float(shares[pi] @ shares[pj])
    if total == 0:
        return {"share": float("nan"), "expected": float("nan"), "uniform": 1.0 / k if k else float("nan"), "k": k,
                "total": 0.0}
    return {"share": inside / total, "expected": expected / total, "uniform": 1.0 / k if k else float("nan"), "k": k,
            "total": total}


__all__ = ["weight_share"]
