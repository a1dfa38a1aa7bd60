"""Normalized spectral clustering of neuron graphs, globally and locally (paper section 3.1).

The clustering is scikit-learn's normalized spectral clustering (Shi & Malik, 2000; paper
appendix A.1, Algorithm 1) with a precomputed affinity and k-means label assignment.
Zero-degree nodes are removed first and labelled ``-1`` (unclustered), as in the original
code (notes, "Other facts worth knowing").

* **Global** clustering (:func:`cluster_global`) clusters the graph of the whole network.
* **Local** clustering (:func:`cluster_local`) clusters, for each layer ``l``, the graph of
  ``l`` and its adjacent layers, and keeps the labels of ``l`` (section 3.1; row 5 of the
  notes: the paper's definition, not the original code's variants).

This module is layer 0: numpy, scipy and scikit-learn only.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from modlens.core import spectral_large
from modlens.core.graph import UNCLUSTERED, layer_offsets
from modlens.core.seeds import as_generator, int_seed

EIGEN_SOLVERS = ("auto", "arpack", "lobpcg", "lanczos", "amg")

#: Largest graph (nodes, after zero-degree nodes are removed) that ``eigen_solver="auto"``
#: gives to ARPACK, the paper's solver (appendix A.1). Measured with
#: ``benchmarks/eigensolver.py`` (see ``docs/fidelity.md``): ARPACK's shift-invert mode
#: factorizes the Laplacian, which stays cheap up to a few thousand nodes but grows
#: super-linearly on sparse graphs, while LOBPCG's cost grows about linearly with the edges.
ARPACK_MAX_NODES = 5000

#: A sparse graph that stores at least this share of all ``n^2`` entries (a dense weight graph held
#: as CSR, as a transformer's residual-stream graph is below its kNN size) is solved as a dense
#: array: a dense product costs less than the sparse one with its indices, and the dense array is no
#: larger than the CSR one (8 bytes per entry against 12). ``benchmarks/dense_spectral.py``
#: measures it; the labels are those of the sparse path (tests/test_clustering_dense.py).
DENSE_SHARE = 2 / 3
#: ... on graphs of at most this many connected nodes (the dense array of 16,384 nodes is 2 GiB).
DENSE_MAX_NODES = 16384

#: k-means initializations of ``n_init="auto"`` (the original code's rule): 25, or 100 on
#: graphs with more than :data:`N_INIT_LARGE_ABOVE` nodes.
N_INIT_SMALL, N_INIT_LARGE, N_INIT_LARGE_ABOVE = 25, 100, 2000


def _have_pyamg() -> bool:
    try:
        import pyamg  # noqa: F401
    except ImportError:
        return False
    return True


def choose_eigen_solver(n_nodes: int, sparse: bool = True) -> str:
    """The eigensolver ``eigen_solver="auto"`` uses for a graph of ``n_nodes`` nodes.

    ARPACK (the paper's) up to :data:`ARPACK_MAX_NODES` nodes; above, LOBPCG; a sparse
    adjacency (a kNN graph of a large model) of more than
    ``spectral_large.LARGE_SPARSE_NODES`` nodes goes to ARPACK's Lanczos on the normalized
    adjacency, which measured 2-4x faster than LOBPCG there (``docs/transformers.md``).
    """
    n_nodes = int(n_nodes)
    if n_nodes < 0:
        raise ValueError(f"n_nodes must be >= 0, got {n_nodes}")
    if sparse and n_nodes > spectral_large.LARGE_SPARSE_NODES:
        return "lanczos"
    return "arpack" if n_nodes <= ARPACK_MAX_NODES else "lobpcg"


def check_eigen_solver(eigen_solver: str) -> str:
    """Validate an ``eigen_solver`` name (``"amg"`` needs the optional ``pyamg`` package)."""
    if eigen_solver not in EIGEN_SOLVERS:
        raise ValueError(f"eigen_solver must be one of {', '.join(EIGEN_SOLVERS)}; got {eigen_solver!r}")
    if eigen_solver == "amg" and not _have_pyamg():
        raise ImportError("eigen_solver='amg' needs pyamg: pip install 'modlens[amg]' (or pyamg)")
    return eigen_solver


def check_n_init(n_init) -> int | str:
    """Validate ``n_init``: ``"auto"`` or a positive int."""
    if isinstance(n_init, str) and n_init == "auto":
        return n_init
    if isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise ValueError(f"n_init must be 'auto' or a positive int (k-means initializations), got {n_init!r}")
    return int(n_init)


def resolve_n_init(n_init, n_nodes: int) -> int:
    """``"auto"``: 25 k-means initializations, or 100 above 2,000 nodes (the original code)."""
    n_init = check_n_init(n_init)
    if n_init == "auto":
        return N_INIT_LARGE if int(n_nodes) > N_INIT_LARGE_ABOVE else N_INIT_SMALL
    return n_init


# Messages scipy's LOBPCG emits when it does not converge or breaks down.
_LOBPCG_TROUBLE = (
    "not reaching the requested tolerance",
    "Cholesky has failed",
    "eigh failed",
    "Failed at iteration",
)
# Harmless: scipy's LOBPCG solves a small problem densely instead (scikit-learn's own size
# check lets through graphs of 5k+1 .. 5k+4 nodes that scipy then treats as small).
_HARMLESS = ("is too small relative to the block size",)


def relabel(labels) -> np.ndarray:
    """Renumber labels ``0, 1, ...`` in order of first appearance; ``-1`` stays ``-1``."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, UNCLUSTERED, dtype=np.int64)
    mask = labels != UNCLUSTERED
    values, first = np.unique(labels[mask], return_index=True)
    order = np.argsort(first, kind="stable")  # values sorted by first appearance
    new_id = np.empty(values.size, dtype=np.int64)
    new_id[order] = np.arange(values.size)
    out[mask] = new_id[np.searchsorted(values, labels[mask])]
    return out


#: above this many stored entries, symmetry is checked with products instead of forming A - A.T (a
#: copy of the whole graph: a large conv net's weight graph has 10^8 entries)
PROBED_SYMMETRY_NNZ = 20_000_000


def _check_symmetric_by_probes(adj) -> None:
    """``A x == A.T x`` for two random positive ``x`` (``A.T`` of a CSR array is a view, its product
    reads ``A`` in place): an asymmetric ``A`` fails it almost surely; a symmetric one passes up to
    rounding."""
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.uniform(0.5, 1.5, adj.shape[0])
        ax, atx = adj @ x, adj.T @ x
        diff = float(np.abs(ax - atx).max()) if ax.size else 0.0
        if diff > 1e-8 * max(float(np.abs(ax).max()) if ax.size else 0.0, 1e-300):
            raise ValueError(f"adjacency is not symmetric (|A x - A.T x| up to {diff:.3g} for a random x)")


def _as_adjacency(adjacency):
    """Validate a square, symmetric, finite, non-negative adjacency; return (adj, degrees)."""
    if sp.issparse(adjacency):
        adj = sp.csr_array(adjacency, dtype=np.float64)
        values = adj.data
    else:
        adj = np.asarray(adjacency, dtype=np.float64)
        values = adj
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be a square matrix, got shape {adj.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("adjacency contains NaN or infinite values")
    if values.size and values.min() < 0:
        raise ValueError(f"adjacency has negative entries (min {float(values.min()):.3g}); edges must be >= 0")
    if sp.issparse(adj) and adj.nnz > PROBED_SYMMETRY_NNZ:
        _check_symmetric_by_probes(adj)
    else:
        asym = abs(adj - adj.T)
        asym = asym.max() if asym.size else 0.0
        scale = values.max() if values.size else 0.0
        if asym > 1e-8 * max(scale, 1e-300):
            raise ValueError(f"adjacency is not symmetric (largest |A - A.T| = {float(asym):.3g})")
    degrees = np.asarray(adj.sum(axis=1)).ravel() - adj.diagonal()
    return adj, degrees


def _fit(adj, n_clusters: int, solver: str, seed: int, n_init: int):
    from sklearn.cluster import SpectralClustering

    model = SpectralClustering(
        n_clusters=n_clusters,
        affinity="precomputed",
        eigen_solver=solver,
        assign_labels="kmeans",
        n_init=n_init,
        random_state=seed,
    )
    return model.fit(adj).labels_


def spectral_labels(
    adjacency, n_clusters: int, *, random_state=0, n_init: int | str = "auto", eigen_solver: str = "auto"
) -> np.ndarray:
    """Normalized spectral clustering of one graph (paper appendix A.1, Algorithm 1).

    Uses ``sklearn.cluster.SpectralClustering(affinity="precomputed", assign_labels="kmeans",
    n_init=n_init)``. Zero-degree nodes (self-loops do not count) are left out and get label
    ``-1``; the other nodes get ``0 .. k-1`` numbered in order of first appearance.

    ``eigen_solver="auto"`` (default) is ARPACK, the paper's solver (appendix A.1), on graphs
    of up to :data:`ARPACK_MAX_NODES` connected nodes, LOBPCG above, and on sparse (kNN) graphs
    of more than ``spectral_large.LARGE_SPARSE_NODES`` connected nodes ARPACK's Lanczos without
    shift-invert on the normalized adjacency (:func:`choose_eigen_solver`). ``"arpack"``,
    ``"lobpcg"``, ``"lanczos"`` and ``"amg"`` (AMG-preconditioned LOBPCG, needs pyamg; both
    :mod:`modlens.core.spectral_large`) force one. If LOBPCG fails to converge or raises, ARPACK
    is used instead. ``n_init="auto"``: 25 k-means initializations, 100 above 2,000 nodes (the
    original code's rule). Other warnings (e.g. a disconnected graph) pass through. Same
    ``random_state`` -> same labels.
    """
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise TypeError(f"n_clusters must be an int, got {n_clusters!r}")
    n_clusters = int(n_clusters)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    check_eigen_solver(eigen_solver)
    check_n_init(n_init)
    seed = int_seed(as_generator(random_state))
    adj, degrees = _as_adjacency(adjacency)
    n = adj.shape[0]
    active = np.flatnonzero(degrees > 0)
    if active.size == 0:
        raise ValueError(f"the graph has no edges (all {n} nodes have zero degree); there is nothing to cluster")
    if n_clusters > active.size:
        raise ValueError(
            f"n_clusters={n_clusters} but only {active.size} of the {n} nodes have edges "
            f"({n - active.size} have zero degree and are not clustered); ask for at most {active.size} clusters"
        )
    labels = np.full(n, UNCLUSTERED, dtype=np.int64)
    if eigen_solver == "auto":
        eigen_solver = choose_eigen_solver(active.size, sp.issparse(adj))
    if eigen_solver == "arpack" and n_clusters >= active.size:
        # ARPACK needs fewer eigenvectors than nodes; scikit-learn's LOBPCG path solves such a
        # tiny graph with a dense eigendecomposition instead
        eigen_solver = "lobpcg"
    n_init = resolve_n_init(n_init, n)
    if n_clusters == 1:
        labels[active] = 0
        return labels
    owned = False
    if sp.issparse(adj) and eigen_solver in ("arpack", "lobpcg") and _dense_enough(adj, active.size):
        adj, owned = adj.toarray(), True   # the same graph, cheaper to solve (DENSE_SHARE)
    restrict = None   # the large solvers take the whole graph and the active nodes: no copy of the graph
    if sp.issparse(adj) and eigen_solver in spectral_large.LARGE_SOLVERS and active.size < n:
        sub, restrict = _loop_free(adj, shared=True), active
    elif sp.issparse(adj):
        sub = _loop_free(adj if active.size == n else adj[active][:, active], shared=active.size == n)
    else:
        sub = (adj if owned else adj.copy()) if active.size == n else adj[np.ix_(active, active)]
        np.fill_diagonal(sub, 0.0)   # self-loops do not change the cut; keep the graph loop-free

    found = None
    if eigen_solver in spectral_large.LARGE_SOLVERS:
        found = spectral_large.cluster_active(sp.csr_array(sub), n_clusters, seed, n_init, solver=eigen_solver,
                                              active=restrict)
    elif eigen_solver == "lobpcg":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                found = _fit(sub, n_clusters, "lobpcg", seed, n_init)
            except (ValueError, ArithmeticError, np.linalg.LinAlgError):
                found = None
        trouble = any(any(m in str(w.message) for m in _LOBPCG_TROUBLE) for w in caught)
        if trouble:
            found = None
        for w in caught:
            if any(m in str(w.message) for m in _HARMLESS):
                continue
            if found is None and any(m in str(w.message) for m in _LOBPCG_TROUBLE):
                continue
            if found is None and issubclass(w.category, UserWarning) and "not fully connected" in str(w.message):
                continue  # ARPACK will say it again
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if found is None:
        found = _fit(sub, n_clusters, "arpack", seed, n_init)
    labels[active] = relabel(found)
    return labels


def _loop_free(sub, *, shared: bool) -> sp.csr_array:
    """``sub`` without self-loops or stored zeros, with 32-bit indices (scikit-learn's ARPACK path wants
    them). A ``shared`` graph (the caller's) is copied only when it has self-loops or stored zeros:
    a large CNN's weight graph has 10^8 entries, and a copy of it is what ran out of memory."""
    sub = sp.csr_array(sub)
    if np.any(sub.diagonal()) or np.count_nonzero(sub.data) != sub.data.size:
        sub = sub.copy() if shared else sub
        sub.setdiag(0)
        sub.eliminate_zeros()
    if sub.nnz < np.iinfo(np.int32).max:
        sub = sp.csr_array((sub.data, sub.indices.astype(np.int32, copy=False), sub.indptr.astype(np.int32, copy=False)),
                           shape=sub.shape)
    return sub


def _dense_enough(adj, n_active: int) -> bool:
    """Whether a sparse graph is dense enough to be solved as a dense array (:data:`DENSE_SHARE`)."""
    return n_active <= DENSE_MAX_NODES and adj.nnz >= DENSE_SHARE * float(adj.shape[0]) ** 2


def _split(labels: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [labels[offsets[l] : offsets[l + 1]].copy() for l in range(offsets.size - 1)]


def cluster_global(
    adjacency, layer_sizes: Sequence[int], n_clusters: int, *, random_state=0, **kwargs
) -> list[np.ndarray]:
    """Global clustering (paper section 3.1): cluster the whole network's graph at once.

    Returns the labels split per node layer, one int64 array per entry of ``layer_sizes``;
    a cluster can span layers. Extra keyword arguments go to :func:`spectral_labels`.
    """
    offsets = layer_offsets(layer_sizes)
    n = adjacency.shape[0]
    if n != offsets[-1]:
        raise ValueError(f"adjacency has {n} nodes but layer_sizes {list(layer_sizes)} sum to {int(offsets[-1])}")
    labels = spectral_labels(adjacency, n_clusters, random_state=random_state, **kwargs)
    return _split(labels, offsets)


def cluster_local(
    adjacency,
    layer_sizes: Sequence[int],
    target_layers: Sequence[int],
    clusters_per_layer: Sequence[int],
    *,
    random_state=0,
    **kwargs,
) -> list[np.ndarray]:
    """Local clustering (paper section 3.1; row 5 of the notes).

    For each node layer ``l`` in ``target_layers``, cluster the subgraph induced by layers
    ``l - 1``, ``l`` and ``l + 1`` (those that exist) into ``clusters_per_layer[idx]`` clusters
    and keep layer ``l``'s labels, renumbered ``0, 1, ...`` in order of first appearance
    (nodes of ``l`` with no edge in the subgraph get ``-1``). The paper sets that number to
    the number of clusters layer ``l`` got in global clustering. A ``k < 2`` puts all of the
    layer's connected nodes in cluster 0; a ``k`` above the number of connected nodes of the
    subgraph is lowered to it. Each layer gets its own child seed, drawn from
    ``random_state`` in the order of ``target_layers``.
    """
    offsets = layer_offsets(layer_sizes)
    n_layers = offsets.size - 1
    if adjacency.shape[0] != offsets[-1] or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(
            f"adjacency has shape {adjacency.shape} but layer_sizes {list(layer_sizes)} sum to {int(offsets[-1])}"
        )
    target_layers = [int(l) for l in target_layers]
    clusters_per_layer = [int(k) for k in clusters_per_layer]
    if len(target_layers) != len(clusters_per_layer):
        raise ValueError(
            f"need one cluster count per target layer: {len(target_layers)} layers, "
            f"{len(clusters_per_layer)} counts"
        )
    for l in target_layers:
        if not 0 <= l < n_layers:
            raise ValueError(f"target layer {l} out of range for {n_layers} node layers")
    rng = as_generator(random_state)
    seeds = [int_seed(rng) for _ in target_layers]
    adj = sp.csr_array(adjacency) if sp.issparse(adjacency) else np.asarray(adjacency, dtype=np.float64)

    out = []
    for l, k, seed in zip(target_layers, clusters_per_layer, seeds):
        lo, hi = max(l - 1, 0), min(l + 1, n_layers - 1)
        nodes = np.arange(offsets[lo], offsets[hi + 1])
        sub = adj[nodes][:, nodes]
        start, stop = offsets[l] - offsets[lo], offsets[l + 1] - offsets[lo]
        _, degrees = _as_adjacency(sub)
        n_active = int(np.count_nonzero(degrees > 0))
        layer = np.full(int(stop - start), UNCLUSTERED, dtype=np.int64)
        if n_active == 0:
            out.append(layer)
            continue
        if k < 2:
            layer[degrees[start:stop] > 0] = 0
            out.append(layer)
            continue
        labels = spectral_labels(sub, min(k, n_active), random_state=seed, **kwargs)
        out.append(relabel(labels[start:stop]))
    return out
