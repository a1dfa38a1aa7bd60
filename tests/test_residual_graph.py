"""Tests for modlens.core.residual_graph: transformer MLP neurons joined through the residual stream."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from modlens.core.clustering import cluster_global
from modlens.core.graph import layer_offsets
from modlens.core.knn_graph import knn_sparsify
from modlens.core.residual_graph import MLPBlockWeights, residual_weight_graph


def loop_path(read, gamma, write, b, a):
    """|sum_d read[b, d] gamma[d] write[d, a]|, one residual dimension at a time."""
    total = 0.0
    for d in range(write.shape[0]):
        total += read[b, d] * (1.0 if gamma is None else gamma[d]) * write[d, a]
    return abs(total)


def random_blocks(rng, n_blocks, d_model, d_mlp, *, glu=False):
    return [
        MLPBlockWeights(
            w_in=rng.normal(size=(d_mlp, d_model)),
            w_out=rng.normal(size=(d_model, d_mlp)),
            gamma=rng.uniform(0.5, 2.0, size=d_model),
            w_gate=rng.normal(size=(d_mlp, d_model)) if glu else None,
        )
        for _ in range(n_blocks)
    ]


def test_hand_case_edges_inputs_outputs():
    rng = np.random.default_rng(0)
    d_model, d_mlp, n_in, n_cls = 4, 3, 5, 2
    blocks = random_blocks(rng, 3, d_model, d_mlp)
    emb, head, gf = rng.normal(size=(d_model, n_in)), rng.normal(size=(n_cls, d_model)), rng.uniform(0.5, 2, d_model)
    adj, sizes = residual_weight_graph(blocks, embedding=emb, head=head, final_gamma=gf, mode="dense")
    assert sizes == [n_in, d_mlp, d_mlp, d_mlp, n_cls]
    dense = adj.toarray()
    off = layer_offsets(sizes)
    np.testing.assert_array_equal(dense, dense.T)
    for j in range(3):  # embedding -> every block
        for b in range(d_mlp):
            for p in range(n_in):
                want = loop_path(blocks[j].w_in, blocks[j].gamma, emb, b, p)
                assert dense[off[1 + j] + b, off[0] + p] == pytest.approx(want, rel=1e-12)
    for i in range(3):
        for j in range(i + 1, 3):  # block i -> later block j
            for a in range(d_mlp):
                for b in range(d_mlp):
                    want = loop_path(blocks[j].w_in, blocks[j].gamma, blocks[i].w_out, b, a)
                    assert dense[off[1 + j] + b, off[1 + i] + a] == pytest.approx(want, rel=1e-12)
        for c in range(n_cls):  # block i -> head through the final norm
            for a in range(d_mlp):
                want = loop_path(head, gf, blocks[i].w_out, c, a)
                assert dense[off[4] + c, off[1 + i] + a] == pytest.approx(want, rel=1e-12)
        # no edges within a block, none from inputs to outputs
        assert not dense[off[1 + i] : off[2 + i], off[1 + i] : off[2 + i]].any()
    assert not dense[off[0] : off[1], off[4] :].any()

    first_last, _ = residual_weight_graph(
        blocks, embedding=emb, head=head, final_gamma=gf, mode="dense", input_edges="first", output_edges="last"
    )
    fl = first_last.toarray()
    assert fl[off[1] : off[2], : off[1]].any() and not fl[off[2] : off[4], : off[1]].any()
    assert fl[off[4] :, off[3] : off[4]].any() and not fl[off[4] :, off[1] : off[3]].any()
    np.testing.assert_array_equal(fl[off[1] : off[4], off[1] : off[4]], dense[off[1] : off[4], off[1] : off[4]])


def test_glu_pair_is_one_neuron_with_l1_over_its_read_paths():
    d_model = 2
    write = np.array([[1.0], [0.0]])  # block 0: one neuron writing +1 on dimension 0
    gate = np.array([[2.0, 0.0]])  # block 1's gate reads dimension 0 with +2
    value = np.array([[-3.0, 5.0]])  # its value unit reads dimension 0 with -3
    blocks = [
        MLPBlockWeights(w_in=np.ones((1, d_model)), w_out=write),
        MLPBlockWeights(w_in=value, w_out=np.ones((d_model, 1)), w_gate=gate, gamma=np.array([0.5, 1.0])),
    ]
    adj, sizes = residual_weight_graph(blocks, mode="dense")
    assert sizes == [1, 1]  # the gate/value pair is one node
    # |2 * 0.5 * 1| + |-3 * 0.5 * 1| = 2.5 (not |1 - 1.5| = 0.5)
    assert adj.toarray()[1, 0] == pytest.approx(2.5)
    rng = np.random.default_rng(1)
    glu = random_blocks(rng, 2, 5, 4, glu=True)
    got = residual_weight_graph(glu, mode="dense")[0].toarray()[4:, :4]
    want = np.array([[loop_path(glu[1].w_in, glu[1].gamma, glu[0].w_out, b, a)
                      + loop_path(glu[1].w_gate, glu[1].gamma, glu[0].w_out, b, a) for a in range(4)] for b in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("symmetrize", ["max", "mean"])
def test_knn_mode_equals_top_k_of_dense_graph(symmetrize):
    rng = np.random.default_rng(2)
    blocks = random_blocks(rng, 4, 6, 7, glu=True)
    kw = dict(embedding=rng.normal(size=(6, 3)), head=rng.normal(size=(2, 6)), final_gamma=rng.uniform(1, 2, 6))
    dense, sizes = residual_weight_graph(blocks, mode="dense", **kw)
    knn, sizes_knn = residual_weight_graph(blocks, mode="knn", k=5, symmetrize=symmetrize, **kw)
    assert sizes == sizes_knn
    np.testing.assert_allclose(knn.toarray(), knn_sparsify(dense, 5, symmetrize=symmetrize).toarray(), atol=1e-12)


def planted_transformer(rng, n_modules=4, sub=6, per_module=10, n_blocks=3, glu=False):
    """Module m's neurons in every block read and write only residual dimensions of subspace m."""
    d_model, d_mlp = n_modules * sub, n_modules * per_module
    dim_module = np.repeat(np.arange(n_modules), sub)
    unit_module = rng.permutation(np.repeat(np.arange(n_modules), per_module))
    mask_in = (unit_module[:, None] == dim_module[None, :]).astype(float)  # (d_mlp, d_model)
    blocks = [
        MLPBlockWeights(
            w_in=rng.normal(size=(d_mlp, d_model)) * mask_in,
            w_out=rng.normal(size=(d_model, d_mlp)) * mask_in.T,
            gamma=rng.uniform(0.5, 2.0, size=d_model),
            w_gate=rng.normal(size=(d_mlp, d_model)) * mask_in if glu else None,
        )
        for _ in range(n_blocks)
    ]
    return blocks, unit_module


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # the modules are components
@pytest.mark.parametrize("mode,glu", [("dense", False), ("knn", False), ("dense", True)])
def test_planted_transformer_graph_is_block_diagonal_and_clustering_recovers_modules(mode, glu):
    rng = np.random.default_rng(3)
    blocks, unit_module = planted_transformer(rng, glu=glu)
    adj, sizes = residual_weight_graph(blocks, mode=mode, k=8)
    truth = np.tile(unit_module, len(blocks))
    dense = adj.toarray()
    cross = truth[:, None] != truth[None, :]
    assert not dense[cross].any()  # block-diagonal across modules: exactly zero
    labels = np.concatenate(cluster_global(adj, sizes, 4, random_state=0))
    assert adjusted_rand_score(truth, labels) == 1.0


