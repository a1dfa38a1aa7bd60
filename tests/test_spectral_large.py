"""Tests for modlens.core.spectral_large: Lanczos and AMG-preconditioned LOBPCG spectral clustering."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import laplacian
from sklearn.metrics import adjusted_rand_score

from modlens.core.clustering import spectral_labels
from modlens.core.spectral_large import large_embedding


def planted_graph(n_blocks, per_block, p_in, p_out, *, seed=0):
    """Stochastic block model with random positive weights, nodes shuffled."""
    rng = np.random.default_rng(seed)
    n = n_blocks * per_block
    truth = np.repeat(np.arange(n_blocks), per_block)
    same = truth[:, None] == truth[None, :]
    p = np.where(same, p_in, p_out)
    upper = np.triu((rng.random((n, n)) < p) * rng.uniform(0.5, 1.5, (n, n)), 1)
    adj = upper + upper.T
    perm = rng.permutation(n)
    return sp.csr_array(adj[perm][:, perm]), truth[perm]


@pytest.mark.parametrize("solver", ["lanczos", "amg"])
def test_eigenpairs_match_dense_reference(solver):
    adj, _ = planted_graph(5, 80, 0.2, 0.02, seed=1)
    emb, values = large_embedding(adj, 6, solver=solver, random_state=0)
    lap, dd = laplacian(adj.toarray(), normed=True, return_diag=True)
    ref_values, ref_vectors = np.linalg.eigh(lap)
    np.testing.assert_allclose(values, ref_values[:6], atol=1e-7)
    # the embedding spans the same space as D^{-1/2} x of the reference eigenvectors
    ref_emb = ref_vectors[:, :6] / dd[:, None]
    q_got, _ = np.linalg.qr(emb)
    q_ref, _ = np.linalg.qr(ref_emb)
    np.testing.assert_allclose(np.linalg.svd(q_got.T @ q_ref, compute_uv=False), 1.0, atol=1e-6)


@pytest.mark.parametrize("solver", ["lanczos", "amg"])
def test_partition_agrees_with_arpack_on_mid_size_graph(solver):
    adj, truth = planted_graph(8, 150, 0.06, 0.012, seed=2)  # 1,200 nodes, noisy blocks
    amg = spectral_labels(adj, 8, eigen_solver=solver, random_state=3)
    arpack = spectral_labels(adj, 8, eigen_solver="arpack", random_state=3)
    # eigenvectors agree to ~1e-6; k-means on borderline nodes can still differ a little
    assert adjusted_rand_score(amg, arpack) >= 0.98
    assert adjusted_rand_score(truth, amg) >= 0.5  # noisy on purpose: the solvers must agree, not be perfect


@pytest.mark.parametrize("solver", ["lanczos", "amg"])
def test_zero_degree_nodes_and_determinism(solver):
    adj, truth = planted_graph(3, 40, 0.5, 0.01, seed=4)
    dense = adj.toarray()
    dense[[5, 17]] = 0
    dense[:, [5, 17]] = 0
    dense[9, 9] = 3.0  # a self-loop does not count as an edge
    dense[9] = 0
    dense[:, 9] = 0
    dense[9, 9] = 3.0
    g = sp.csr_array(dense)
    a = spectral_labels(g, 3, eigen_solver=solver, random_state=7)
    b = spectral_labels(g, 3, eigen_solver=solver, random_state=7)
    np.testing.assert_array_equal(a, b)
    assert set(np.flatnonzero(a == -1)) == {5, 9, 17}
    keep = a != -1
    assert adjusted_rand_score(truth[keep], a[keep]) == 1.0
    # dense input is accepted too
    np.testing.assert_array_equal(spectral_labels(dense, 3, eigen_solver=solver, random_state=7), a)
    with pytest.raises(ValueError, match="solver"):
        large_embedding(g, 3, solver="pyamg")
    with pytest.raises(ValueError, match="eigen_solver"):
        spectral_labels(g, 3, eigen_solver="pyamg")


def test_lanczos_falls_back_to_amg_when_arpack_does_not_converge(monkeypatch):
    from scipy.sparse.linalg import ArpackNoConvergence

    from modlens.core import spectral_large

    def no_convergence(*args, **kwargs):
        raise ArpackNoConvergence("no convergence", np.zeros(0), np.zeros((0, 0)))

    adj, _ = planted_graph(4, 60, 0.3, 0.02, seed=5)
    amg = spectral_labels(adj, 4, eigen_solver="amg", random_state=1)
    monkeypatch.setattr(spectral_large, "eigsh", no_convergence)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        fallback = spectral_labels(adj, 4, eigen_solver="lanczos", random_state=1)
    np.testing.assert_array_equal(fallback, amg)
