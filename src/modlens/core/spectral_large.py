"""Normalized spectral clustering of large sparse graphs: AMG-preconditioned LOBPCG, then k-means.

The same algorithm as :func:`modlens.core.clustering.spectral_labels` (Shi & Malik; paper
appendix A.1, Algorithm 1, as scikit-learn implements it): the ``k`` eigenvectors ``x`` of the
smallest eigenvalues of the normalized Laplacian ``L = I - D^{-1/2} A D^{-1/2}``, mapped back to
``u = D^{-1/2} x`` (the generalized problem ``L_rw u = lambda u``), signs made deterministic,
then k-means with ``n_init`` restarts on the rows. Only the eigensolver differs:

* ARPACK shift-invert factorizes ``L`` (fill-in makes that far too slow and large at ~37k nodes
  of a kNN graph), and plain LOBPCG converges slowly on graph Laplacians;
* here LOBPCG is preconditioned by a smoothed-aggregation algebraic multigrid (``pyamg``) cycle
  built on ``L + 1e-5 I`` (the shift makes the preconditioner non-singular; the eigenproblem
  is the unshifted ``L``), started from random vectors plus ``D^{1/2} 1`` (the exact null
  vector), with a few more vectors than wanted to speed convergence.

Convergence is checked on the returned vectors (relative residual ``|L x - lambda x|``); if it is
not reached within ``maxiter`` iterations a ``RuntimeWarning`` names the residual.

Entry point: ``spectral_labels(..., eigen_solver="amg")`` in :mod:`modlens.core.clustering`,
which also routes sparse graphs of at least :data:`AMG_MIN_NODES` active nodes here when the
solver is left at its LOBPCG default. :func:`amg_embedding` and :func:`amg_cluster_active` work
on a graph that has already been validated, has no self-loops and no zero-degree node.

Memory: the graph and ``L`` (~2 nnz x 12 bytes each), the AMG hierarchy (about the size of
``L`` again), and LOBPCG's ~6 blocks of ``n x (k + extra)`` float64 vectors.

This module is layer 0: numpy, scipy, scikit-learn and pyamg only.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.csgraph import laplacian as csgraph_laplacian
from scipy.sparse.linalg import lobpcg

#: Sparse graphs with at least this many active nodes go to the AMG solver under the default
#: LOBPCG setting of :func:`modlens.core.clustering.spectral_labels` (measured, see
#: docs/transformers.md: plain LOBPCG needs many more iterations from a few thousand nodes on).
AMG_MIN_NODES = 4096
#: Relative residual the eigenvectors must reach.
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


def amg_embedding(adjacency, n_components: int, *, random_state: int = 0, tol: float = DEFAULT_TOL,
                  maxiter: int = DEFAULT_MAXITER, extra: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Spectral embedding ``(n, n_components)`` and its eigenvalues of a sparse, symmetric,
    loop-free graph whose nodes all have positive degree (see the module docstring)."""
    adj = sp.csr_array(adjacency, dtype=np.float64)
    n = adj.shape[0]
    n_comp = connected_components(adj, directed=False, return_labels=False)
    if n_comp > 1:
        warnings.warn(
            f"core.spectral_large: the graph is not fully connected ({n_comp} components); "
            "the spectral embedding separates components first",
            UserWarning,
            stacklevel=2,
        )
    lap, sqrt_deg = csgraph_laplacian(adj, normed=True, return_diag=True)
    lap = sp.csr_array(lap)
    n_vec = min(n_components + max(int(extra), 0), n)
    if n < 5 * n_vec + 1:  # too small for a block method: solve densely
        values, vectors = np.linalg.eigh(lap.toarray())
        values, vectors = values[:n_components], vectors[:, :n_components]
    else:
        rng = np.random.default_rng(random_state)
        x0 = rng.standard_normal((n, n_vec))
        x0[:, 0] = sqrt_deg
        precond = _amg_preconditioner(lap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # we check convergence ourselves
            values, vectors = lobpcg(lap, x0, M=precond, tol=tol, maxiter=maxiter, largest=False)
        order = np.argsort(values)[:n_components]
        values, vectors = values[order], vectors[:, order]
        resid = np.linalg.norm(lap @ vectors - vectors * values, axis=0) / np.linalg.norm(vectors, axis=0)
        worst = float(resid.max())
        if worst > max(100 * tol, 1e-4):
            warnings.warn(
                f"core.spectral_large: LOBPCG+AMG did not converge in {maxiter} iterations on a "
                f"{n}-node graph (largest eigenvector residual {worst:.2e}); raise maxiter",
                RuntimeWarning,
                stacklevel=2,
            )
    embedding = vectors / sqrt_deg[:, None]
    return _sign_flip(embedding), values


def amg_cluster_active(adjacency, n_clusters: int, seed: int, n_init: int, **kwargs) -> np.ndarray:
    """k-means labels (``0 .. n_clusters-1``, unordered) of the AMG spectral embedding of a
    validated, loop-free graph without zero-degree nodes; same ``seed`` -> same labels."""
    from sklearn.cluster import KMeans

    embedding, _ = amg_embedding(adjacency, n_clusters, random_state=seed, **kwargs)
    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    return model.fit(embedding).labels_
