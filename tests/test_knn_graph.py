"""Tests for modlens.core.knn_graph: sparse kNN activation and weight graphs."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from modlens.core import clustering, spectral_large
from modlens.core.clustering import spectral_labels
from modlens.core.graph import activation_graph
from modlens.core.knn_graph import (
    TREE_MAX_SAMPLES,
    TopK,
    build_activation_graph,
    choose_graph_mode,
    knn_activation_graph,
    knn_sparsify,
    standardized_ranks,
    tree_neighbours,
)


def planted_activations(m, n_blocks, per_block, *, noise=1.5, seed=0):
    """Units of a block share one latent factor (plus noise); a monotone map keeps ranks."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((m, n_blocks))
    x = np.repeat(latent, per_block, axis=1) + noise * rng.standard_normal((m, n_blocks * per_block))
    perm = rng.permutation(n_blocks * per_block)
    truth = np.repeat(np.arange(n_blocks), per_block)[perm]
    return np.exp(x[:, perm]), truth


def brute_force_knn(dense, k, symmetrize):
    """Reference: per row, sort all other entries and keep the k largest (a plain loop)."""
    n = dense.shape[0]
    mask = np.zeros((n, n), dtype=bool)
    for u in range(n):
        others = [v for v in range(n) if v != u]
        best = sorted(others, key=lambda v: -dense[u, v])[:k]
        mask[u, best] = True
    mask &= dense > 0
    if symmetrize == "max":
        return np.where(mask | mask.T, dense, 0.0)
    return dense * (mask.astype(float) + mask.T.astype(float)) / 2


@pytest.mark.parametrize("symmetrize", ["max", "mean"])
def test_knn_activation_graph_is_dense_top_k(symmetrize):
    rng = np.random.default_rng(1)
    layers = [rng.normal(size=(40, 17)), rng.normal(size=(40, 13)) ** 3]
    dense = activation_graph(layers)
    expected = brute_force_knn(dense, 5, symmetrize)
    got = knn_activation_graph(layers, 5, symmetrize=symmetrize).toarray()
    np.testing.assert_array_equal(got != 0, expected != 0)  # same edges
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # same weights
    # many tiny chunks give the same graph
    chunked = knn_activation_graph(layers, 5, symmetrize=symmetrize, chunk_bytes=1).toarray()
    np.testing.assert_allclose(chunked, got, rtol=0, atol=1e-14)  # BLAS blocking: rounding only


def test_knn_activation_graph_edge_cases():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8))
    x[:, 3] = 1.0  # constant unit: no edges, zero degree
    g = knn_activation_graph(x, 3)
    assert g.shape == (8, 8) and (abs(g - g.T)).max() == 0
    assert g[[3]].nnz == 0 and g[:, [3]].nnz == 0
    assert g.diagonal().max() == 0
    # k at least n - 1: the whole dense graph
    np.testing.assert_allclose(knn_activation_graph(x, 50).toarray(), activation_graph(x), atol=1e-12)
    # float32: same graph up to float32 rounding
    np.testing.assert_allclose(knn_activation_graph(x, 7, dtype=np.float32).toarray(), activation_graph(x), atol=1e-6)
    with pytest.raises(ValueError, match="k must be a positive int"):
        knn_activation_graph(x, 0)
    with pytest.raises(ValueError, match="symmetrize"):
        knn_activation_graph(x, 2, symmetrize="min")
    with pytest.raises(ValueError, match="NaN"):
        knn_activation_graph(np.full((5, 3), np.nan), 2)


