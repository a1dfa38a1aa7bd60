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

:func:`weight_share_of_graph` computes the same numbers from a weight graph that holds every edge (the
adjacency :func:`modlens.core.graph.weight_graph` built), so the edge blocks need not be computed again.

Layer 0: numpy and scipy only.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import sparse


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


#: Stored entries of the graph read at a time by :func:`weight_share_of_graph` (its working memory).
GRAPH_CHUNK = 1 << 18


def weight_share_of_graph(adjacency, layer_sizes: Sequence[int], labels: Sequence[np.ndarray],
                          hidden: Sequence[int], *, chunk: int | None = None) -> dict:
    """:func:`weight_share` from the symmetric weight graph ``adjacency`` (a scipy CSR array over the node
    layers of ``layer_sizes`` concatenated, every edge stored in both directions, no edge within a layer)
    instead of its edge blocks: each edge is read once, from the rows of the later of its two node layers.
    Equal to :func:`weight_share` over the blocks the graph was built from, up to the order of the sums;
    the graph is read ``chunk`` (default :data:`GRAPH_CHUNK`) stored entries at a time, so no array of its size
    is made."""
    chunk = GRAPH_CHUNK if chunk is None else max(1, int(chunk))
    adj = sparse.csr_array(adjacency)
    sizes = np.asarray(layer_sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_layers = sizes.size
    if adj.shape != (int(offsets[-1]),) * 2:
        raise ValueError(f"core.weight_share: adjacency has shape {adj.shape} but layer_sizes sum to {int(offsets[-1])}")
    labels = [np.asarray(l, dtype=np.int64) for l in labels]
    clusters = np.unique(np.concatenate([l[l >= 0] for l in labels])) if labels else np.zeros(0, dtype=np.int64)
    k = len(clusters)
    node_label = np.full(int(offsets[-1]), -1, dtype=np.int64)   # -1: no cluster, or not a hidden layer
    is_hidden = np.zeros(n_layers, dtype=bool)
    shares = np.zeros((n_layers, k))
    for h, l in zip(hidden, labels):
        if l.shape != (int(sizes[h]),):
            raise ValueError(f"core.weight_share: layer {h} has {int(sizes[h])} nodes but {l.shape} labels")
        node_label[offsets[h]:offsets[h + 1]] = l
        is_hidden[h] = True
        shares[h] = np.bincount(np.searchsorted(clusters, l[l >= 0]), minlength=k) / max(1, l.size)
    node_layer = np.repeat(np.arange(n_layers), sizes)
    pair_total = np.zeros(n_layers * n_layers)
    inside = 0.0
    indptr = adj.indptr
    for j in np.flatnonzero(is_hidden):
        r0 = int(offsets[j])
        while r0 < offsets[j + 1]:   # rows r0:r1 of layer j, about GRAPH_CHUNK entries
            r1 = int(np.searchsorted(indptr, indptr[r0] + chunk, side="right")) - 1
            r1 = min(max(r1, r0 + 1), int(offsets[j + 1]))
            lo, hi = int(indptr[r0]), int(indptr[r1])
            cols = adj.indices[lo:hi]
            rows = np.repeat(np.arange(r0, r1), np.diff(indptr[r0:r1 + 1]))
            col_layer = node_layer[cols]
            keep = (col_layer < j) & is_hidden[col_layer]
            sq = np.square(adj.data[lo:hi][keep], dtype=np.float64)
            pair_total += np.bincount(col_layer[keep] * n_layers + j, weights=sq, minlength=n_layers * n_layers)
            same = node_label[rows[keep]]
            same = (same >= 0) & (same == node_label[cols[keep]])
            inside += float(sq[same].sum())
            r0 = r1
    total = float(pair_total.sum())
    if total == 0:
        return {"share": float("nan"), "expected": float("nan"), "uniform": 1.0 / k if k else float("nan"), "k": k,
                "total": 0.0}
    pair_total = pair_total.reshape(n_layers, n_layers)
    expected = float(np.sum(pair_total * (shares @ shares.T)))
    return {"share": inside / total, "expected": expected / total, "uniform": 1.0 / k if k else float("nan"), "k": k,
            "total": total}


def weight_share_of_sums(pair_sq: dict, inside: float, labels: Sequence[np.ndarray]) -> dict:
    """:func:`weight_share` from sums already taken: ``pair_sq[(i, j)]``, the sum of the squared weights of
    block pair ``(i, j)`` (``i``, ``j`` index ``labels``, one array per hidden node layer), and ``inside``,
    that of the edges whose two nodes carry the same label ``>= 0``
    (:func:`modlens.core.residual_graph.residual_inside_sq`). Equal to :func:`weight_share` over the same
    blocks up to the order of the sums."""
    labels = [np.asarray(l, dtype=np.int64) for l in labels]
    clusters = np.unique(np.concatenate([l[l >= 0] for l in labels])) if labels else np.zeros(0, dtype=np.int64)
    k = len(clusters)
    shares = [np.bincount(np.searchsorted(clusters, l[l >= 0]), minlength=k) / max(1, l.size) for l in labels]
    total = expected = 0.0
    for (i, j), t in pair_sq.items():
        total += t
        expected += t * float(shares[i] @ shares[j])
    if total == 0:
        return {"share": float("nan"), "expected": float("nan"), "uniform": 1.0 / k if k else float("nan"), "k": k,
                "total": 0.0}
    return {"share": float(inside) / total, "expected": expected / total, "uniform": 1.0 / k if k else float("nan"),
            "k": k, "total": total}


__all__ = ["weight_share", "weight_share_of_graph", "weight_share_of_sums"]
