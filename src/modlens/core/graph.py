"""Graphs of a network's neurons ("graphification", paper section 3.1) and their n-cut.

Two graphs are built over the same node order, the node layers concatenated:

* the **weight graph**: two neurons are joined by the absolute value of the weight between
  them (for convolutions the caller supplies the per-channel-pair kernel norms); only
  connected layers get edges;
* the **activation graph**: every pair of units is joined by their *squared* Spearman
  correlation over a validation set, so the graph is dense.

:func:`ncut` is the normalized cut of appendix A.1 (von Luxburg, 2007), the objective that
normalized spectral clustering relaxes.

This module is layer 0: numpy and scipy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

UNCLUSTERED = -1


def layer_offsets(layer_sizes: Sequence[int]) -> np.ndarray:
    """Start index of each node layer in the concatenated node order.

    Returns an int64 array of length ``L + 1``; ``offsets[l]:offsets[l + 1]`` are the nodes
    of layer ``l`` and ``offsets[-1]`` is the total number of nodes.
    """
    sizes = np.asarray(layer_sizes)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"layer_sizes must be a non-empty sequence of ints, got {layer_sizes!r}")
    if not np.issubdtype(sizes.dtype, np.integer):
        if not np.all(np.isfinite(sizes)) or not np.all(sizes == np.round(sizes)):
            raise ValueError(f"layer_sizes must be integers, got {layer_sizes!r}")
    sizes = sizes.astype(np.int64)
    if np.any(sizes < 1):
        raise ValueError(f"every layer needs at least one node; layer_sizes = {sizes.tolist()}")
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def weight_graph(layer_sizes: Sequence[int], blocks) -> sp.csr_array:
    """Symmetric weighted adjacency of the weight graph (paper section 3.1).

    Parameters
    ----------
    layer_sizes:
        Node counts of the node layers in order (an MLP: input, hidden layers, output).
    blocks:
        ``(i, j, A)`` triples: ``A`` of shape ``(layer_sizes[j], layer_sizes[i])`` holds the
        non-negative edge weights between node layer ``i`` and node layer ``j`` (``A[b, a]``
        joins node ``a`` of layer ``i`` and node ``b`` of layer ``j``); for a dense layer this is
        ``|W|`` of the ``Linear`` from ``i`` to ``j = i + 1``. Any ``i != j`` is allowed; each
        unordered pair of layers may appear once.

    Returns
    -------
    A ``(n, n)`` float64 :class:`scipy.sparse.csr_array` with ``n = sum(layer_sizes)``, in the
    concatenated node order, symmetric, without explicit zeros, with 32-bit indices (which
    scikit-learn's ARPACK path requires).
    """
    offsets = layer_offsets(layer_sizes)
    n_layers, n = offsets.size - 1, int(offsets[-1])
    seen: dict[frozenset, int] = {}
    checked = []
    counts = np.zeros(n, dtype=np.int64)   # stored entries per row, both directions
    for b, block in enumerate(blocks):
        i, j, a = _checked_block(b, block, offsets, n_layers, seen)
        nonzero = (a != 0) if not sp.issparse(a) else None
        per_row = nonzero.sum(1) if nonzero is not None else np.diff(a.indptr)
        per_col = nonzero.sum(0) if nonzero is not None else np.bincount(a.indices, minlength=a.shape[1])
        del nonzero
        counts[offsets[j]:offsets[j + 1]] += per_row
        counts[offsets[i]:offsets[i + 1]] += per_col
        checked.append((i, j, a))
    # the symmetric CSR arrays are allocated once, at their final size, and each block writes its
    # entries (both directions) into them: no list of triples, no concatenation, no COO copy (a deep
    # residual network's graph can have 10^8 edges)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    index = np.int32 if max(n, nnz) < np.iinfo(np.int32).max else np.int64
    check_graph_memory(n, nnz, np.dtype(index).itemsize)
    indices = np.empty(nnz, dtype=index)
    data = np.empty(nnz, dtype=np.float64)
    cursor = indptr[:-1].copy()
    for i, j, a in checked:
        _write(a, offsets[j], offsets[i], indices, data, cursor)                      # rows of j, columns of i
        _write(a.T if not sp.issparse(a) else a.T.tocsr(), offsets[i], offsets[j], indices, data, cursor)
    del checked, cursor
    adj = sp.csr_array((data, indices, indptr.astype(index, copy=False)), shape=(n, n))
    adj.has_canonical_format = False
    adj.sum_duplicates()   # sorts each row in place; there are no duplicates: each pair of layers comes once
    return _int32_indices(adj)


class GraphTooLargeError(MemoryError):
    """A weight graph needs more memory than the process has (:func:`check_graph_memory`)."""


def memory_available() -> int | None:
    """Bytes this process can still allocate: the smaller of the room left under its address-space limit
    (``RLIMIT_AS``, counted against its virtual size) and the system's available memory; ``None`` where
    neither can be read (not Linux)."""
    room = []
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                virtual = int(f.read().split()[0]) * resource.getpagesize()
            room.append(soft - virtual)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return max(0, min(room)) if room else None


def check_graph_memory(n_nodes: int, nnz: int, index_bytes: int = 4, available: int | None = None) -> None:
    """Refuse, in one line, a weight graph of ``nnz`` stored entries (both directions of every edge) that
    does not fit in the memory left (``available`` bytes, :func:`memory_available` by default): its float64
    values and ``index_bytes`` indices, and the row pointers, before any of it is allocated."""
    need = nnz * (8 + index_bytes) + 16 * (n_nodes + 1)
    available = memory_available() if available is None else available
    if available is None or need <= available:
        return
    gib = 2.0 ** 30
    raise GraphTooLargeError(
        f"core.graph: the weight graph has {n_nodes:,} nodes and {nnz // 2:,} edges, which need about "
        f"{need / gib:.1f} GiB as a sparse matrix, but this process has about {available / gib:.1f} GiB left; run "
        f"it with more memory, or partition by activations (a kNN graph on a model this large)"
    )


def _checked_block(b: int, block, offsets: np.ndarray, n_layers: int, seen: dict):
    """``(i, j, A)`` of block ``b`` checked: ``A`` dense float64, or a CSR array without zeros."""
    try:
        i, j, a = block
    except (TypeError, ValueError):
        raise ValueError(f"block {b} must be a triple (i, j, A), got {type(block).__name__}") from None
    if not (isinstance(i, (int, np.integer)) and isinstance(j, (int, np.integer))):
        raise TypeError(f"block {b}: layer indices must be ints, got ({i!r}, {j!r})")
    i, j = int(i), int(j)
    if not (0 <= i < n_layers and 0 <= j < n_layers):
        raise ValueError(f"block {b}: layer indices ({i}, {j}) out of range for {n_layers} node layers")
    if i == j:
        raise ValueError(f"block {b}: edges within one layer ({i}) are not part of the weight graph")
    pair = frozenset((i, j))
    if pair in seen:
        raise ValueError(f"block {b} joins layers {i} and {j}, which block {seen[pair]} already joins")
    seen[pair] = b
    a = sp.csr_array(a) if sp.issparse(a) else np.asarray(a)
    expected = (int(offsets[j + 1] - offsets[j]), int(offsets[i + 1] - offsets[i]))
    if a.ndim != 2 or tuple(a.shape) != expected:
        raise ValueError(
            f"block {b} ({i} -> {j}) has shape {tuple(a.shape)}; expected {expected} "
            f"= (layer_sizes[{j}], layer_sizes[{i}])"
        )
    if sp.issparse(a):
        a = a.astype(np.float64)
        a.sum_duplicates()
    else:
        a = np.asarray(a, dtype=np.float64)
    v = a.data if sp.issparse(a) else a
    if not np.all(np.isfinite(v)):
        raise ValueError(f"block {b} ({i} -> {j}) contains NaN or infinite weights")
    if np.any(v < 0):
        raise ValueError(
            f"block {b} ({i} -> {j}) has negative weights (min {float(v.min()):.3g}); "
            "edge weights must be non-negative, e.g. the absolute value of the layer's weights"
        )
    if sp.issparse(a):
        a.eliminate_zeros()
    return i, j, a


def _write(a, row0: int, col0: int, indices: np.ndarray, data: np.ndarray, cursor: np.ndarray) -> None:
    """Write the non-zero entries of block ``a`` (rows from ``row0``, columns from ``col0``) into the
    CSR arrays at each row's ``cursor``, and move the cursors past them."""
    csr = a if sp.issparse(a) else sp.csr_array(a)
    lengths = np.diff(csr.indptr)
    rows = np.repeat(np.arange(csr.shape[0]), lengths)
    pos = cursor[row0 + rows] + (np.arange(csr.nnz) - csr.indptr[:-1][rows])
    indices[pos] = csr.indices + col0
    data[pos] = csr.data
    cursor[row0:row0 + csr.shape[0]] += lengths


CONV_EDGE_NORMS = ("l1", "matrix_1_norm")


def kernel_slice_norms(kernels, norm: str = "l1") -> np.ndarray:
    """Edge weights between the channels of two conv layers (paper section 3.1).

    ``kernels`` has shape ``(out, in, *kernel)`` (a conv weight, or a slice of it); the result
    ``(out, in)`` holds one norm per kernel slice ``kernels[o, i]``:

    * ``"l1"`` (the paper): the sum of absolute values of the slice;
    * ``"matrix_1_norm"`` (row 1 of the original-code notes): the matrix 1-norm of a 2-D
      slice, the largest column sum of absolute values (3 instead of 9 for an all-ones 3x3
      kernel); a 1-D slice is treated as one column, so it equals the L1 norm.
    """
    if norm not in CONV_EDGE_NORMS:
        raise ValueError(f"norm must be one of {CONV_EDGE_NORMS}, got {norm!r}")
    k = np.abs(np.asarray(kernels, dtype=np.float64))
    if k.ndim < 2:
        raise ValueError(f"kernels must have shape (out, in, *kernel), got {k.shape}")
    if norm == "l1" or k.ndim <= 3:
        return k.reshape(k.shape[0], k.shape[1], -1).sum(axis=2)
    if k.ndim != 4:
        raise ValueError(f"matrix_1_norm needs 1-D or 2-D kernel slices, got kernels of shape {k.shape}")
    return k.sum(axis=2).max(axis=2)


def layer_neighbours(n_layers: int, blocks) -> list[list[int]]:
    """For each node layer, the other node layers joined to it by a weight block ``(i, j, A)``
    (sorted). For a chain of layers these are ``l - 1`` and ``l + 1``."""
    out: list[set[int]] = [set() for _ in range(n_layers)]
    for i, j, *_ in blocks:
        out[int(i)].add(int(j))
        out[int(j)].add(int(i))
    return [sorted(s) for s in out]


def _int32_indices(adj: sp.csr_array) -> sp.csr_array:
    if adj.nnz < np.iinfo(np.int32).max and adj.shape[0] < np.iinfo(np.int32).max:
        adj.indices = adj.indices.astype(np.int32, copy=False)
        adj.indptr = adj.indptr.astype(np.int32, copy=False)
    return adj


def _standardized_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks per column (average ties), centred and scaled to unit norm; constant columns -> 0."""
    ranks = rankdata(x, axis=0)
    ranks -= ranks.mean(axis=0)
    norms = np.linalg.norm(ranks, axis=0)
    constant = norms < 1e-8  # a non-constant rank column has norm >= 1/sqrt(2)
    norms[constant] = 1.0
    ranks /= norms
    ranks[:, constant] = 0.0
    return ranks


def spearman_squared(x, y=None) -> np.ndarray:
    """Squared Spearman correlations between the columns of ``x`` (and of ``y``).

    ``x`` is ``(n_samples, a)``, ``y`` is ``(n_samples, b)``; the result is ``(a, b)`` (or
    ``(a, a)`` when ``y`` is ``None``, with ones on the diagonal for non-constant columns). A
    constant column correlates 0 with everything, itself included.
    """
    x = np.asarray(x, dtype=np.float64)
    zx = _standardized_ranks(x)
    zy = zx if y is None else _standardized_ranks(np.asarray(y, dtype=np.float64))
    corr = zx.T @ zy
    if y is None:
        corr = (corr + corr.T) / 2
    np.clip(corr, -1.0, 1.0, out=corr)
    return corr * corr


def activation_graph(activations) -> np.ndarray:
    """Dense adjacency of the activation graph (paper section 3.1).

    ``activations`` is a list with one ``(n_samples, n_units_l)`` array per layer (the
    pre-ReLU activations over a validation set; for convolutional channels the caller
    reduces the spatial map first). Edge ``(u, v)`` is the squared Spearman correlation of
    units ``u`` and ``v`` over the samples: ranks with average ties, then the Pearson
    correlation of the ranks. Returns the ``(n, n)`` float64 matrix over all units of all
    layers concatenated, symmetric, with a zero diagonal; a constant unit gets all-zero edges.
    """
    if isinstance(activations, np.ndarray) and activations.ndim == 2:
        activations = [activations]
    arrays = [np.asarray(a, dtype=np.float64) for a in activations]
    if not arrays:
        raise ValueError("activation_graph needs at least one layer of activations")
    for l, a in enumerate(arrays):
        if a.ndim != 2:
            raise ValueError(f"activations of layer {l} have shape {a.shape}; expected (n_samples, n_units)")
        if a.shape[1] < 1:
            raise ValueError(f"activations of layer {l} have no units (shape {a.shape})")
    n_samples = arrays[0].shape[0]
    for l, a in enumerate(arrays[1:], start=1):
        if a.shape[0] != n_samples:
            raise ValueError(
                f"layers 0 and {l} have different numbers of samples: shapes {arrays[0].shape} and {a.shape}"
            )
    if n_samples < 3:
        raise ValueError(f"Spearman correlations need at least 3 samples, got {n_samples}")
    for l, a in enumerate(arrays):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"activations of layer {l} contain NaN or infinite values")
    adj = spearman_squared(np.concatenate(arrays, axis=1))
    np.fill_diagonal(adj, 0.0)
    return adj


def ncut(adjacency, labels) -> float:
    """Normalized cut of a partition (paper appendix A.1, after von Luxburg, 2007).

    ``n-cut(X_1, ..., X_k) = 1/2 * sum_i W(X_i, complement of X_i) / vol(X_i)``, where
    ``W(X, Y)`` sums the edge weights between ``X`` and ``Y`` and ``vol(X)`` sums the degrees
    of ``X``. Nodes labelled ``-1`` are removed from the graph first (their edges do not count
    towards any cut or volume). A cluster with zero volume contributes 0.

    The predecessor paper (Filan et al., 2021) reports the same sum *without* the factor
    1/2, i.e. twice this value (for two clusters that is networkx's ``normalized_cut_size``).

    ``adjacency`` may be dense or scipy-sparse; ``labels`` is one label per node, or a list of
    per-layer label arrays (concatenated in order).
    """
    if isinstance(labels, (list, tuple)) and labels and np.ndim(labels[0]) == 1:
        labels = np.concatenate([np.asarray(l) for l in labels])
    labels = np.asarray(labels)
    adj = sp.csr_array(adjacency) if sp.issparse(adjacency) else np.asarray(adjacency, dtype=np.float64)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {adj.shape}")
    if labels.ndim != 1 or labels.size != adj.shape[0]:
        raise ValueError(f"need one label per node: {labels.shape} labels for {adj.shape[0]} nodes")
    keep = np.flatnonzero(labels != UNCLUSTERED)
    if keep.size == 0:
        return 0.0
    _, lab = np.unique(labels[keep], return_inverse=True)
    k = int(lab.max()) + 1
    if sp.issparse(adj):
        # the removed nodes get empty rows of the indicator instead of a copy of the graph without them
        # (a large CNN's weight graph has 10^8 entries, and two fancy-indexed copies ran out of memory); the
        # indicator's indices have the graph's type, as scipy copies the graph's indices to the wider of them
        index = adj.indices.dtype
        indptr = np.zeros(adj.shape[0] + 1, dtype=index)
        np.cumsum(labels != UNCLUSTERED, out=indptr[1:])
        onehot = sp.csr_array((np.ones(keep.size), lab.astype(index), indptr), shape=(adj.shape[0], k))
        between = (onehot.T @ (adj @ onehot)).toarray()  # (k, k): W(X_a, X_b)
    else:
        sub = adj[np.ix_(keep, keep)]
        onehot = sp.csr_array((np.ones(keep.size), (np.arange(keep.size), lab)), shape=(keep.size, k))
        dense_onehot = onehot.toarray()
        between = dense_onehot.T @ (sub @ dense_onehot)
    vol = between.sum(axis=1)
    cut = vol - np.diag(between)
    terms = np.divide(cut, vol, out=np.zeros(k), where=vol > 0)
    return float(0.5 * terms.sum())