@pytest.mark.parametrize("m", [3, 5, 8, 12])
def test_tree_neighbours_are_each_units_top_k(m):
    """The KD-tree keeps, for every unit, k distinct other units whose weights are the k largest of its row of
    the dense graph. Ranks of few samples tie often (3 samples: 6 rank patterns), so which of tied units is
    kept is free, and the test compares each row's kept weights, sorted, with a brute-force sort."""
    rng = np.random.default_rng(m)
    layers = [rng.normal(size=(m, 23)), np.exp(rng.normal(size=(m, 41)))]
    layers[0][:, 4] = 2.0   # constant: no edges
    dense = activation_graph(layers)
    n = dense.shape[0]
    z = standardized_ranks(layers)
    for k in (1, 6, 61, 200):
        rows, cols, vals = tree_neighbours(z, k, chunk_bytes=4096)   # a few units per query chunk
        assert 4 not in rows and 4 not in cols
        for u in range(n):
            if u == 4:
                continue
            mine = rows == u
            assert len(set(cols[mine])) == mine.sum() and u not in cols[mine]
            np.testing.assert_allclose(vals[mine], dense[u, cols[mine]], rtol=0, atol=1e-12)
            others = np.delete(dense[u], [u, 4])
            np.testing.assert_allclose(np.sort(vals[mine]), np.sort(others)[::-1][:min(k, n - 2)][::-1],
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("symmetrize", ["max", "mean"])
def test_tree_method_with_every_neighbour_is_the_dense_graph(symmetrize):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 30))
    x[:, 7] = -1.0
    got = knn_activation_graph(x, 29, method="tree", symmetrize=symmetrize).toarray()
    np.testing.assert_allclose(got, activation_graph(x), rtol=0, atol=1e-12)
    # the matmul path agrees; a graph of constant units has no edges
    np.testing.assert_allclose(knn_activation_graph(x, 29, method="matmul").toarray(), got, rtol=0, atol=1e-12)
    assert knn_activation_graph(np.ones((5, 9)), 3, method="tree").nnz == 0
    with pytest.raises(ValueError, match="method must be one of"):
        knn_activation_graph(x, 3, method="ball")


def test_auto_method_takes_the_tree_for_few_samples(monkeypatch):
    from modlens.core import knn_graph
    calls = []
    real = knn_graph.tree_neighbours
    monkeypatch.setattr(knn_graph, "tree_neighbours", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rng = np.random.default_rng(5)
    for m, expected in ((TREE_MAX_SAMPLES, 1), (TREE_MAX_SAMPLES + 1, 0)):
        calls.clear()
        knn_activation_graph(rng.normal(size=(m, 50)), 4)
        assert len(calls) == expected


@pytest.mark.parametrize("symmetrize", ["max", "mean"])
def test_knn_sparsify_dense_and_sparse_match_reference(symmetrize):
    rng = np.random.default_rng(3)
    a = np.abs(rng.normal(size=(25, 25)))
    a[rng.random((25, 25)) < 0.5] = 0
    a = (a + a.T) / 2
    np.fill_diagonal(a, 7.0)  # the diagonal is ignored
    ref_input = a.copy()
    np.fill_diagonal(ref_input, 0.0)
    expected = brute_force_knn(ref_input, 4, symmetrize)
    from_dense = knn_sparsify(a, 4, symmetrize=symmetrize, chunk_bytes=1).toarray()
    from_sparse = knn_sparsify(sp.csr_array(a), 4, symmetrize=symmetrize).toarray()
    np.testing.assert_allclose(from_dense, expected, atol=1e-15)
    np.testing.assert_allclose(from_sparse, expected, atol=1e-15)
    with pytest.raises(ValueError, match="negative"):
        knn_sparsify(-a, 3)


def test_top_k_accumulator_equals_one_shot():
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(size=(30, 30)))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 0)
    top = TopK(30, 6)
    for lo, hi in [(0, 7), (7, 20), (20, 30)]:  # candidates arrive in column pieces
        top.update(np.arange(30), np.arange(lo, hi), a[:, lo:hi])
    np.testing.assert_allclose(top.to_graph().toarray(), knn_sparsify(a, 6).toarray(), atol=1e-15)


