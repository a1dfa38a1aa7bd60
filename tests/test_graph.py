"""Tests for modlens.core.graph: weight graph, activation graph, n-cut."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

from modlens.core.graph import activation_graph, layer_offsets, ncut, spearman_squared, weight_graph


# ---------------------------------------------------------------- layer_offsets / weight_graph


def test_layer_offsets():
    np.testing.assert_array_equal(layer_offsets([784, 256, 256, 256, 256, 10]), [0, 784, 1040, 1296, 1552, 1808, 1818])
    np.testing.assert_array_equal(layer_offsets([3]), [0, 3])
    with pytest.raises(ValueError):
        layer_offsets([])
    with pytest.raises(ValueError):
        layer_offsets([3, 0, 2])


def test_weight_graph_hand_case():
    # layers of 2, 3, 1 nodes; W1 is (3, 2), W2 is (1, 3)
    w1 = np.array([[1.0, 0.0], [2.0, 3.0], [0.5, 4.0]])
    w2 = np.array([[5.0, 6.0, 0.0]])
    adj = weight_graph([2, 3, 1], [(0, 1, w1), (1, 2, w2)])
    assert isinstance(adj, sp.csr_array)
    assert adj.dtype == np.float64 and adj.shape == (6, 6)
    expected = np.zeros((6, 6))
    expected[2:5, 0:2] = w1
    expected[5:6, 2:5] = w2
    expected = expected + expected.T
    np.testing.assert_array_equal(adj.toarray(), expected)
    assert adj.nnz == np.count_nonzero(expected)  # no explicit zeros
    assert adj.indices.dtype == np.int32


def test_weight_graph_mlp_symmetric_and_offsets():
    rng = np.random.default_rng(0)
    sizes = [20, 16, 16, 4]
    ws = [np.abs(rng.standard_normal((sizes[i + 1], sizes[i]))) for i in range(3)]
    adj = weight_graph(sizes, [(i, i + 1, w) for i, w in enumerate(ws)])
    dense = adj.toarray()
    np.testing.assert_array_equal(dense, dense.T)
    off = layer_offsets(sizes)
    for i, w in enumerate(ws):
        np.testing.assert_array_equal(dense[off[i + 1] : off[i + 2], off[i] : off[i + 1]], w)
    # no edges within a layer or between non-adjacent layers
    assert not dense[off[0] : off[1], off[0] : off[1]].any()
    assert not dense[off[0] : off[1], off[2] :].any()


def test_weight_graph_skip_block_and_sparse_input():
    a = np.array([[1.0, 2.0]])  # layer 0 (2 nodes) -> layer 2 (1 node)
    adj = weight_graph([2, 2, 1], [(0, 2, sp.csr_array(a))])
    dense = adj.toarray()
    assert dense[4, 0] == 1.0 and dense[0, 4] == 1.0 and dense[4, 1] == 2.0
    assert dense.sum() == 6.0


def test_weight_graph_equals_a_dense_reference_on_random_blocks_in_both_directions():
    """Blocks in either direction (i < j and i > j), skips, sparse blocks with duplicate entries
    (summed) and explicit zeros (dropped): equal to the dense matrix built block by block."""
    rng = np.random.default_rng(3)
    sizes = [7, 5, 9, 3, 6]
    off = layer_offsets(sizes)
    expected = np.zeros((off[-1], off[-1]))
    blocks = []
    for i, j in [(0, 1), (2, 1), (1, 3), (4, 0), (2, 4), (3, 2)]:
        a = np.abs(rng.standard_normal((sizes[j], sizes[i]))) * (rng.random((sizes[j], sizes[i])) < 0.6)
        if (i + j) % 2:
            r, c = np.nonzero(np.ones_like(a))
            split = rng.random(r.size)      # each entry as the sum of two duplicates, one of them zero
            vals = np.concatenate([a[r, c] * split, a[r, c] * (1 - split), np.zeros(3)])
            rr, cc = np.concatenate([r, r, r[:3]]), np.concatenate([c, c, c[:3]])
            blocks.append((i, j, sp.coo_array((vals, (rr, cc)), shape=a.shape)))
        else:
            blocks.append((i, j, a))
        expected[off[j]:off[j + 1], off[i]:off[i + 1]] += a
    expected += expected.T
    adj = weight_graph(sizes, blocks)
    np.testing.assert_allclose(adj.toarray(), expected, rtol=1e-15, atol=0)
    assert adj.nnz == np.count_nonzero(expected) and adj.indices.dtype == np.int32
    assert adj.has_canonical_format


def test_weight_graph_errors():
    good = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"block 1.*\(2, 2\).*\(1, 3\)"):
        weight_graph([2, 3, 1], [(0, 1, good), (1, 2, np.ones((2, 2)))])
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="block 0.*NaN"):
        weight_graph([2, 3], [(0, 1, bad)])
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="block 0"):
        weight_graph([2, 3], [(0, 1, bad)])
    with pytest.raises(ValueError, match="negative"):
        weight_graph([2, 3], [(0, 1, -good)])
    with pytest.raises(ValueError, match="within one layer"):
        weight_graph([2, 3], [(0, 0, np.ones((2, 2)))])
    with pytest.raises(ValueError, match="out of range"):
        weight_graph([2, 3], [(0, 2, good)])
    with pytest.raises(ValueError, match="already"):
        weight_graph([2, 3], [(0, 1, good), (1, 0, good.T)])


# ---------------------------------------------------------------- activation graph


def test_activation_graph_matches_scipy_spearman_with_ties():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 4))
    a[:, 1] = np.round(a[:, 1])  # many ties
    b = rng.integers(0, 3, size=(50, 3)).astype(float)  # heavy ties
    b[:, 0] = a[:, 0] ** 3 + 0.1 * rng.standard_normal(50)  # strongly related across layers
    adj = activation_graph([a, b])
    rho = spearmanr(np.concatenate([a, b], axis=1)).statistic
    expected = rho**2
    np.fill_diagonal(expected, 0.0)
    assert adj.shape == (7, 7) and adj.dtype == np.float64
    np.testing.assert_allclose(adj, expected, atol=1e-12)
    np.testing.assert_array_equal(np.diag(adj), 0.0)
    np.testing.assert_array_equal(adj, adj.T)
    assert adj[0, 4] > 0.8


def test_spearman_squared_cross():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((30, 2))
    got = spearman_squared(x, y)
    for i in range(3):
        for j in range(2):
            assert got[i, j] == pytest.approx(spearmanr(x[:, i], y[:, j]).statistic ** 2, abs=1e-12)


def test_activation_graph_constant_unit_gives_zero_edges():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 3))
    a[:, 2] = 7.0
    adj = activation_graph([a, rng.standard_normal((20, 2))])
    assert np.all(np.isfinite(adj))
    assert not adj[2].any() and not adj[:, 2].any()
    assert adj[0, 1] > 0 or adj[0, 3] > 0


def test_activation_graph_errors():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="at least 3 samples"):
        activation_graph([rng.standard_normal((2, 3))])
    with pytest.raises(ValueError, match=r"layers 0 and 1.*\(10, 3\).*\(9, 2\)"):
        activation_graph([rng.standard_normal((10, 3)), rng.standard_normal((9, 2))])
    bad = rng.standard_normal((10, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="layer 1.*NaN"):
        activation_graph([rng.standard_normal((10, 3)), bad])


# ---------------------------------------------------------------- n-cut


def test_ncut_hand_case():
    # path 0-1-2-3 with weights 1, 2, 3; clusters {0, 1} and {2, 3}
    adj = np.zeros((4, 4))
    for u, v, w in [(0, 1, 1.0), (1, 2, 2.0), (2, 3, 3.0)]:
        adj[u, v] = adj[v, u] = w
    labels = np.array([0, 0, 1, 1])
    # degrees 1, 3, 5, 3: vol A = 4, vol B = 8, cut = 2
    assert ncut(adj, labels) == pytest.approx(0.5 * (2 / 4 + 2 / 8))
    assert ncut(sp.csr_array(adj), labels) == pytest.approx(0.5 * (2 / 4 + 2 / 8))
    # networkx normalized_cut_size for two sets = cut/vol(A) + cut/vol(B) = 2 * ncut
    assert 2 * ncut(adj, labels) == pytest.approx(2 / 4 + 2 / 8)
    # one cluster: no cut
    assert ncut(adj, np.zeros(4, int)) == 0.0
    # per-layer label lists are concatenated
    assert ncut(adj, [np.array([0, 0]), np.array([1, 1])]) == pytest.approx(0.375)


def test_ncut_three_clusters_and_unclustered_nodes():
    rng = np.random.default_rng(5)
    adj = np.abs(rng.standard_normal((7, 7)))
    adj = adj + adj.T
    np.fill_diagonal(adj, 0)
    labels = np.array([0, 1, 2, 0, 1, 2, -1])
    # by hand, on the graph without node 6
    sub = adj[:6, :6]
    lab = labels[:6]
    deg = sub.sum(1)
    expected = 0.0
    for c in range(3):
        m = lab == c
        expected += sub[m][:, ~m].sum() / deg[m].sum()
    assert ncut(adj, labels) == pytest.approx(expected / 2)
    assert ncut(sp.csr_array(adj), labels) == pytest.approx(expected / 2)


def test_ncut_errors():
    with pytest.raises(ValueError):
        ncut(np.zeros((3, 3)), np.zeros(4, int))


def test_planted_partition_has_lower_ncut_than_random():
    rng = np.random.default_rng(6)
    truth = np.repeat(np.arange(4), 10)
    same = truth[:, None] == truth[None, :]
    adj = rng.uniform(size=(40, 40)) * np.where(same, 1.0, 0.05)
    adj = np.triu(adj, 1)
    adj = adj + adj.T
    planted = ncut(adj, truth)
    randoms = [ncut(adj, rng.permutation(truth)) for _ in range(20)]
    assert planted < min(randoms)


def test_weight_graph_peak_memory_is_close_to_its_output():
    """The symmetric CSR arrays are written in place: the peak of numpy allocations while building
    the graph stays within 1.4 times the returned matrix (the triple lists, their concatenation and
    the COO copy of the earlier assembly took twice its size)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    sizes = [400] * 5
    blocks = [(i, j, np.abs(rng.standard_normal((400, 400)))) for i in range(5) for j in range(i + 1, 5)]
    tracemalloc.start()
    try:
        adj = weight_graph(sizes, blocks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert adj.nnz == 2 * 10 * 400 * 400
    assert peak < 1.4 * (adj.data.nbytes + adj.indices.nbytes + adj.indptr.nbytes)


# ---------------------------------------------------------------- large graphs: no copies, one-line refusal


def _random_blocks(rng, n_layers, max_size=8, density=0.6):
    """Random non-negative blocks over random layer sizes, each unordered pair at most once, in either order."""
    sizes = rng.integers(1, max_size + 1, n_layers).tolist()
    blocks = []
    for i in range(n_layers):
        for j in range(i + 1, n_layers):
            if rng.random() < 0.7:
                a = np.abs(rng.standard_normal((sizes[j], sizes[i]))) * (rng.random((sizes[j], sizes[i])) < density)
                blocks.append((j, i, a.T.copy()) if rng.random() < 0.5 else (i, j, a))
    return sizes, blocks


def test_weight_share_of_graph_equals_weight_share_of_blocks():
    # the reference reads every edge block; the graph path reads the assembled graph a few entries at a time
    import modlens.core.weight_share as ws

    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(40):
        sizes, blocks = _random_blocks(rng, int(rng.integers(2, 7)))
        if not blocks:
            continue
        hidden = sorted(rng.choice(len(sizes), int(rng.integers(1, len(sizes) + 1)), replace=False).tolist())
        labels = [rng.integers(-1, 4, sizes[h]) for h in hidden]
        adj = weight_graph(sizes, blocks)
        want = ws.weight_share(blocks, labels, hidden)
        for chunk in (1, 5, ws.GRAPH_CHUNK):   # chunks that split rows of one layer, and the default
            got = ws.weight_share_of_graph(adj, sizes, labels, hidden, chunk=chunk)
            assert got["k"] == want["k"]
            for key in ("share", "expected", "uniform", "total"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-12, equal_nan=True)
        checked += not np.isnan(want["share"])
    assert checked > 10


def test_ncut_of_a_sparse_graph_makes_no_copy_of_it():
    # a large CNN's weight graph has 10^8 entries: the n-cut must not copy it (it ran out of memory in the
    # census); the answer is the one of the dense graph without the unclustered nodes
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 3000
    adj = sp.random_array((n, n), density=0.2, rng=rng, format="csr")
    adj = sp.csr_array(adj + adj.T)
    labels = rng.integers(-1, 5, n)
    tracemalloc.start()
    got = ncut(adj, labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < adj.data.nbytes / 4, f"ncut allocated {peak / 2**20:.1f} MiB for a {adj.data.nbytes / 2**20:.1f} MiB graph"
    keep = labels >= 0
    assert got == pytest.approx(ncut(adj.toarray()[np.ix_(keep, keep)], labels[keep]), rel=1e-12)


def test_a_weight_graph_too_large_for_memory_is_refused_in_one_line(monkeypatch):
    import modlens.core.graph as g

    sizes, blocks = [3, 4, 5], [(0, 1, np.ones((4, 3))), (1, 2, np.ones((5, 4)))]
    monkeypatch.setattr(g, "memory_available", lambda: 100)   # 100 bytes left
    with pytest.raises(MemoryError) as err:
        weight_graph(sizes, blocks)
    msg = str(err.value)
    assert isinstance(err.value, g.GraphTooLargeError) and "\n" not in msg
    assert "12 nodes and 32 edges" in msg and "GiB" in msg and "activations" in msg
    monkeypatch.setattr(g, "memory_available", lambda: 10**9)
    assert weight_graph(sizes, blocks).nnz == 64


def test_memory_available_reads_the_address_space_limit():
    import resource

    import modlens.core.graph as g

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * resource.getpagesize()
    limit = virtual + 2**30
    if hard != resource.RLIM_INFINITY and limit > hard:
        pytest.skip("the hard address-space limit is too low")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        room = g.memory_available()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert 0 < room <= 2**30
