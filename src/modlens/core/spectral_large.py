"""Normalized spectral clustering of large sparse graphs (kNN graphs of big models).

The same algorithm as :func:`modlens.core.clustering.spectral_labels` (Shi & Malik; paper
appendix A.1, Algorithm 1, as scikit-learn implements it): the ``k`` eigenvectors ``x`` of the
smallest eigenvalues of the normalized Laplacian ``L = I - D^{-1/2} A D^{-1/2}``, mapped back to
``u = D^{-1/2} x`` (the generalized problem ``L_rw u = lambda u``), signs made deterministic
(largest-magnitude entry positive), then k-means with ``n_init`` restarts on the rows. Only the
eigensolver differs. ARPACK shift-invert (the paper's) factorizes ``L``, far too slow and large
at ~37k nodes. Two scalable solvers, each checked on its output (relative residual
``|L x - lambda x|``), are offered:

* ``"lanczos"`` (default for large sparse graphs): ARPACK's implicitly restarted Lanczos in
  *regular* mode (no factorization) for the ``k`` largest algebraic eigenvalues of the normalized
  adjacency ``D^{-1/2} A D^{-1/2} = I - L``, i.e. the smallest of ``L``; one sparse product per
  step, tolerance machine precision. If ARPACK does not converge, ``"amg"`` is used instead.
* ``"amg"``: LOBPCG preconditioned by a smoothed-aggregation algebraic multigrid cycle
  (``pyamg``) built on ``L + 1e-5 I`` (the shift makes the preconditioner non-singular),
  started from random vectors plus ``D^{1/2} 1`` (the exact null vector) and a few extra vectors.

Measured (``benchmarks/knn_vs_dense.py solvers``, docs/transformers.md): on kNN activation graphs
(16,384 nodes) and a random ViT-shaped residual weight graph (10,984 nodes), Lanczos took 0.5 s
and 2.8 s, plain LOBPCG 5 s and 18 s, AMG-preconditioned LOBPCG 30 s and 58 s, all reaching the
same eigenvalues: these graphs are expander-like, so the preconditioner buys few iterations
(118 vs 138) at a high price per iteration, while Lanczos needs no solve at all.

A graph with ``c > 1`` connected components has eigenvalue 0 ``c`` times, with the components' vectors
``D^{1/2} 1_c`` (normalized) as eigenvectors; Lanczos finds a repeated eigenvalue only through rounding
(thousands of products), so they are set exactly: with ``c < k`` the other ``k - c`` come from Lanczos
with them moved to eigenvalue -2; with ``c >= k`` the embedding is a seeded random orthonormal
combination of them (the eigenspace has no preferred basis; clusters are unions of components, and
the warning says so). docs/transformers.md, "Graphs in several pieces".

Entry point: ``spectral_labels(..., eigen_solver="lanczos" | "amg")`` in
:mod:`modlens.core.clustering`, which also routes sparse graphs of more than
:data:`LARGE_SPARSE_NODES` connected nodes here (Lanczos) when the solver is left at its LOBPCG
default. :func:`large_embedding` and :func:`cluster_active` take a graph that has already been
validated, has no self-loops and no zero-degree node.

Memory: the graph (~12 bytes per stored entry), which Lanczos reads through an operator
``D^{-1/2} A D^{-1/2}`` without a copy, and ARPACK's ``n x 2k+1`` Lanczos basis; the AMG path
also builds ``L`` (one more copy of the graph), LOBPCG's ~6 blocks of ``n x (k + 4)`` and the AMG
hierarchy (about the size of ``L``), all float64.

This module is layer 0: numpy, scipy, scikit-learn and pyamg only.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.csgraph import laplacian as csgraph_laplacian
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, lobpcg

#: Sparse graphs with more than this many connected nodes are clustered here (Lanczos) under the
#: default LOBPCG setting of :func:`modlens.core.clustering.spectral_labels`; the same size as
#: ``knn_graph.DENSE_MAX_NODES``, so every graph at or below it is clustered as before.
LARGE_SPARSE_NODES = 8192
LARGE_SOLVERS = ("lanczos", "amg")
#: Residual (relative to the eigenvector norm) the AMG-LOBPCG eigenvectors must reach.
DEFAULT_TOL = 1e-6
DEFAULT_MAXITER = 300
_SHIFT = 1e-5


def _amg_preconditioner(lap: sp.csr_array):
    try:
        import pyamg
    except ImportError as exc:  # pragma: no cover - pyamg is a declared dependency
        raise ImportError(
            "core.spectral_large: the AMG eigensolver needs pyamg (pip install pyamg); "
            "or pass eigen_solver='arpack' / 'lobpcg' for small graphs"
        ) from exc
    shifted = sp.csr_array(lap + _SHIFT * sp.csr_array(sp.identity(lap.shape[0], format="csr")))
    shifted.indices = shifted.indices.astype(np.int32)
    shifted.indptr = shifted.indptr.astype(np.int32)
    return pyamg.smoothed_aggregation_solver(shifted).aspreconditioner()


def _sign_flip(vectors: np.ndarray) -> np.ndarray:
    """Make each column's largest-magnitude entry positive (scikit-learn's convention)."""
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def _residual(norm_adj, vectors, values) -> float:
    """Largest relative residual ``|L x - lambda x| / |x|``, with ``L x = x - norm_adj x``."""
    res = np.linalg.norm(vectors - norm_adj @ vectors - vectors * values, axis=0) / np.linalg.norm(vectors, axis=0)
    return float(res.max())


def _normalized_adjacency(adj, sqrt_deg, active=None) -> LinearOperator:
    """``x -> D^{-1/2} A D^{-1/2} x`` as an operator on the graph itself: no copy of the graph (a
    large CNN's weight graph has 10^8 entries; ``I - L`` as a matrix was one more copy). With ``active``
    (node indices; the others have no edge) the operator is the one of the subgraph of the active nodes,
    applied through the whole graph: same sums in the same order as on a copy of the subgraph."""
    inv = 1.0 / sqrt_deg

    def product(x):
        x = np.asarray(x, dtype=np.float64)
        scale = inv if x.ndim == 1 else inv[:, None]
        if active is None:
            return scale * (adj @ (scale * x))
        full = np.zeros((adj.shape[0],) + x.shape[1:])
        full[active] = scale * x
        return scale * (adj @ full)[active]

    n = adj.shape[0] if active is None else active.size
    return LinearOperator((n, n), matvec=product, matmat=product, dtype=np.float64)


def _lanczos_eigs(norm_adj, n_components, rng):
    """Smallest eigenpairs of ``L`` as the largest algebraic ones of ``I - L`` (``norm_adj``)."""
    v0 = rng.uniform(-1.0, 1.0, norm_adj.shape[0])  # a random start (as scikit-learn's ARPACK path): seeded
    values, vectors = eigsh(norm_adj, k=n_components, which="LA", tol=0, v0=v0)
    return 1.0 - values, vectors


def _component_basis(comp, n_comp: int, sqrt_deg) -> np.ndarray:
    """``(n, n_comp)`` orthonormal eigenvectors of ``L`` for eigenvalue 0: ``D^{1/2} 1_c``, normalized, for
    each component ``c`` (``comp``: each node's component)."""
    basis = np.zeros((sqrt_deg.size, n_comp))
    basis[np.arange(sqrt_deg.size), comp] = sqrt_deg
    return basis / np.linalg.norm(basis, axis=0)


def _null_combination(comp, n_comp: int, sqrt_deg, n_components: int, rng) -> np.ndarray:
    """``n_components`` orthonormal eigenvectors of eigenvalue 0 of a graph with at least that many components:
    a seeded random orthonormal combination of the components' vectors ``D^{1/2} 1_c / |D^{1/2} 1_c|`` (the
    eigenspace has ``n_comp`` dimensions and no preferred basis; Lanczos from a random start finds such a
    combination too, but only through rounding, after thousands of products)."""
    norms = np.sqrt(np.bincount(comp, weights=sqrt_deg ** 2, minlength=n_comp))
    mix, _ = np.linalg.qr(rng.standard_normal((n_comp, n_components)))
    return (sqrt_deg / norms[comp])[:, None] * mix[comp]


def _deflated_lanczos_eigs(norm_adj, comp, n_comp: int, sqrt_deg, n_components: int, rng):
    """The smallest eigenpairs of ``L`` of a graph with ``1 < n_comp < n_components`` components: eigenvalue 0
    ``n_comp`` times with the components' vectors (exact), and the rest by Lanczos on the operator with those
    vectors moved to eigenvalue ``-2``, below every other (a repeated eigenvalue stalls Lanczos, which finds
    its copies only through rounding)."""
    basis = _component_basis(comp, n_comp, sqrt_deg)

    def product(x):
        x = np.asarray(x, dtype=np.float64)
        return norm_adj @ x - 3.0 * (basis @ (basis.T @ x))

    op = LinearOperator(norm_adj.shape, matvec=product, matmat=product, dtype=np.float64)
    values, vectors = _lanczos_eigs(op, n_components - n_comp, rng)
    return np.concatenate([np.zeros(n_comp), values]), np.hstack([basis, vectors])


def _amg_eigs(lap, sqrt_deg, n_components, rng, tol, maxiter, extra):
    n = lap.shape[0]
    n_vec = min(n_components + max(int(extra), 0), n)
    x0 = rng.standard_normal((n, n_vec))
    x0[:, 0] = sqrt_deg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # convergence is checked by the caller
        return lobpcg(lap, x0, M=_amg_preconditioner(lap), tol=tol, maxiter=maxiter, largest=False)


def large_embedding(adjacency, n_components: int, *, solver: str = "lanczos", random_state: int = 0,
                    tol: float = DEFAULT_TOL, maxiter: int = DEFAULT_MAXITER,
                    extra: int = 4, active=None) -> tuple[np.ndarray, np.ndarray]:
    """Spectral embedding ``(n, n_components)`` and its Laplacian eigenvalues (ascending) of a
    sparse, symmetric, loop-free graph whose nodes all have positive degree (module docstring), or, given
    ``active`` (sorted node indices; every other node without an edge), of its subgraph of those nodes,
    without a copy of the graph. ``tol``, ``maxiter`` and ``extra`` (additional block vectors) apply to
    ``solver="amg"``."""
    if solver not in LARGE_SOLVERS:
        raise ValueError(f"core.spectral_large: solver must be one of {LARGE_SOLVERS}, got {solver!r}")
    adj = sp.csr_array(adjacency, dtype=np.float64)
    if active is not None:
        active = np.asarray(active, dtype=np.int64)
    n = adj.shape[0] if active is None else active.size
    # strong components of the symmetric graph are its components; the undirected call copies the graph; the
    # nodes outside ``active`` are components of one node each
    n_comp, comp = connected_components(adj, directed=True, connection="strong", return_labels=True)
    if active is not None:
        n_comp, comp = np.unique(comp[active], return_inverse=True)
        n_comp = n_comp.size
    if n_comp > 1:
        warnings.warn(
            f"core.spectral_large: the graph is not fully connected ({n_comp} components); "
            "the spectral embedding separates components first"
            + (f"; with at least n_clusters={n_components} components every cluster is a union of components, "
               "and which components go together is not set by the graph (a seeded random choice): more "
               "activation samples or more neighbours per node join them" if n_comp >= n_components else ""),
            UserWarning,
            stacklevel=2,
        )
    sqrt_deg = np.sqrt(np.asarray(adj.sum(axis=1), dtype=np.float64).ravel())
    if active is not None:
        sqrt_deg = sqrt_deg[active]
    norm_adj = _normalized_adjacency(adj, sqrt_deg, active)
    rng = np.random.default_rng(random_state)
    if n <= 5 * (n_components + max(int(extra), 0)) + 1:  # tiny: solve densely
        values, vectors = np.linalg.eigh(np.eye(n) - norm_adj @ np.eye(n))
    elif n_comp >= n_components:
        values, vectors = np.zeros(n_components), _null_combination(comp, n_comp, sqrt_deg, n_components, rng)
    else:
        values = vectors = None
        if solver == "lanczos":
            try:
                if n_comp > 1:
                    values, vectors = _deflated_lanczos_eigs(norm_adj, comp, n_comp, sqrt_deg, n_components, rng)
                else:
                    values, vectors = _lanczos_eigs(norm_adj, n_components, rng)
            except ArpackNoConvergence:
                warnings.warn(
                    f"core.spectral_large: ARPACK Lanczos did not converge on a {n}-node graph; "
                    "using AMG-preconditioned LOBPCG",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if values is None:   # the Laplacian as a matrix: the AMG hierarchy is built on it
            sub = adj if active is None else adj[active][:, active]
            lap = sp.csr_array(csgraph_laplacian(sub, normed=True))
            del sub
            values, vectors = _amg_eigs(lap, sqrt_deg, n_components, rng, tol, maxiter, extra)
            del lap
    order = np.argsort(values)[:n_components]
    values, vectors = values[order], vectors[:, order]
    worst = _residual(norm_adj, vectors, values)
    if worst > max(100 * tol, 1e-4):
        warnings.warn(
            f"core.spectral_large: the {solver} eigensolver did not converge on a {n}-node graph "
            f"(largest eigenvector residual {worst:.2e}); raise maxiter or use another solver",
            RuntimeWarning,
            stacklevel=2,
        )
    embedding = vectors / sqrt_deg[:, None]
    return _sign_flip(embedding), values


def cluster_active(adjacency, n_clusters: int, seed: int, n_init: int, *, solver: str = "lanczos",
                   **kwargs) -> np.ndarray:
    """k-means labels (``0 .. n_clusters-1``, unordered) of the spectral embedding of a
    validated, loop-free graph without zero-degree nodes (or of its subgraph of the nodes ``active=``, one
    label each, when the others have no edge); same ``seed`` -> same labels."""
    from sklearn.cluster import KMeans

    embedding, _ = large_embedding(adjacency, n_clusters, solver=solver, random_state=seed, **kwargs)
    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    return model.fit(embedding).labels_
