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


def test_lanczos_through_the_operator_equals_the_explicit_normalized_adjacency():
    """The Lanczos path reads D^{-1/2} A D^{-1/2} through an operator on the graph; the same ARPACK run
    on the explicit matrix I - L (the path before) gives the same eigenpairs and embedding."""
    from scipy.sparse.linalg import eigsh

    adj, _ = planted_graph(6, 200, 0.05, 0.005, seed=3)
    emb, values = large_embedding(adj, 6, solver="lanczos", random_state=4)
    lap, dd = laplacian(adj, normed=True, return_diag=True)
    norm_adj = sp.csr_array(sp.identity(adj.shape[0], format="csr") - lap)
    v0 = np.random.default_rng(4).uniform(-1.0, 1.0, adj.shape[0])
    ref_values, ref_vectors = eigsh(norm_adj, k=6, which="LA", tol=0, v0=v0)
    order = np.argsort(1.0 - ref_values)
    np.testing.assert_allclose(values, (1.0 - ref_values)[order], atol=1e-12)
    ref = ref_vectors[:, order] / dd[:, None]
    ref = ref * np.sign(ref[np.argmax(np.abs(ref), axis=0), np.arange(6)])
    np.testing.assert_allclose(emb, ref, atol=1e-8)


def test_a_large_loop_free_graph_is_clustered_without_a_copy(monkeypatch):
    """Peak memory of spectral_labels on a loop-free graph with 32-bit indices stays below half the
    graph's own size: neither the graph nor I - L is copied (the path before held about three copies).
    Symmetry is checked by probes, as on graphs of more than PROBED_SYMMETRY_NNZ entries."""
    import tracemalloc

    from modlens.core import clustering

    monkeypatch.setattr(clustering, "PROBED_SYMMETRY_NNZ", 0)

    rng = np.random.default_rng(0)
    n, per_row = 20_000, 100
    rows = np.repeat(np.arange(n), per_row)
    cols = (rows + rng.integers(1, n, rows.size)) % n    # never the diagonal
    upper = sp.coo_array((rng.uniform(0.5, 1.5, rows.size), (rows, cols)), shape=(n, n)).tocsr()
    adj = sp.csr_array(upper + upper.T)
    adj.sum_duplicates()
    adj = sp.csr_array((adj.data, adj.indices.astype(np.int32), adj.indptr.astype(np.int32)), shape=adj.shape)
    graph_bytes = adj.data.nbytes + adj.indices.nbytes + adj.indptr.nbytes
    tracemalloc.start()
    try:
        labels = spectral_labels(adj, 4, random_state=0, eigen_solver="lanczos", n_init=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (labels >= 0).all() and len(np.unique(labels)) == 4
    assert peak < 0.5 * graph_bytes, (peak / 2**20, graph_bytes / 2**20)


def test_large_graph_with_isolated_nodes_is_solved_without_a_copy(monkeypatch):
    # neurons without an edge (dead channels) are left out of the spectral embedding; on the large path the
    # solver works through the whole graph instead of a copy of the subgraph of the other nodes (a copy of a
    # 10^8-entry weight graph does not fit), with the same labels as on the copy
    import tracemalloc

    from modlens.core import clustering, spectral_large

    rng = np.random.default_rng(5)
    n = spectral_large.LARGE_SPARSE_NODES + 600
    planted = rng.integers(0, 3, n)
    rows = rng.integers(0, n, 120 * n)
    cols = np.where(rng.random(rows.size) < 0.9, rng.permutation(rows), rng.integers(0, n, rows.size))
    same = planted[rows] == planted[cols]
    w = np.where(same, 1.0, 0.05)
    adj = sp.csr_array((w, (rows, cols)), shape=(n, n))
    adj = sp.csr_array(adj + adj.T)
    dead = rng.choice(n, 40, replace=False)
    keep = np.ones(n)
    keep[dead] = 0
    adj = sp.csr_array(sp.diags_array(keep) @ adj @ sp.diags_array(keep))
    adj.setdiag(0)
    adj.eliminate_zeros()
    adj.indices, adj.indptr = adj.indices.astype(np.int32), adj.indptr.astype(np.int32)
    monkeypatch.setattr(clustering, "PROBED_SYMMETRY_NNZ", 0)   # symmetry probed, as on graphs of 2 * 10^7 entries
    import sklearn.cluster  # noqa: F401  (imported before measuring: its import allocates too)

    tracemalloc.start()
    labels = clustering.spectral_labels(adj, 3, random_state=0, n_init=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < adj.data.nbytes / 2, f"{peak / 2**20:.1f} MiB for a {adj.data.nbytes / 2**20:.1f} MiB graph"
    assert np.all(labels[dead] == -1) and np.all(labels[np.setdiff1d(np.arange(n), dead)] >= 0)
    active = np.setdiff1d(np.arange(n), dead)
    seed = clustering.int_seed(clustering.as_generator(0))
    copy = spectral_large.cluster_active(adj[active][:, active], 3, seed, 2)
    np.testing.assert_array_equal(labels[active], clustering.relabel(copy))


def _disconnected(n_parts, per_part, *, seed):
    """Block-diagonal graph: ``n_parts`` components, each a noisy two-block graph (so each has inner structure)."""
    parts = [planted_graph(2, per_part // 2, 0.3, 0.05, seed=seed + i)[0] for i in range(n_parts)]
    adj = sp.csr_array(sp.block_diag(parts))
    perm = np.random.default_rng(seed).permutation(adj.shape[0])
    comp = np.repeat(np.arange(n_parts), per_part)[perm]
    return sp.csr_array(adj[perm][:, perm]), comp


@pytest.mark.filterwarnings("ignore:core.spectral_large. the graph is not fully connected")
@pytest.mark.parametrize("solver", ["lanczos", "amg"])
def test_disconnected_graph_eigenpairs_match_dense_reference(solver):
    """Fewer components than eigenvectors: eigenvalue 0 once per component (set exactly, as the components'
    vectors), the rest by Lanczos on the deflated operator; the same eigenvalues and eigenspace as a dense
    eigendecomposition, whose next eigenvalues are distinct."""
    adj, _ = _disconnected(3, 120, seed=5)
    emb, values = large_embedding(adj, 6, solver=solver, random_state=0)
    lap, dd = laplacian(adj.toarray(), normed=True, return_diag=True)
    ref_values, ref_vectors = np.linalg.eigh(lap)
    assert ref_values[2] < 1e-12 < ref_values[3] and ref_values[5] < ref_values[6] - 1e-3
    np.testing.assert_allclose(values, ref_values[:6], atol=1e-8)
    q_got, _ = np.linalg.qr(emb)
    q_ref, _ = np.linalg.qr(ref_vectors[:, :6] / dd[:, None])
    np.testing.assert_allclose(np.linalg.svd(q_got.T @ q_ref, compute_uv=False), 1.0, atol=1e-6)


def test_graph_with_as_many_components_as_clusters_or_more():
    """At least n_clusters components: eigenvalue 0 has one eigenvector per component and no preferred basis; the
    embedding is a seeded orthonormal combination of the components' vectors (exact eigenvectors, zero residual),
    clusters are unions of whole components, with a warning that says so; same seed -> same labels."""
    adj, comp = _disconnected(7, 40, seed=6)
    with pytest.warns(UserWarning, match="union of components"):
        emb, values = large_embedding(adj, 4, solver="lanczos", random_state=2)
    np.testing.assert_array_equal(values, 0.0)
    lap = laplacian(adj.toarray(), normed=True)
    dd = np.sqrt(np.asarray(adj.sum(axis=1)).ravel())
    x = emb * dd[:, None]  # back to eigenvectors of the normalized Laplacian
    np.testing.assert_allclose(lap @ x, 0.0, atol=1e-12)
    np.testing.assert_allclose((x / np.linalg.norm(x, axis=0)).T @ (x / np.linalg.norm(x, axis=0)), np.eye(4), atol=1e-12)
    with pytest.warns(UserWarning, match="not fully connected"):
        labels = spectral_labels(adj, 4, eigen_solver="lanczos", random_state=3)
        again = spectral_labels(adj, 4, eigen_solver="lanczos", random_state=3)
    np.testing.assert_array_equal(labels, again)
    for c in range(7):  # every component inside one cluster
        assert np.unique(labels[comp == c]).size == 1
    assert np.unique(labels).size == 4
