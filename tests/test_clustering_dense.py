"""A dense graph held as CSR is solved as a dense array (modlens.core.clustering.DENSE_SHARE): the
labels equal those of the plain sparse path, the caller's graph is not changed, and graphs below the
share stay sparse."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from modlens.core import clustering


def _graph(n, k, seed, isolated=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, k, n)
    a = rng.random((n, n)) * (1.0 + 2.0 * (group[:, None] == group[None, :]))
    a = (a + a.T) / 2.0
    a[np.diag_indices(n)] = rng.random(n)   # self-loops: ignored by both paths
    if isolated:
        a[:isolated] = 0.0
        a[:, :isolated] = 0.0
    return sp.csr_array(a)


@pytest.mark.parametrize("solver", ["arpack", "lobpcg"])
@pytest.mark.parametrize("seed,isolated", [(0, 0), (1, 5), (2, 0)])
def test_dense_solve_equals_the_sparse_path(monkeypatch, solver, seed, isolated):
    adj = _graph(300, 4, seed, isolated)
    before = adj.copy()
    dense = clustering.spectral_labels(adj, 4, random_state=seed, eigen_solver=solver)
    assert (adj != before).nnz == 0           # the caller's graph is untouched
    monkeypatch.setattr(clustering, "DENSE_SHARE", 2.0)   # the plain path: never dense
    plain = clustering.spectral_labels(adj, 4, random_state=seed, eigen_solver=solver)
    np.testing.assert_array_equal(dense, plain)
    assert (dense[:isolated] == clustering.UNCLUSTERED).all() and (dense[isolated:] >= 0).all()


def test_which_graphs_are_solved_dense(monkeypatch):
    full = _graph(200, 3, 0)
    assert clustering._dense_enough(full, 200)
    knn = sp.csr_array(sp.random(200, 200, density=0.05, random_state=0))
    assert not clustering._dense_enough(knn, 200)
    monkeypatch.setattr(clustering, "DENSE_MAX_NODES", 100)
    assert not clustering._dense_enough(full, 200)
    seen = []
    real = clustering._fit
    monkeypatch.setattr(clustering, "_fit", lambda adj, *a: seen.append(sp.issparse(adj)) or real(adj, *a))
    monkeypatch.setattr(clustering, "DENSE_MAX_NODES", 16384)
    clustering.spectral_labels(full, 3, eigen_solver="arpack")
    clustering.spectral_labels(knn + knn.T, 3, eigen_solver="arpack")
    assert seen == [False, True]