def test_shape_errors_name_the_block():
    rng = np.random.default_rng(4)
    blocks = random_blocks(rng, 2, 4, 3)
    bad = [blocks[0], MLPBlockWeights(w_in=np.ones((3, 5)), w_out=np.ones((4, 3)))]
    with pytest.raises(ValueError, match="block 1 w_in has shape"):
        residual_weight_graph(bad)
    with pytest.raises(ValueError, match="embedding has shape"):
        residual_weight_graph(blocks, embedding=np.ones((5, 2)))
    with pytest.raises(ValueError, match="input_edges"):
        residual_weight_graph(blocks, input_edges="some")


def test_stage_maps_too_large_for_memory_are_refused_in_one_line(monkeypatch):
    # the maps between stages compose into more taps with every boundary (nextvit_small: up to 1,936 per pair of
    # stages); what even one reader row at a time needs is counted from the shapes before any product is made,
    # and refused in one line
    import modlens.core.graph as g
    import modlens.core.residual_graph as rg

    rng = np.random.default_rng(0)
    widths = [4, 6, 8]
    blocks = [rg.MLPBlockWeights(rng.standard_normal((10, d)), rng.standard_normal((d, 10)), stage=s)
              for s, d in enumerate(widths) for _ in range(2)]
    maps = [rg.StageMap(rng.standard_normal((b, a, 3, 3)), (1, 1)) for a, b in zip(widths, widths[1:])]
    monkeypatch.setattr(rg, "memory_available", lambda: 1000)
    with pytest.raises(MemoryError) as err:
        list(rg.residual_edge_blocks(blocks, transitions=maps))
    msg = str(err.value)
    assert isinstance(err.value, g.GraphTooLargeError) and "\n" not in msg
    assert "3 stages" in msg and "25 taps" in msg and "activations" in msg   # two 3x3 maps compose into 5x5 taps
    monkeypatch.setattr(rg, "memory_available", lambda: 10**9)
    assert len(list(rg.residual_edge_blocks(blocks, transitions=maps))) == 15


