"""Sparse k-nearest-neighbour versions of the neuron graphs, for models too large for dense graphs.

The dense activation graph of ``n`` neurons is an ``n x n`` float64 matrix (8 n^2 bytes per copy:
10.9 GB for a ViT-B/16's 36,864 MLP neurons). Here each neuron keeps only its ``k`` strongest
edges, and the graph is never materialized densely:

* :func:`knn_activation_graph` ranks each neuron's activations, standardizes the ranks, and
  computes squared Spearman correlations one chunk of neurons at a time (a ``chunk x n`` block
  of the correlation matrix), keeping the top ``k`` per neuron of each block before moving on;
  for a handful of samples it finds the same neighbours with a KD-tree (:func:`tree_neighbours`).
* :func:`knn_sparsify` keeps the top ``k`` edges per node of an existing (dense or sparse)
  weighted adjacency, e.g. a weight graph.
* :func:`knn_weight_graph` builds the kNN version of a weight graph from its blocks without the
  full graph (:data:`MAX_EXACT_WEIGHT_EDGES`: a CNN's weight graph above that many edges).
* :class:`TopK` is the running top-``k`` used when the candidate edges of a node arrive in
  pieces (the residual-stream weight graph of :mod:`modlens.core.residual_graph`).

**Symmetrization.** Node ``u`` keeps the set ``N_k(u)`` of its ``k`` heaviest edges. The graph
is then made symmetric in one of two documented ways:

* ``"max"`` (default): edge ``{u, v}`` is present when ``v in N_k(u)`` *or* ``u in N_k(v)``, with
  its true weight ``w(u, v)`` (the larger of the two directed entries, which are equal up to
  rounding). The kNN graph is then exactly the dense graph restricted to that edge set.
* ``"mean"``: ``(D + D^T) / 2`` for the directed kNN matrix ``D``: an edge chosen by both ends
  keeps ``w(u, v)``, an edge chosen by one end only gets ``w(u, v) / 2``.

Every node has degree >= 1 in the result unless all its edges are zero (then it stays a
zero-degree node, labelled ``-1`` by clustering, as in the dense path).

**Automatic choice.** :func:`choose_graph_mode` picks ``"dense"`` up to
:data:`DENSE_MAX_NODES` nodes and ``"knn"`` above; the threshold and the default ``k`` were
measured (``benchmarks/knn_vs_dense.py``, see ``docs/transformers.md``).

This module is layer 0: numpy and scipy only.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from modlens.core import graph
from modlens.core.graph import _int32_indices, _standardized_ranks

#: Largest graph (in nodes) built densely when ``mode="auto"``; measured, see docs/transformers.md.
DENSE_MAX_NODES = 8192
#: Default number of neighbours kept per node in a kNN graph.
DEFAULT_K = 64
#: Default cap on the working memory of one chunk (the ``chunk x n`` correlation block and its
#: ``argpartition`` indices).
DEFAULT_CHUNK_BYTES = 256 * 2**20

#: A CNN's weight graph with more edges than this is built as a kNN graph (:func:`knn_weight_graph`,
#: ``DEFAULT_K`` edges per node) by ``partition``; up to it, exactly (12 bytes per stored entry, both
#: directions: 1.2 GB at this size). Machine-independent, so the same model gets the same graph anywhere.
MAX_EXACT_WEIGHT_EDGES = 50_000_000
#: :meth:`TopK.update` merges a full row from its surviving candidates alone (those above the row's
#: current k-th best) when there are at most this many times ``k`` of them; otherwise it selects.
SPARSE_MERGE_FACTOR = 4

#: A row of a wide piece that still has more than ``SPARSE_MERGE_FACTOR k`` survivors (a row still filling)
#: first raises its threshold to the ``k``-th best of every this-many-th candidate (:meth:`TopK.update`).
SAMPLE_STRIDE = 8

#: :meth:`TopK.update` works through its rows in pieces of about this many merge-buffer entries.
UPDATE_ENTRIES = 2**22

#: :func:`knn_activation_graph` with ``method="auto"`` finds the neighbours with a KD-tree (:func:`tree_neighbours`)
#: when there are at most this many samples, and with matrix products above; measured, see ``benchmarks/knn_tree.py``.
TREE_MAX_SAMPLES = 8

SYMMETRIZE = ("max", "mean")
GRAPH_MODES = ("auto", "dense", "knn")
NEIGHBOUR_METHODS = ("auto", "matmul", "tree")


def choose_graph_mode(n_nodes: int, mode: str = "auto", *, dense_max_nodes: int = DENSE_MAX_NODES) -> str:
    """``"dense"`` or ``"knn"``: ``mode`` itself unless it is ``"auto"``, which picks dense up to
    ``dense_max_nodes`` nodes and kNN above."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"core.knn_graph: graph mode must be one of {GRAPH_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "dense" if int(n_nodes) <= int(dense_max_nodes) else "knn"


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise ValueError(f"core.knn_graph: k must be a positive int, got {k!r}")
    return min(int(k), max(n - 1, 1))


def _check_symmetrize(symmetrize: str) -> None:
    if symmetrize not in SYMMETRIZE:
        raise ValueError(f"core.knn_graph: symmetrize must be one of {SYMMETRIZE}, got {symmetrize!r}")


def _rows_for(n_cols: int, itemsize: int, chunk_bytes: int) -> int:
    # one chunk holds the values (itemsize) and the argpartition indices (8 bytes) per entry
    return max(1, int(chunk_bytes) // max(1, n_cols * (itemsize + 8)))


def _top_k_rows(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the ``k`` largest entries of every row of ``block``."""
    if k >= block.shape[1]:
        idx = np.broadcast_to(np.arange(block.shape[1]), block.shape).copy()
    else:
        idx = np.argpartition(block, block.shape[1] - k, axis=1)[:, block.shape[1] - k :]
    return idx, np.take_along_axis(block, idx, axis=1)


def symmetrize_directed(rows, cols, vals, n: int, symmetrize: str = "max") -> sp.csr_array:
    """Symmetric CSR adjacency from directed kNN edges ``rows[i] -> cols[i]`` (see the module
    docstring for ``"max"`` and ``"mean"``); self-loops and zero weights are dropped."""
    _check_symmetrize(symmetrize)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    vals = np.asarray(vals, dtype=np.float64)
    keep = (rows != cols) & (vals > 0)
    directed = sp.csr_array((vals[keep], (rows[keep], cols[keep])), shape=(n, n))
    directed.sum_duplicates()
    if symmetrize == "max":
        adj = directed.maximum(directed.T)
    else:
        adj = (directed + directed.T) * 0.5
    adj = sp.csr_array(adj)
    adj.eliminate_zeros()
    adj.sort_indices()
    return _int32_indices(adj)


def _stack(activations) -> tuple[np.ndarray, list[int]]:
    if isinstance(activations, np.ndarray) and activations.ndim == 2:
        activations = [activations]
    arrays = [np.asarray(a) for a in activations]
    if not arrays:
        raise ValueError("core.knn_graph: need at least one layer of activations")
    for l, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[1] < 1:
            raise ValueError(
                f"core.knn_graph: activations of layer {l} have shape {a.shape}; expected (n_samples, n_units)"
            )
        if a.shape[0] != arrays[0].shape[0]:
            raise ValueError(
                f"core.knn_graph: layers 0 and {l} have different numbers of samples: "
                f"{arrays[0].shape} and {a.shape}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"core.knn_graph: activations of layer {l} contain NaN or infinite values")
    if arrays[0].shape[0] < 3:
        raise ValueError(f"core.knn_graph: Spearman correlations need at least 3 samples, got {arrays[0].shape[0]}")
    return arrays, [a.shape[1] for a in arrays]


def standardized_ranks(activations, dtype=np.float64) -> np.ndarray:
    """``(n_samples, n)`` ranks of every unit (average ties), centred, unit norm, in ``dtype``;
    a constant unit is all zeros. ``Z.T @ Z`` is the Spearman correlation matrix. Ranked one
    layer at a time, so the transient float64 copy is one layer wide."""
    return _ranks(*_stack(activations), dtype)


def _ranks(arrays, sizes, dtype) -> np.ndarray:
    """:func:`standardized_ranks` of arrays that :func:`_stack` has checked."""
    out = np.empty((arrays[0].shape[0], sum(sizes)), dtype=dtype)
    start = 0
    for a in arrays:
        out[:, start : start + a.shape[1]] = _standardized_ranks(np.asarray(a, dtype=np.float64))
        start += a.shape[1]
    return out


def knn_activation_graph(
    activations,
    k: int = DEFAULT_K,
    *,
    symmetrize: str = "max",
    dtype=np.float64,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    half: bool = True,
    method: str = "auto",
    workers: int | None = None,
) -> sp.csr_array:
    """Sparse kNN activation graph: each unit keeps its ``k`` largest squared Spearman correlations.

    ``activations`` is one ``(n_samples, n_units_l)`` array per layer (or one 2-D array), as for
    :func:`modlens.core.graph.activation_graph`; the units of all layers are concatenated. The
    weights are the dense graph's (squared Spearman correlation of the units over the samples)
    and the edges are chosen per unit among all other units of all layers; see the module
    docstring for ``symmetrize``.

    Memory (``m`` samples, ``n`` units, ``b`` = itemsize of ``dtype``): the standardized ranks
    ``m n b`` plus one layer's float64 ranking transient, plus one chunk of at most
    ``chunk_bytes`` (default 256 MiB), plus the result, at most ``2 n k`` entries
    (12 bytes each, x ~3 while symmetrizing), plus one transposed chunk. Never ``O(n^2)``.
    Time: ``m n^2`` flops. The correlation matrix is symmetric, so each chunk of units is
    correlated only with itself and the units after it, and the block serves both ends of every
    edge (the chunk's rows, and transposed the later units' rows), each end keeping a running
    top-``k`` (:class:`TopK`). ``half=False`` computes each chunk's full ``chunk x n`` block
    instead (``2 m n^2`` flops; the plain path the tests compare against: the same graph up to
    rounding, and up to which of exactly tied edges is kept).
    ``dtype=np.float32`` halves the memory and time; the weights then carry float32 rounding
    (~1e-7), so edges with near-equal weights can swap in or out of a top-``k``.

    ``method``: ``"matmul"`` is the product path above; ``"tree"`` finds the same neighbours with a
    KD-tree (:func:`tree_neighbours`: about ``n log n`` work for a handful of samples, but exponential in
    their number); ``"auto"`` takes the tree for at most :data:`TREE_MAX_SAMPLES` samples. The tree path
    ranks in float64 whatever ``dtype`` says and computes every kept weight exactly; ``workers`` is its
    number of threads (default: ``OMP_NUM_THREADS`` when set, else every core).
    """
    _check_symmetrize(symmetrize)
    if method not in NEIGHBOUR_METHODS:
        raise ValueError(f"core.knn_graph: method must be one of {NEIGHBOUR_METHODS}, got {method!r}")
    arrays, sizes = _stack(activations)
    if method == "tree" or (method == "auto" and arrays[0].shape[0] <= TREE_MAX_SAMPLES):
        z = _ranks(arrays, sizes, np.float64)
        k = _check_k(k, z.shape[1])
        rows, cols, vals = tree_neighbours(z, k, chunk_bytes=chunk_bytes, workers=workers)
        return symmetrize_directed(rows, cols, vals, z.shape[1], symmetrize)
    z = _ranks(arrays, sizes, dtype)
    n = z.shape[1]
    k = _check_k(k, n)
    rows_per_chunk = _rows_for(n, z.dtype.itemsize, chunk_bytes)
    if half:
        top = TopK(n, k)
        for start in range(0, n, rows_per_chunk):
            stop = min(start + rows_per_chunk, n)
            block = z[:, start:stop].T @ z[:, start:]  # (chunk, n - start): this chunk and later units
            np.multiply(block, block, out=block)  # rounding above 1 is clipped once, on the kept edges
            local = np.arange(stop - start)
            block[local, local] = -1.0  # never pick oneself
            top.update(np.arange(start, stop), np.arange(start, n), block)
            if stop < n:  # the same correlations are the later units' candidates in this chunk
                top.update(np.arange(stop, n), np.arange(start, stop), block[:, stop - start:], transposed=True)
            del block
        np.minimum(top.vals, 1.0, out=top.vals)
        return top.to_graph(symmetrize)
    all_rows, all_cols, all_vals = [], [], []
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        block = z[:, start:stop].T @ z  # (chunk, n) Spearman correlations
        np.clip(block, -1.0, 1.0, out=block)
        np.multiply(block, block, out=block)
        local = np.arange(stop - start)
        block[local, start + local] = -1.0  # never pick oneself
        idx, vals = _top_k_rows(block, k)
        all_rows.append(np.repeat(np.arange(start, stop), idx.shape[1]))
        all_cols.append(idx.ravel())
        all_vals.append(vals.ravel().astype(np.float64))
        del block
    return symmetrize_directed(
        np.concatenate(all_rows), np.concatenate(all_cols), np.concatenate(all_vals), n, symmetrize
    )


def _default_workers() -> int:
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return int(threads) if threads.isdigit() and int(threads) > 0 else -1


def tree_neighbours(z: np.ndarray, k: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed kNN edges ``(rows, cols, vals)`` of the squared correlation ``(z_u . z_v)^2`` between the
    columns of ``z`` (standardized ranks: each column centred with unit norm, or all zeros), found with a
    KD-tree: each unit keeps its ``k`` largest among all other units, as the product path does.

    For unit vectors ``|z_u - z_v|^2 = 2 - 2 r`` and ``|z_u + z_v|^2 = 2 + 2 r``, so the nearer of ``z_v``
    and ``-z_v`` lies at ``2 - 2 |r|``: the units with the largest ``r^2`` are those whose nearer copy is
    nearest. The tree holds every unit and its negation and is asked for the ``2 k + 2`` points nearest each
    unit: at most ``2 i`` points (two copies of each of the ``i - 1`` nearer units and of the unit itself)
    precede the ``i``-th nearest other unit's nearer copy, so the ``k`` nearest other units are all among
    them (up to which of exactly tied points the tree returns). Each is then weighted by its exact ``r^2``
    (a dot product, not the distance), repeats and the unit itself are dropped, and the ``k`` largest kept.
    Constant units (zero columns) have no edges and are left out of the tree (a zero vector would sit at
    distance 1 from every unit).

    Memory: the tree (``2 n m`` floats), plus ``chunk_bytes`` of queried neighbours at a time. Time: about
    ``n log n`` for few samples; a KD-tree's query cost grows exponentially with the dimension ``m``, hence
    :data:`TREE_MAX_SAMPLES`.
    """
    live = np.flatnonzero(np.any(z != 0, axis=0))
    empty = np.empty(0, dtype=np.int64)
    if live.size < 2:
        return empty, empty, np.empty(0)
    pts = np.ascontiguousarray(z[:, live].T, dtype=np.float64)
    n_live, m = pts.shape
    want = min(2 * k + 2, 2 * n_live)
    keep = min(k, n_live - 1)
    tree = cKDTree(np.concatenate([pts, -pts]), balanced_tree=False)
    workers = _default_workers() if workers is None else int(workers)
    per = max(1, int(chunk_bytes) // (want * (8 * m + 40)))  # distances, indices, gathered vectors, weights, sort
    rows, cols, vals = [], [], []
    for start in range(0, n_live, per):
        stop = min(start + per, n_live)
        _, idx = tree.query(pts[start:stop], k=want, workers=workers)
        idx = np.asarray(idx, dtype=np.int64).reshape(stop - start, want) % n_live
        idx.sort(axis=1)  # repeats side by side
        r = np.einsum("ij,ikj->ik", pts[start:stop], pts[idx])
        w = np.minimum(r * r, 1.0)
        drop = idx == np.arange(start, stop)[:, None]
        drop[:, 1:] |= idx[:, 1:] == idx[:, :-1]
        w[drop] = -1.0
        top, top_w = _top_k_rows(w, keep)
        rows.append(np.repeat(live[start:stop], keep))
        cols.append(live[np.take_along_axis(idx, top, axis=1)].ravel())
        vals.append(top_w.ravel())
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def knn_sparsify(adjacency, k: int = DEFAULT_K, *, symmetrize: str = "max",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> sp.csr_array:
    """Keep the ``k`` heaviest edges of every node of a symmetric non-negative adjacency
    (dense array or scipy sparse), then symmetrize (module docstring). The diagonal is ignored.
    Dense input is processed in row chunks of at most ``chunk_bytes``; sparse input in one
    pass over its non-zeros (sorting them by row, then weight)."""
    _check_symmetrize(symmetrize)
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"core.knn_graph: adjacency must be square, got shape {adjacency.shape}")
    n = adjacency.shape[0]
    k = _check_k(k, n)
    if sp.issparse(adjacency):
        coo = sp.coo_array(adjacency)
        r, c, v = coo.row.astype(np.int64), coo.col.astype(np.int64), np.asarray(coo.data, dtype=np.float64)
        _check_weights(v)
        keep = (r != c) & (v != 0)
        r, c, v = r[keep], c[keep], v[keep]
        order = np.lexsort((-v, r))  # by row, heaviest first within a row
        r, c, v = r[order], c[order], v[order]
        starts = np.searchsorted(r, np.arange(n))
        rank = np.arange(r.size) - starts[r]
        top = rank < k
        return symmetrize_directed(r[top], c[top], v[top], n, symmetrize)
    dense = np.asarray(adjacency)
    rows_per_chunk = _rows_for(n, 8, chunk_bytes)
    all_rows, all_cols, all_vals = [], [], []
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        block = np.array(dense[start:stop], dtype=np.float64)
        _check_weights(block)
        local = np.arange(stop - start)
        block[local, start + local] = -1.0
        idx, vals = _top_k_rows(block, k)
        all_rows.append(np.repeat(np.arange(start, stop), idx.shape[1]))
        all_cols.append(idx.ravel())
        all_vals.append(vals.ravel())
    return symmetrize_directed(
        np.concatenate(all_rows), np.concatenate(all_cols), np.concatenate(all_vals), n, symmetrize
    )


def weight_graph_edges(blocks) -> int:
    """Edges of the weight graph of ``blocks`` (``(i, j, A)`` triples, as for
    :func:`modlens.core.graph.weight_graph`): the non-zero entries of the blocks, counted without
    building anything."""
    total = 0
    for block in blocks:
        a = block[2]
        total += int(a.count_nonzero() if sp.issparse(a) else np.count_nonzero(a))
    return total


def _row_chunks(a, chunk_bytes: int):
    """``(start, stop, dense rows)`` of a dense or sparse block, at most ``chunk_bytes`` of float64 each."""
    rows = _rows_for(a.shape[1], 8, chunk_bytes)
    for start in range(0, a.shape[0], rows):
        stop = min(start + rows, a.shape[0])
        yield start, stop, (a[start:stop].toarray() if sp.issparse(a) else a[start:stop])


def knn_weight_graph(layer_sizes, blocks, k: int = DEFAULT_K, *, symmetrize: str = "max",
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> sp.csr_array:
    """Sparse kNN weight graph: each node keeps its ``k`` heaviest edges of the weight graph of
    ``blocks`` (the graph of :func:`modlens.core.graph.weight_graph`, same arguments and checks), never
    holding more than ``O(n k)`` edges: each block is offered to a running top ``k`` (:class:`TopK`)
    from both ends, one chunk of rows at a time. With ``k`` at least every node's degree it is
    :func:`~modlens.core.graph.weight_graph` itself; otherwise it is ``knn_sparsify(weight_graph(...), k)``
    (up to which of exactly tied edges is kept). For weight graphs too large for memory (a deep residual
    CNN joins every writer of a stream to every later reader)."""
    _check_symmetrize(symmetrize)
    offsets = graph.layer_offsets(layer_sizes)
    n_layers, n = offsets.size - 1, int(offsets[-1])
    top = TopK(n, _check_k(k, n))
    seen: dict = {}
    for b, block in enumerate(blocks):
        i, j, a = graph._checked_block(b, block, offsets, n_layers, seen)
        for rows0, cols0, m in ((offsets[j], offsets[i], a), (offsets[i], offsets[j], a.T)):
            m = m.tocsr() if sp.issparse(m) else m
            cols = np.arange(cols0, cols0 + m.shape[1])
            for start, stop, chunk in _row_chunks(m, chunk_bytes):
                top.update(np.arange(rows0 + start, rows0 + stop), cols, chunk)
    return top.to_graph(symmetrize)


def _check_weights(v: np.ndarray) -> None:
    if not np.all(np.isfinite(v)):
        raise ValueError("core.knn_graph: adjacency contains NaN or infinite values")
    if v.size and v.min() < 0:
        raise ValueError(f"core.knn_graph: adjacency has negative entries (min {float(v.min()):.3g}); edges must be >= 0")


class TopK:
    """Running top-``k`` candidates per row, for edges that arrive in pieces.

    ``update(rows, cols, vals)`` offers, for the rows ``rows`` (int array, length ``r``), the
    candidates ``vals`` (``(r, c)``) at global node indices ``cols`` (length ``c``, shared by all
    rows); with ``transposed=True``, ``vals`` is ``(c, r)`` (candidate ``j`` of row ``rows[i]`` is
    ``vals[j, i]``), so that one block serves both of its ends without a transposed copy. Memory:
    ``n k`` values and indices and each row's current ``k``-th best, plus, for one piece of rows at
    a time, a mask of its candidates and merge buffers of about :data:`UPDATE_ENTRIES` entries. A row
    that is already full takes only the candidates above its current ``k``-th best; while few do,
    they are merged with one selection over ``k`` plus their number (:data:`SPARSE_MERGE_FACTOR`),
    which makes a stream of pieces cost about one comparison per candidate instead of one selection.
    """

    def __init__(self, n_rows: int, k: int):
        self.n, self.k = int(n_rows), int(k)
        self.vals = np.full((self.n, self.k), -np.inf)
        self.cols = np.full((self.n, self.k), -1, dtype=np.int64)
        self.floor = np.full(self.n, -np.inf)  # each row's k-th best (-inf until it holds k)

    def update(self, rows, cols, vals, *, transposed: bool = False) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.asarray(vals)
        expected = (cols.size, rows.size) if transposed else (rows.size, cols.size)
        if vals.shape != expected:
            raise ValueError(f"core.knn_graph.TopK: candidates of shape {vals.shape} for {rows.size} rows, "
                             f"{cols.size} cols{' (transposed)' if transposed else ''}")
        # rows in pieces of about UPDATE_ENTRIES candidates: a piece's survivor mask, the copies and selection
        # indices of its rows that merge every candidate, and its merge buffers (rows x (k + survivors)) are each
        # a few bytes per candidate, so a tall update (a chunk's correlations offered to every later unit) would
        # otherwise allocate them for all its rows at once
        step = max(1, UPDATE_ENTRIES // (cols.size + 2 * self.k))
        for start in range(0, rows.size, step):
            piece = vals[:, start:start + step] if transposed else vals[start:start + step]
            self._update(rows[start:start + step], cols, piece, transposed)

    def _threshold(self, rows, dtype) -> np.ndarray:
        """The rows' k-th bests in the candidates' dtype, rounded down where that dtype cannot hold
        them, so that every candidate above a k-th best passes ``>`` it."""
        floor = self.floor[rows]
        if dtype == floor.dtype or not np.issubdtype(dtype, np.floating):
            return floor
        cast = floor.astype(dtype)
        up = cast > floor
        cast[up] = np.nextafter(cast[up], dtype.type(-np.inf))
        return cast

    def _update(self, rows, cols, vals, transposed: bool) -> None:
        if cols.size > self.k and rows.size:
            # Only a candidate above its row's current k-th best can enter that row's top k. Once a
            # row is full, few do (streamed candidates), so such rows are merged from the survivors
            # alone; rows with many survivors (still filling) take the selection path below.
            threshold = self._threshold(rows, vals.dtype)
            survive = vals > (threshold[None, :] if transposed else threshold[:, None])
            count = np.count_nonzero(survive, axis=0 if transposed else 1)
            many = count > SPARSE_MERGE_FACTOR * self.k
            if many.any() and cols.size > 2 * SAMPLE_STRIDE * SPARSE_MERGE_FACTOR * self.k:
                self._raise_thresholds(vals, many, threshold, survive, count, transposed)
                many = count > SAMPLE_STRIDE * SPARSE_MERGE_FACTOR * self.k
            if not many.all():
                if transposed:
                    if many.any():
                        survive[:, many] = False
                    c, r = np.divmod(np.flatnonzero(survive), survive.shape[1])
                    order = np.argsort(r, kind="stable")  # each row's survivors together, rows ascending
                    r, c = r[order], c[order]
                    v = vals[c, r]
                else:
                    survive[many] = False
                    r, c = np.divmod(np.flatnonzero(survive), survive.shape[1])  # row-major: grouped by row
                    v = vals[r, c]
                count[many] = 0
                self._merge_survivors(rows, cols, r, c, v, count)
            if not many.any():
                return
            rows = rows[many]
            vals = vals[:, many].T if transposed else vals[many]
        elif transposed:
            vals = vals.T
        self._merge_all(rows, cols, vals)

    def _raise_thresholds(self, vals, many, threshold, survive, count, transposed: bool) -> None:
        """Rows ``many`` of a wide piece have many survivors (rows still filling): raise each one's
        threshold to the k-th best of every :data:`SAMPLE_STRIDE`-th of its candidates, and mark and count
        again (``survive``, ``count``, in place) the candidates at or above it. A subset's k-th best is at
        most the whole piece's, so the piece's top k all survive; about ``SAMPLE_STRIDE k`` do, and the
        survivor merge replaces a selection over every candidate of these rows."""
        idx = np.flatnonzero(many)
        every = idx.size == many.size
        axis = 0 if transposed else 1
        if transposed:
            sub = vals[::SAMPLE_STRIDE] if every else vals[::SAMPLE_STRIDE][:, idx]
        else:
            sub = vals[:, ::SAMPLE_STRIDE] if every else vals[idx, ::SAMPLE_STRIDE]
        w = sub.shape[axis]
        kth = np.partition(sub, w - self.k, axis=axis).take(w - self.k, axis=axis)
        np.maximum(kth, threshold[idx], out=kth)
        part = vals if every else (vals[:, idx] if transposed else vals[idx])
        above = part >= (kth[None, :] if transposed else kth[:, None])
        if every:
            survive[...] = above
        elif transposed:
            survive[:, idx] = above
        else:
            survive[idx] = above
        count[idx] = np.count_nonzero(above, axis=axis)

    def _store(self, rows, vals, cols) -> None:
        self.vals[rows] = vals
        self.cols[rows] = cols
        self.floor[rows] = vals.min(axis=1)

    def _merge_all(self, rows, cols, vals) -> None:
        if cols.size > self.k:
            # only a row's k best new candidates can enter its top k: select them first, in the
            # candidates' own dtype, so that the merge below is k + k wide instead of k + c
            idx, vals = _top_k_rows(vals, self.k)
            new_c = cols[idx]
        else:
            new_c = np.broadcast_to(cols, vals.shape)
        merged_v = np.concatenate([self.vals[rows], vals.astype(np.float64, copy=False)], axis=1)
        merged_c = np.concatenate([self.cols[rows], new_c], axis=1)
        idx, top = _top_k_rows(merged_v, self.k)
        self._store(rows, top, np.take_along_axis(merged_c, idx, axis=1))

    def _merge_survivors(self, rows, cols, r, c, v, count) -> None:
        """Merge the survivors ``v`` (row ``rows[r]``, candidate ``c``; each above its row's current k-th
        best; grouped by row, rows ascending; ``count`` of them per row) into the rows that have any:
        each such row's k kept entries and its survivors, padded to the widest row's count, go
        through one selection."""
        hit = np.flatnonzero(count)
        if not hit.size:
            return
        count = count[hit]
        local = np.repeat(np.arange(hit.size), count)
        pos = np.arange(r.size) - np.repeat(np.cumsum(count) - count, count)
        new_v = np.full((hit.size, int(count.max())), -np.inf)
        new_c = np.full(new_v.shape, -1, dtype=np.int64)
        new_v[local, pos] = v
        new_c[local, pos] = cols[c]
        g = rows[hit]
        idx, top = _top_k_rows(np.concatenate([self.vals[g], new_v], axis=1), self.k)
        self._store(g, top, np.take_along_axis(np.concatenate([self.cols[g], new_c], axis=1), idx, axis=1))

    def to_graph(self, symmetrize: str = "max") -> sp.csr_array:
        """The symmetrized kNN graph over the ``n_rows`` nodes (unfilled slots are dropped)."""
        filled = self.cols >= 0
        rows = np.broadcast_to(np.arange(self.n)[:, None], self.cols.shape)[filled]
        return symmetrize_directed(rows, self.cols[filled], self.vals[filled], self.n, symmetrize)


def build_activation_graph(activations, *, mode: str = "auto", k: int = DEFAULT_K,
                           dense_max_nodes: int = DENSE_MAX_NODES, **knn_kwargs):
    """The activation graph, dense (:func:`~modlens.core.graph.activation_graph`) or kNN
    (:func:`knn_activation_graph`) as :func:`choose_graph_mode` decides from the unit count."""
    arrays, sizes = _stack(activations)
    if choose_graph_mode(sum(sizes), mode, dense_max_nodes=dense_max_nodes) == "dense":
        return graph.activation_graph(arrays)
    return knn_activation_graph(arrays, k, **knn_kwargs)