@pytest.mark.parametrize("symmetrize", ["max", "mean"])
@pytest.mark.parametrize("chunk_bytes", [1, 20_000, 10**9])
def test_half_blocks_equal_the_full_blocks(symmetrize, chunk_bytes):
    """The optimized path (each chunk correlated with itself and the later units only, both ends
    of an edge served from one block) gives the plain path's graph: every row's full block."""
    rng = np.random.default_rng(6)
    layers = [rng.normal(size=(300, 70)), np.exp(rng.normal(size=(300, 50))), rng.normal(size=(300, 40)) ** 3]
    layers[1][:, 5] = 2.0  # a constant unit: no edges either way
    plain = knn_activation_graph(layers, 9, symmetrize=symmetrize, chunk_bytes=chunk_bytes, half=False)
    fast = knn_activation_graph(layers, 9, symmetrize=symmetrize, chunk_bytes=chunk_bytes)
    np.testing.assert_array_equal(fast.toarray() != 0, plain.toarray() != 0)  # same edges
    np.testing.assert_allclose(fast.toarray(), plain.toarray(), rtol=1e-12, atol=0)  # same weights
    assert (abs(fast - fast.T)).max() == 0
    # float32 ranks (the next-token activation path): same graph up to float32 rounding
    plain32 = knn_activation_graph(layers, 9, symmetrize=symmetrize, chunk_bytes=chunk_bytes, half=False,
                                   dtype=np.float32)
    fast32 = knn_activation_graph(layers, 9, symmetrize=symmetrize, chunk_bytes=chunk_bytes, dtype=np.float32)
    np.testing.assert_array_equal(fast32.toarray() != 0, plain32.toarray() != 0)
    np.testing.assert_allclose(fast32.toarray(), plain32.toarray(), rtol=0, atol=1e-6)


def test_top_k_prereduction_equals_full_merge():
    """TopK.update keeps a row's k best new candidates before merging: the same top k as merging
    every candidate, for candidate pieces wider and narrower than k, row subsets and float32."""
    rng = np.random.default_rng(7)
    a = np.abs(rng.normal(size=(40, 40)))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 0)
    top = TopK(40, 5)
    for lo, hi in [(0, 3), (3, 25), (25, 29), (29, 40)]:
        top.update(np.arange(20), np.arange(lo, hi), a[:20, lo:hi])
        top.update(np.arange(20, 40), np.arange(lo, hi), a[20:, lo:hi].astype(np.float32))
    reference = np.zeros_like(a)
    for u in range(40):
        best = np.argsort(-a[u], kind="stable")[:5]
        reference[u, best] = a[u, best]
    got = top.to_graph().toarray()
    expected = np.where((reference != 0) | (reference.T != 0), a, 0.0)
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # rows 20..39 went through float32


def test_choose_graph_mode_and_build():
    assert choose_graph_mode(100) == "dense"
    assert choose_graph_mode(10**6) == "knn"
    assert choose_graph_mode(10, "knn") == "knn"
    with pytest.raises(ValueError, match="graph mode"):
        choose_graph_mode(10, "sparse")
    x = np.random.default_rng(5).normal(size=(20, 12))
    assert isinstance(build_activation_graph(x), np.ndarray)
    assert sp.issparse(build_activation_graph(x, dense_max_nodes=11, k=3))