def test_knn_graph_in_float32_products_equals_float64():
    """The kNN residual weight graph that `partition` builds above the dense size (float32 products)
    keeps the float64 graph's edges, with weights equal to float32 rounding."""
    rng = np.random.default_rng(21)
    blocks = random_blocks(rng, 4, 24, 96)
    g64, sizes = residual_weight_graph(blocks, mode="knn", k=12)
    g32, sizes32 = residual_weight_graph(blocks, mode="knn", k=12, dtype=np.float32)
    assert sizes == sizes32
    assert (g64 != 0).nnz == (g32 != 0).nnz and ((g64 != 0) != (g32 != 0)).nnz == 0
    np.testing.assert_allclose(g32.toarray(), g64.toarray(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_weight_share_from_recorded_sums_equals_full_blocks(dtype):
    # the fast path: pair totals recorded while the (kNN) graph is built, then only in-cluster products; the
    # reference: weight_share over every full neuron block (the plain path), on random models incl. stages
    from modlens.core.residual_graph import StageMap, residual_edge_blocks, residual_inside_sq
    from modlens.core.weight_share import weight_share, weight_share_of_sums

    rng = np.random.default_rng(11)
    for trial in range(8):
        glu = bool(trial % 2)
        if trial < 5:
            blocks = random_blocks(rng, int(rng.integers(2, 5)), 5, int(rng.integers(3, 9)), glu=glu)
            maps = ()
        else:   # two stages joined by a strided conv map
            widths = [3, 4]
            blocks = [MLPBlockWeights(rng.normal(size=(6, d)), rng.normal(size=(d, 6)), rng.uniform(0.5, 2, d),
                                      w_gate=rng.normal(size=(6, d)) if glu else None, stage=s)
                      for s, d in enumerate(widths) for _ in range(2)]
            maps = [StageMap(rng.normal(size=(4, 3, 2, 2)), (2, 2))]
        labels = [rng.integers(-1, 4, b.width) for b in blocks]
        if trial == 0:
            labels = [np.zeros(b.width, dtype=np.int64) for b in blocks]   # one cluster: inside == total
        want = weight_share(residual_edge_blocks(blocks, dtype=dtype, neurons_only=True, transitions=maps),
                            labels, list(range(len(blocks))))
        pair_sq: dict = {}
        head = rng.normal(size=(3, blocks[-1].w_out.shape[0]))
        emb = rng.normal(size=(blocks[0].w_out.shape[0], 4))
        residual_weight_graph(blocks, embedding=emb, head=head, mode="knn" if trial % 3 else "dense", k=3,
                              dtype=dtype, transitions=maps, pair_sq=pair_sq)
        assert sorted(pair_sq) == sorted((i, j) for j in range(len(blocks)) for i in range(j))
        inside = residual_inside_sq(blocks, labels, dtype=dtype, transitions=maps)
        got = weight_share_of_sums(pair_sq, inside, labels)
        rtol = 1e-12 if dtype == np.float64 else 1e-5
        for key in ("share", "expected", "total"):
            assert got[key] == pytest.approx(want[key], rel=rtol), (trial, key)
        assert got["k"] == want["k"] and got["uniform"] == want["uniform"]
        if trial == 0:
            assert got["share"] == pytest.approx(1.0)


def test_residual_inside_sq_checks_labels():
    from modlens.core.residual_graph import residual_inside_sq

    blocks = random_blocks(np.random.default_rng(0), 2, 4, 3)
    with pytest.raises(ValueError, match="block 1 has 3 neurons"):
        residual_inside_sq(blocks, [np.zeros(3, int), np.zeros(2, int)])
    with pytest.raises(ValueError, match="2 blocks but 1 label"):
        residual_inside_sq(blocks, [np.zeros(3, int)])
