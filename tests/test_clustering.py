"""Tests for modlens.core.clustering: spectral, global and local clustering."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from modlens.core.clustering import cluster_global, cluster_local, relabel, spectral_labels
from modlens.core.graph import layer_offsets, ncut, weight_graph


def block_graph(n_blocks=4, size=12, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(n_blocks), size)
    same = truth[:, None] == truth[None, :]
    adj = rng.uniform(0.5, 1.0, size=(truth.size,) * 2) * np.where(same, 1.0, noise)
    adj = np.triu(adj, 1)
    return adj + adj.T, truth


SIZES = [20, 16, 16, 4]
N_MODULES = 4


def modular_mlp(seed=0, noise=0.0):
    """An MLP-shaped weight graph whose 4 modules are wired only within themselves."""
    rng = np.random.default_rng(seed)
    modules = [rng.permutation(np.arange(s) % N_MODULES) for s in SIZES]
    blocks = []
    for i in range(len(SIZES) - 1):
        same = modules[i + 1][:, None] == modules[i][None, :]
        w = rng.uniform(0.5, 1.5, size=(SIZES[i + 1], SIZES[i])) * np.where(same, 1.0, noise)
        blocks.append((i, i + 1, w))
    return weight_graph(SIZES, blocks), modules


def test_relabel():
    np.testing.assert_array_equal(relabel([5, 5, -1, 2, 9, 2, 5]), [0, 0, -1, 1, 2, 1, 0])
    np.testing.assert_array_equal(relabel([-1, -1]), [-1, -1])


def test_block_graph_recovered_exactly():
    adj, truth = block_graph()
    labels = spectral_labels(adj, 4)
    assert adjusted_rand_score(truth, labels) == 1.0
    np.testing.assert_array_equal(labels, relabel(labels))  # first-appearance numbering
    assert labels[0] == 0
    # sparse input gives the same answer
    np.testing.assert_array_equal(spectral_labels(sp.csr_array(adj), 4), labels)
    # ARPACK (the paper's solver) agrees
    assert adjusted_rand_score(truth, spectral_labels(adj, 4, eigen_solver="arpack")) == 1.0


def test_large_block_graph_uses_lobpcg_iterations():
    # 120 nodes > 5 * (k + 1), so scikit-learn runs real LOBPCG iterations, not a dense eigh
    adj, truth = block_graph(n_blocks=6, size=20, noise=0.05, seed=1)
    labels = spectral_labels(sp.csr_array(adj), 6, eigen_solver="lobpcg")
    assert adjusted_rand_score(truth, labels) == 1.0
    assert ncut(adj, labels) <= ncut(adj, truth) + 1e-12


def test_same_seed_same_labels_and_generator_input():
    adj, _ = block_graph(noise=0.3, seed=2)
    a = spectral_labels(adj, 5, random_state=7)
    b = spectral_labels(adj, 5, random_state=7)
    np.testing.assert_array_equal(a, b)
    c = spectral_labels(adj, 5, random_state=np.random.default_rng(7))
    np.testing.assert_array_equal(c, spectral_labels(adj, 5, random_state=np.random.default_rng(7)))


def test_permuting_nodes_permutes_labels():
    adj, truth = block_graph(seed=3)
    perm = np.random.default_rng(0).permutation(truth.size)
    labels = spectral_labels(adj, 4)
    permuted = spectral_labels(adj[np.ix_(perm, perm)], 4)
    back = np.empty_like(permuted)
    back[perm] = permuted
    assert adjusted_rand_score(labels, back) == 1.0


def test_zero_degree_nodes_unclustered():
    adj, truth = block_graph()
    n = truth.size
    big = np.zeros((n + 2, n + 2))
    idx = np.setdiff1d(np.arange(n + 2), [1, n])  # nodes 1 and n are isolated
    big[np.ix_(idx, idx)] = adj
    big[1, 1] = 5.0  # a self-loop alone does not give a node edges
    labels = spectral_labels(big, 4)
    assert labels[1] == -1 and labels[n] == -1
    assert np.all(labels[idx] >= 0)
    assert adjusted_rand_score(truth, labels[idx]) == 1.0
    np.testing.assert_array_equal(labels[idx], spectral_labels(adj, 4))
    with pytest.raises(ValueError, match=rf"only {n} of the {n + 2} nodes have edges.*at most {n}"):
        spectral_labels(big, n + 1)


def test_errors():
    adj, _ = block_graph()
    with pytest.raises(ValueError, match="at least 1"):
        spectral_labels(adj, 0)
    with pytest.raises(ValueError, match="at most 48"):
        spectral_labels(adj, 49)
    with pytest.raises(ValueError, match="no edges"):
        spectral_labels(np.zeros((5, 5)), 2)
    with pytest.raises(ValueError, match="symmetric"):
        spectral_labels(np.triu(adj), 2)
    with pytest.raises(ValueError, match="negative"):
        spectral_labels(-adj, 2)


def test_one_cluster_and_disconnected_graph():
    adj, truth = block_graph(noise=0.0)  # four connected components
    np.testing.assert_array_equal(spectral_labels(adj, 1), np.zeros(truth.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that the graph is not connected
        labels = spectral_labels(adj, 4)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_global_clustering_recovers_planted_mlp_modules():
    adj, modules = modular_mlp(noise=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planted modules are disconnected components
        per_layer = cluster_global(adj, SIZES, N_MODULES)
    assert [l.size for l in per_layer] == SIZES
    assert adjusted_rand_score(np.concatenate(modules), np.concatenate(per_layer)) == 1.0


def test_global_clustering_with_weak_noise_edges():
    adj, modules = modular_mlp(seed=1, noise=0.02)
    per_layer = cluster_global(adj, SIZES, N_MODULES, random_state=3)
    assert adjusted_rand_score(np.concatenate(modules), np.concatenate(per_layer)) == 1.0
    for got in per_layer:
        assert got.dtype == np.int64 and got.min() >= 0


def test_local_clustering_recovers_each_layers_modules():
    adj, modules = modular_mlp(seed=2, noise=0.02)
    targets = [1, 2]
    local = cluster_local(adj, SIZES, targets, [N_MODULES, N_MODULES], random_state=0)
    assert len(local) == 2
    for l, got in zip(targets, local):
        assert got.shape == (SIZES[l],)
        assert adjusted_rand_score(modules[l], got) == 1.0
        np.testing.assert_array_equal(got, relabel(got))
    # the first and last layers have one neighbour only
    edge = cluster_local(adj, SIZES, [0, 3], [N_MODULES, N_MODULES], random_state=0)
    assert adjusted_rand_score(modules[0], edge[0]) == 1.0
    assert adjusted_rand_score(modules[3], edge[1]) == 1.0
    again = cluster_local(adj, SIZES, targets, [N_MODULES, N_MODULES], random_state=0)
    for a, b in zip(local, again):
        np.testing.assert_array_equal(a, b)


def test_local_clustering_small_and_clamped_k():
    adj, modules = modular_mlp(seed=3, noise=0.02)
    # layer 3 (4 nodes) with layer 2 (16 nodes): k = 1 -> one cluster; k = 100 -> clamped to 20
    one, clamped = cluster_local(adj, SIZES, [3, 3], [1, 100])
    np.testing.assert_array_equal(one, np.zeros(4))
    np.testing.assert_array_equal(clamped, [0, 1, 2, 3])


def test_local_clustering_isolated_nodes_and_errors():
    rng = np.random.default_rng(4)
    sizes = [6, 5, 3]
    w1 = rng.uniform(size=(5, 6))
    w1[2] = 0.0  # node 2 of layer 1 has no incoming ...
    w2 = rng.uniform(size=(3, 5))
    w2[:, 2] = 0.0  # ... and no outgoing edges
    adj = weight_graph(sizes, [(0, 1, w1), (1, 2, w2)])
    (lab1,) = cluster_local(adj, sizes, [1], [2])
    assert lab1[2] == -1 and np.all(np.delete(lab1, 2) >= 0)
    (lab1_k1,) = cluster_local(adj, sizes, [1], [1])
    np.testing.assert_array_equal(lab1_k1, [0, 0, -1, 0, 0])
    with pytest.raises(ValueError, match="one cluster count per target layer"):
        cluster_local(adj, sizes, [1, 2], [2])
    with pytest.raises(ValueError, match="out of range"):
        cluster_local(adj, sizes, [3], [2])
    with pytest.raises(ValueError, match="sum to"):
        cluster_global(adj, [6, 5], 2)


def test_local_uses_independent_seeds_per_layer():
    adj, _ = modular_mlp(seed=5, noise=1.0)  # no structure: labels depend on the seed
    a = cluster_local(adj, SIZES, [1, 2], [3, 3], random_state=11)
    b = cluster_local(adj, SIZES, [1, 2], [3, 3], random_state=11)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # layer 1 alone, with the same parent seed, gets the same child seed as in the pair
    (alone,) = cluster_local(adj, SIZES, [1], [3], random_state=11)
    np.testing.assert_array_equal(alone, a[0])


def test_disconnected_graph_warning_passes_through():
    adj, _ = block_graph(noise=0.0)
    with pytest.warns(UserWarning, match="not fully connected"):
        spectral_labels(adj, 4)


@pytest.mark.parametrize("failure", ["warn", "raise"])
def test_lobpcg_failure_falls_back_to_arpack(monkeypatch, failure):
    import modlens.core.clustering as clustering

    adj, truth = block_graph(noise=0.1, seed=6)
    expected = spectral_labels(adj, 4, eigen_solver="arpack", random_state=5)
    real_fit = clustering._fit
    solvers = []

    def flaky_fit(a, k, solver, seed, n_init):
        solvers.append(solver)
        if solver == "lobpcg":
            if failure == "raise":
                raise np.linalg.LinAlgError("lobpcg broke down")
            warnings.warn("Exited at iteration 2000 with accuracies\n[1e-3]\nnot reaching the requested tolerance 1e-8.")
            return np.zeros(a.shape[0], dtype=int)
        return real_fit(a, k, solver, seed, n_init)

    monkeypatch.setattr(clustering, "_fit", flaky_fit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the convergence warning is not passed on
        labels = spectral_labels(adj, 4, random_state=5, eigen_solver="lobpcg")
    assert solvers == ["lobpcg", "arpack"]
    np.testing.assert_array_equal(labels, expected)
    assert adjusted_rand_score(truth, labels) == 1.0


# ----------------------------------------------------------------------------- solver choice


def test_choose_eigen_solver_switches_at_the_measured_size():
    from modlens.core.clustering import ARPACK_MAX_NODES, choose_eigen_solver

    assert choose_eigen_solver(1818) == "arpack"  # the paper's MLP weight graph
    assert choose_eigen_solver(ARPACK_MAX_NODES) == "arpack"
    assert choose_eigen_solver(ARPACK_MAX_NODES + 1) == "lobpcg"
    assert choose_eigen_solver(ARPACK_MAX_NODES + 1, sparse=False) == "lobpcg"
    with pytest.raises(ValueError, match="n_nodes"):
        choose_eigen_solver(-1)


def test_auto_solver_is_arpack_on_small_graphs_and_n_init_rule(monkeypatch):
    import modlens.core.clustering as clustering

    adj, truth = block_graph(noise=0.1, seed=6)
    calls = []
    real_fit = clustering._fit

    def spy(a, k, solver, seed, n_init):
        calls.append((solver, n_init))
        return real_fit(a, k, solver, seed, n_init)

    monkeypatch.setattr(clustering, "_fit", spy)
    auto = spectral_labels(adj, 4, random_state=3)
    np.testing.assert_array_equal(auto, spectral_labels(adj, 4, random_state=3, eigen_solver="arpack", n_init=25))
    assert calls == [("arpack", 25), ("arpack", 25)]
    assert clustering.resolve_n_init("auto", 2000) == 25 and clustering.resolve_n_init("auto", 2001) == 100
    assert clustering.resolve_n_init(7, 10**6) == 7
    for bad in (0, -1, 2.5, "many", True):
        with pytest.raises(ValueError, match="n_init"):
            spectral_labels(adj, 4, n_init=bad)
    with pytest.raises(ValueError, match="eigen_solver"):
        spectral_labels(adj, 4, eigen_solver="eigh")


def test_amg_solver_recovers_blocks():
    pytest.importorskip("pyamg")
    adj, truth = block_graph(n_blocks=6, size=20, noise=0.05, seed=1)
    labels = spectral_labels(sp.csr_array(adj), 6, eigen_solver="amg")
    assert adjusted_rand_score(truth, labels) == 1.0


def test_symmetry_of_a_large_sparse_adjacency_is_checked_without_copying_it(monkeypatch):
    """Above PROBED_SYMMETRY_NNZ entries, symmetry is checked with products (A x against A.T x):
    no copy of the graph (forming A - A.T took another graph's worth of memory), and an asymmetric
    entry is still found."""
    import tracemalloc

    from modlens.core import clustering

    monkeypatch.setattr(clustering, "PROBED_SYMMETRY_NNZ", 1000)
    a = sp.random(600, 600, density=0.05, random_state=0, format="csr")
    a = (a + a.T).tocsr()
    tracemalloc.start()
    try:
        clustering._as_adjacency(a)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * (a.data.nbytes + a.indices.nbytes)
    b = a.tolil()
    b[3, 7] = b[3, 7] + 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        clustering._as_adjacency(b.tocsr())