@pytest.mark.filterwarnings("ignore:.*not fully connected")  # a kNN graph of blocks may split into blocks
@pytest.mark.parametrize("solver", ["lanczos", "amg"])
def test_planted_blocks_recovered_by_knn_graph_and_sparse_clustering(solver):
    x, truth = planted_activations(200, 6, 40)
    g = knn_activation_graph(x, 15)
    labels = spectral_labels(g, 6, eigen_solver=solver, random_state=0)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_large_sparse_graphs_dispatch_to_lanczos(monkeypatch):
    calls = []
    original = spectral_large.cluster_active

    def spy(*args, **kwargs):
        calls.append((args[0].shape[0], kwargs["solver"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(spectral_large, "cluster_active", spy)
    x, truth = planted_activations(100, 4, 30, seed=1)
    g = knn_activation_graph(x, 10)
    monkeypatch.setattr(spectral_large, "LARGE_SPARSE_NODES", 120)
    spectral_labels(g, 4)
    assert calls == []  # small sparse graph: the LOBPCG path
    monkeypatch.setattr(spectral_large, "LARGE_SPARSE_NODES", 119)
    labels = clustering.spectral_labels(g, 4)
    assert calls == [(120, "lanczos")]
    assert adjusted_rand_score(truth, labels) == 1.0


@pytest.mark.parametrize("update_entries", [1, 500, 2**22])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_top_k_survivor_merge_equals_selection(k, update_entries, monkeypatch):
    """The survivor merge of full rows (TopK.update) keeps what plain selection keeps: rows fed a
    stream of column pieces of many widths, rows still filling and full rows in one update, equal
    a per-row sort of all their candidates (continuous values: no ties), whatever the row pieces."""
    from modlens.core import knn_graph

    monkeypatch.setattr(knn_graph, "UPDATE_ENTRIES", update_entries)
    rng = np.random.default_rng(11)
    n, m = 90, 400
    a = rng.random(size=(n, m)) * (1.0 + 2.0 * np.arange(m) / m)  # later pieces: some survivors
    top = TopK(n, k)
    bounds = [0, 3, 5, 40, 41, 60, 61, 62, 150, 151, 400]
    merged = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for part in (np.arange(0, n, 2), np.arange(1, n, 2)):
            before = top.vals[part].min(axis=1)
            top.update(part, np.arange(lo, hi), a[part, lo:hi])
            merged += int(np.count_nonzero(a[part, lo:hi] > before[:, None]))
    assert merged > 0
    for u in range(n):
        best = np.argsort(-a[u], kind="stable")[:k]
        got = top.cols[u][np.argsort(-top.vals[u], kind="stable")]
        np.testing.assert_array_equal(got, best)
        np.testing.assert_array_equal(top.vals[u][np.argsort(-top.vals[u], kind="stable")], a[u, best])


def _residual_blocks(rng):
    """Blocks of a small residual-like CNN graph: adjacent layers, a skip pair, a sparse block and zeros."""
    sizes = [5, 7, 6, 9, 4]
    dense = lambda j, i: np.abs(rng.normal(size=(sizes[j], sizes[i])))
    skip = dense(3, 1)
    skip[:, 2] = 0.0  # a unit that the skip path does not use
    sparse_block = sp.random(sizes[4], sizes[3], density=0.4, random_state=3, format="csr")
    return sizes, [(0, 1, dense(1, 0)), (1, 2, dense(2, 1)), (2, 3, dense(3, 2)), (1, 3, skip), (3, 4, sparse_block)]


@pytest.mark.parametrize("chunk_bytes", [1, 200, 10**9])
def test_knn_weight_graph_is_the_weight_graph_or_its_top_k(chunk_bytes):
    """knn_weight_graph equals the exact weight graph when k covers every degree, and the exact
    graph's top k per node (knn_sparsify) otherwise; weight_graph_edges counts the exact graph's edges."""
    from modlens.core.graph import weight_graph
    from modlens.core.knn_graph import knn_weight_graph, weight_graph_edges

    sizes, blocks = _residual_blocks(np.random.default_rng(12))
    exact = weight_graph(sizes, blocks)
    assert weight_graph_edges(blocks) == exact.nnz // 2
    full = knn_weight_graph(sizes, blocks, k=sum(sizes), chunk_bytes=chunk_bytes)
    np.testing.assert_array_equal(full.toarray(), exact.toarray())
    for k in (1, 3, 6):
        got = knn_weight_graph(sizes, blocks, k=k, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(got.toarray(), knn_sparsify(exact, k).toarray())
        assert got.toarray().max() > 0 and (abs(got - got.T)).max() == 0
    with pytest.raises(ValueError, match="negative"):
        knn_weight_graph(sizes, [(0, 1, -blocks[0][2])], k=3)


def _reference_top_k(a: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest values, sorted descending (a per-row sort: the plain reference)."""
    return -np.sort(-a, axis=1)[:, :k]


@pytest.mark.parametrize("update_entries", [7, 5000, 2**22])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_transposed_and_raised_thresholds_equal_selection(k, update_entries, monkeypatch):
    """TopK fed pieces column-wise (transposed=True, no transposed copy) and pieces wide enough that rows still
    filling raise their thresholds from every SAMPLE_STRIDE-th candidate keeps what a per-row sort keeps:
    the same columns for continuous values, in float64 and float32, whatever the row pieces."""
    from modlens.core import knn_graph

    monkeypatch.setattr(knn_graph, "UPDATE_ENTRIES", update_entries)
    rng = np.random.default_rng(12)
    n, width = 60, 4000
    assert width > 2 * knn_graph.SAMPLE_STRIDE * knn_graph.SPARSE_MERGE_FACTOR * k  # the raised path runs
    a = rng.random(size=(n, width))
    a[:, 2000:2100] += 1.0  # a later piece beats most kept entries: many survivors after filling
    for dtype in (np.float64, np.float32):
        plain, transposed = TopK(n, k), TopK(n, k)
        rows = np.arange(n)
        for lo, hi in [(0, 5), (5, 1500), (1500, 1503), (1503, 4000)]:
            piece = a[:, lo:hi].astype(dtype)
            plain.update(rows, np.arange(lo, hi), piece)
            transposed.update(rows, np.arange(lo, hi), np.ascontiguousarray(piece.T), transposed=True)
        for top in (plain, transposed):
            order = np.argsort(-top.vals, axis=1, kind="stable")
            got_cols = np.take_along_axis(top.cols, order, axis=1)
            expected_cols = np.argsort(-a.astype(dtype), axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(got_cols, expected_cols)
            np.testing.assert_array_equal(np.take_along_axis(top.vals, order, axis=1),
                                          _reference_top_k(a.astype(dtype), k).astype(np.float64))
            np.testing.assert_array_equal(top.floor, top.vals.min(axis=1))


def test_top_k_ties_keep_the_values_of_a_sort():
    """Many exact ties (few distinct values, as the correlations of a handful of samples): which tied column is
    kept may differ, but every row keeps the values a per-row sort keeps."""
    rng = np.random.default_rng(13)
    n, width, k = 40, 6000, 16
    a = rng.integers(0, 12, size=(n, width)).astype(np.float64) / 11
    top = TopK(n, k)
    for lo in range(0, width, 1000):
        top.update(np.arange(n), np.arange(lo, lo + 1000), a[:, lo:lo + 1000])
    np.testing.assert_array_equal(-np.sort(-top.vals, axis=1), _reference_top_k(a, k))
    assert np.all(np.take_along_axis(a, top.cols, axis=1) == top.vals)  # each kept column has its value


def test_top_k_float32_candidates_against_float64_thresholds():
    """A float32 candidate above a row's float64 k-th best passes the threshold even where float32 cannot
    hold the k-th best (it is rounded down, never up, for the comparison)."""
    top = TopK(1, 2)
    top.update([0], [0, 1], np.array([[0.1, 0.1]]))  # float64 k-th best 0.1
    candidate = np.float32(0.1)  # 0.10000000149... > 0.1 in float64
    assert float(candidate) > 0.1
    top.update([0], [2, 3, 4], np.array([[0.0, candidate, 0.0]], dtype=np.float32))
    assert 3 in top.cols[0]
    np.testing.assert_array_equal(np.sort(top.vals[0]), [0.1, float(candidate)])


def test_knn_activation_graph_float32_is_the_float64_graph_up_to_rounding():
    """partition's kNN path ranks in float32: the same edges as float64 on continuous activations, and
    weights equal up to float32 rounding, clipped to at most 1."""
    rng = np.random.default_rng(14)
    lat = rng.normal(size=(200, 5))
    layers = [lat @ rng.normal(size=(5, 400)) + rng.normal(size=(200, 400)) for _ in range(3)]
    g64 = knn_activation_graph(layers, 12, chunk_bytes=50_000)
    g32 = knn_activation_graph(layers, 12, chunk_bytes=50_000, dtype=np.float32)
    np.testing.assert_array_equal(g32.toarray() != 0, g64.toarray() != 0)
    np.testing.assert_allclose(g32.toarray(), g64.toarray(), rtol=0, atol=1e-5)  # float32 sums of 200 products
    layers[0][:, 1] = layers[0][:, 0] * 3.0  # a perfectly correlated pair: weight exactly 1, never above
    g32 = knn_activation_graph(layers, 12, chunk_bytes=50_000, dtype=np.float32)
    assert g32.max() == 1.0 and g32[0, 1] == 1.0
