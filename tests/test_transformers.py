"""Transformer MLP neurons (issue 11, docs/transformers.md): which units, weight graph, lesions."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from torch import nn

import modlens
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from planted import block_masks, planted_data
from tiny_transformers import TokenClassifier

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


def _np(t):
    return t.detach().double().numpy()


# ----- which units are neurons ---------------------------------------------------------------------
def test_mlp_units_are_the_neurons_and_attention_is_not_a_layer():
    m = TokenClassifier(n_blocks=3).eval()
    a = NetworkAdapter(m, torch.randn(4, 5, 6))
    assert a.is_transformer and a.capture_method == "export"
    assert a.layer_names == [f"blocks.{i}.mlp.fc1" for i in range(3)] and a.layer_sizes == [12] * 3
    # node layers: 6 embedding inputs, three MLPs, three classes
    assert a.node_layer_sizes() == [6, 12, 12, 12, 3] and a.hidden_node_layers() == [1, 2, 3]
    # the activation summary is the L1 norm over tokens of the pre-activation (input of GELU)
    x = torch.randn(7, 5, 6)
    acts = a.record([x])
    h = m.blocks[0].ln2(m.blocks[0].attn(m.blocks[0].ln1(m.embed(x) + m.pos)) + m.embed(x) + m.pos)
    np.testing.assert_allclose(acts[0], m.blocks[0].mlp.fc1(h).abs().sum(1).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_glu_gate_and_value_pair_into_one_neuron():
    torch.manual_seed(0)
    m = TokenClassifier(glu=True).double().eval()
    x = torch.randn(30, 5, 6, dtype=torch.float64)
    a = NetworkAdapter(m, x)
    assert a.layer_names == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"] and a.layer_sizes == [12, 12]
    # pre-activation = the gate's output (input of SiLU), per token then L1 over tokens
    b0 = m.blocks[0]
    s = m.embed(x) + m.pos
    s = s + b0.attn(b0.ln1(s))
    np.testing.assert_allclose(a.record([x])[0], b0.mlp.gate(b0.ln2(s)).abs().sum(1).detach().numpy(),
                               rtol=1e-10)
    # a lesion zeroes the product gate * value: same as zeroing the down map's column
    y = m(x).argmax(-1)
    counts = correct_counts_plain(a, 0, [[3]], x, y)
    with torch.no_grad():
        m.blocks[0].mlp.down.weight[:, 3] = 0
        m.blocks[0].mlp.up.weight[3] = 0  # and the value unit alone: the same lesion
        pred = m(x).argmax(-1)
    onehot = F.one_hot(y, 3).double()
    np.testing.assert_array_equal(counts[0], ((pred == y).double()[:, None] * onehot).sum(0).numpy())
    # the edge into a gated neuron is the L1 norm over its two read paths (hand computation)
    m2 = TokenClassifier(glu=True).double().eval()
    a2 = NetworkAdapter(m2, x)
    blocks = {(i, j): b for i, j, b in a2.weight_blocks()}
    b1, b0 = m2.blocks[1], m2.blocks[0]
    g = _np(b1.ln2.weight)
    want = np.abs(_np(b1.mlp.gate.weight) * g @ _np(b0.mlp.down.weight)) + \
        np.abs(_np(b1.mlp.up.weight) * g @ _np(b0.mlp.down.weight))
    np.testing.assert_allclose(blocks[(1, 2)], want, rtol=1e-12)


def test_residual_weight_graph_by_hand():
    m = TokenClassifier(n_blocks=2).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 2.0)  # non-trivial norm scales
    a = NetworkAdapter(m, torch.randn(4, 5, 6, dtype=torch.float64))
    blocks = {(i, j): b for i, j, b in a.weight_blocks()}
    assert set(blocks) == {(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)}
    b0, b1 = m.blocks
    g1 = _np(b1.ln2.weight)
    np.testing.assert_allclose(blocks[(1, 2)], np.abs(_np(b1.mlp.fc1.weight) @ np.diag(g1) @ _np(b0.mlp.fc2.weight)))
    np.testing.assert_allclose(blocks[(0, 1)], np.abs(_np(b0.mlp.fc1.weight) @ np.diag(_np(b0.ln2.weight))
                                                      @ _np(m.embed.weight)))
    np.testing.assert_allclose(blocks[(1, 3)], np.abs(_np(m.head.weight) @ np.diag(_np(m.norm.weight))
                                                      @ _np(b0.mlp.fc2.weight)))


# ----- lesions: incremental path == plain oracle ------------------------------------------------------
@pytest.mark.parametrize("glu", [False, True], ids=["gelu-layernorm", "swiglu-rmsnorm"])
def test_incremental_lesions_equal_the_plain_oracle(glu):
    torch.manual_seed(1)
    m = TokenClassifier(n_blocks=3, glu=glu).double().eval()
    x = torch.randn(120, 5, 6, dtype=torch.float64)
    y = m(x).argmax(-1)
    a = NetworkAdapter(m, x)
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer in range(3):  # a lesion in block 0 is recomputed through blocks 1-2's attention
        sets = [rng.choice(12, k, replace=False) for k in (1, 4, 6, 12)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
    assert changed >= 2


# ----- a planted-module transformer -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def planted_transformer(n_modules=4, per_module=4, mlp_per_module=12, n_blocks=2, tokens=3, epochs=30, seed=0,
                        dropout=0.3):
    """Tokens carry the planted features, with a random sign per sample, plus noise; module m reads
    input block m, owns residual dims, one attention head and MLP units per block, and writes only
    its own classes. Dropout makes each module robust to losing a few units (as in
    tests/planted.py). The sign makes the classes linearly inseparable from the embedding (the skip
    path): the MLPs' nonlinearity is needed, so lesions of a module's MLP units matter."""
    torch.manual_seed(seed)
    d, d_in, d_mlp = n_modules * per_module, n_modules * 6, n_modules * mlp_per_module
    m = TokenClassifier(d_in=d_in, d=d, d_mlp=d_mlp, n_blocks=n_blocks, n_classes=2 * n_modules, tokens=tokens)
    for b in m.blocks:
        b.attn.heads = n_modules
        b.mlp.act = nn.Sequential(nn.GELU(), nn.Dropout(dropout))
    with torch.no_grad():
        m.pos.zero_()
    m.pos.requires_grad_(False)
    mask = lambda out, inp: block_masks([inp, out], n_modules)[0]  # noqa: E731
    masked = [(m.embed, mask(d, d_in)), (m.head, mask(2 * n_modules, d))]
    for b in m.blocks:
        masked += [(lin, mask(d, d)) for lin in (b.attn.q, b.attn.k, b.attn.v, b.attn.o)]
        masked += [(b.mlp.fc1, mask(d_mlp, d)), (b.mlp.fc2, mask(d, d_mlp))]

    def apply():
        with torch.no_grad():
            for lin, mk in masked:
                lin.weight.mul_(mk)

    def tokens_of(x, s):
        g = torch.Generator().manual_seed(s)
        sign = torch.randint(0, 2, (x.shape[0], 1, 1), generator=g) * 2.0 - 1
        return sign * x[:, None, :] + 0.3 * torch.randn(x.shape[0], tokens, x.shape[1], generator=g)

    x, y = planted_data(1500, seed=seed)
    x = tokens_of(x, 100 + seed)
    apply()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    m.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 100):
            idx = perm[s:s + 100]
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
            apply()
    m.eval()
    groups = [np.repeat(np.arange(n_modules), mlp_per_module) for _ in range(n_blocks)]
    test = planted_data(600, seed=1)
    held = planted_data(300, seed=2)[0]
    return m, groups, (tokens_of(test[0], 1), test[1]), tokens_of(held, 2)


def test_planted_transformer_modules_are_recovered_and_detected():
    model, groups, test, held = planted_transformer()
    with torch.no_grad():
        assert (model(test[0]).argmax(-1) == test[1]).float().mean() > 0.9
    part = modlens.partition(model, "weights/global", n_clusters=4, data=held, random_state=0)
    assert len(part.labels) == 2
    for labels, truth in zip(part.labels, groups):
        assert adjusted_rand_score(truth, labels) == 1.0
    # 8 subclusters: 99 random sets each, so that p < 1e-4 is reachable (Fisher over 8 p >= 0.01)
    res = modlens.analyze(model, test, activation_data=held, n_clusters=4, random_state=0, n_random=99,
                          partitionings=["weights/global"])
    row = res.summary.set_index(["partitioning", "metric"]).loc[("weights/global", "acc_drop")]
    assert row["n_subclusters"] == 8
    assert row["p_value"] < 1e-4 and row["significant"]


# ----- Hugging Face models, nothing downloaded -------------------------------------------------------
def _tiny_vit():
    t = transformers
    torch.manual_seed(0)
    cfg = t.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=16, num_labels=3)
    return t.ViTForImageClassification(cfg).eval()


def _tiny_bert():
    t = transformers
    torch.manual_seed(0)
    cfg = t.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                       max_position_embeddings=16, num_labels=3)
    return t.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_hugging_face_transformers_through_partition_and_analyze(kind):
    if kind == "vit":
        model, name = _tiny_vit(), "pixel_values"
        x = torch.randn(48, 3, 16, 16)
        sizes = [3 * 8 * 8, 16, 16, 3]   # patch pixels x colours, two MLPs, classes
    else:
        model, name = _tiny_bert(), "input_ids"
        x = torch.randint(0, 30, (48, 6))
        sizes = [30, 16, 16, 3]          # vocabulary, two MLPs, classes (through the pooler)
    with torch.no_grad():
        y = model(**{name: x}).logits.argmax(-1)
    a = NetworkAdapter(model, x, input_name=name)
    assert a.is_transformer and a.layer_sizes == [16, 16] and a.node_layer_sizes() == sizes
    ev = IncrementalLesions(a, x, y)
    sets = [np.arange(4), np.arange(8, 16)]
    for layer in range(2):
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y))
    for method in ("weights/global", "weights/local", "activations/global", "activations/local"):
        p = modlens.partition(model, method, n_clusters=3, data=x, input_name=name)
        assert [len(l) for l in p.labels] == [16, 16]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = modlens.analyze(model, (x, y), activation_data=x, n_clusters=3, n_random=3, input_name=name,
                              partitionings=["weights/global"], feature_vis=True,
                              vis_options={"steps": 2})
    assert set(res.summary["partitioning"]) == {"weights/global"}
    skipped = [str(w.message) for w in caught if "feature visualization" in str(w.message).lower()]
    if kind == "bert":
        assert len(skipped) == 1 and "token ids" in skipped[0]
    else:
        assert res.visualizations is not None and len(res.visualizations)


def test_weight_share_is_read_from_the_weight_graph_not_recomputed(monkeypatch):
    # the dense residual weight graph holds every edge between MLP neurons: the share of squared weight inside
    # clusters is read from it, not from the edge blocks computed a second time (30 s of tiny_vit_5m's weights
    # stage); the answer is the one of the edge blocks
    import modlens.experiments.partitioning as partitioning
    from modlens.core.residual_graph import residual_edge_blocks
    from modlens.core.weight_share import weight_share
    from modlens.experiments.partitioning import Partitioner

    torch.manual_seed(0)
    m = TokenClassifier(n_blocks=4, glu=True).eval()
    a = NetworkAdapter(m, torch.randn(4, 5, 6))
    p = Partitioner(a, n_clusters=3)
    parts = a.residual_parts()
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("neurons_only", False))
        return residual_edge_blocks(*args, **kwargs)

    monkeypatch.setattr(partitioning, "residual_weight_share",
                        lambda *args: pytest.fail("the edge blocks were computed again for the weight share"))
    monkeypatch.setattr("modlens.core.residual_graph.residual_edge_blocks", counted)
    part = p.partition("weights/global")
    assert calls == [False]                     # the graph's one pass over the edge blocks
    got = part.info["weight_share"]
    want = weight_share(residual_edge_blocks(parts["blocks"], neurons_only=True), part.labels, list(range(4)))
    for key in ("share", "expected", "uniform", "total", "k"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_knn_weight_share_reads_the_blocks_kept_from_the_graphs_pass(monkeypatch, budget):
    # above the dense size the graph keeps each node's k heaviest edges only, so the weight share needs every
    # block again: they are kept from the graph's pass when they fit (KEEP_BLOCKS_BYTES), else made again; the
    # answer is the one of the blocks made again (float32, as the kNN path makes them)
    import modlens.experiments.partitioning as partitioning
    from modlens.core.residual_graph import residual_edge_blocks
    from modlens.core.weight_share import weight_share
    from modlens.experiments.partitioning import Partitioner

    torch.manual_seed(0)
    m = TokenClassifier(n_blocks=4, glu=True).eval()
    a = NetworkAdapter(m, torch.randn(4, 5, 6))
    parts = a.residual_parts()
    again = []
    recompute = partitioning.residual_weight_share
    monkeypatch.setattr(partitioning, "choose_graph_mode", lambda *args, **kwargs: "knn")
    monkeypatch.setattr(partitioning, "KEEP_BLOCKS_BYTES", budget)
    monkeypatch.setattr(partitioning, "residual_weight_share", lambda *args: again.append(1) or recompute(*args))
    part = Partitioner(a, n_clusters=3).partition("weights/global")
    assert again == ([] if budget else [1])
    got = part.info["weight_share"]
    want = weight_share(residual_edge_blocks(parts["blocks"], neurons_only=True, dtype=np.float32), part.labels,
                        list(range(4)))
    for key in ("share", "expected", "uniform", "total", "k"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)


def test_weight_share_on_a_knn_graph_takes_the_graphs_pair_sums(monkeypatch):
    # a kNN weight graph does not hold every edge: the block pairs' sums of squares are recorded while it is
    # built and only the edges inside clusters are computed again (residual_inside_sq); the answer is the one
    # of the full float32 edge blocks (the plain path), up to float32 rounding
    import modlens.core.residual_graph as rg
    import modlens.experiments.partitioning as partitioning
    from modlens.core.weight_share import weight_share
    from modlens.experiments.partitioning import Partitioner

    knn = lambda n, mode="auto", **kw: "knn"   # noqa: E731 - the graph of this tiny model as a large one's
    monkeypatch.setattr(partitioning, "choose_graph_mode", knn)
    monkeypatch.setattr(rg, "choose_graph_mode", knn)
    monkeypatch.setattr(partitioning, "DENSE_MAX_NODES", 0)
    monkeypatch.setattr(partitioning, "KEEP_BLOCKS_BYTES", 0)   # blocks not kept: the recorded pair sums serve
    torch.manual_seed(0)
    m = TokenClassifier(n_blocks=4, glu=True).eval()
    a = NetworkAdapter(m, torch.randn(4, 5, 6))
    parts = a.residual_parts()
    calls = []
    plain = rg.residual_edge_blocks

    def counted(*args, **kwargs):
        calls.append(kwargs.get("neurons_only", False))
        return plain(*args, **kwargs)

    monkeypatch.setattr(rg, "residual_edge_blocks", counted)
    monkeypatch.setattr("modlens.experiments.token_graphs.residual_edge_blocks", counted)
    part = Partitioner(a, n_clusters=3).partition("weights/global")
    assert calls == [False]                     # the graph's one pass over the edge blocks
    got = part.info["weight_share"]
    want = weight_share(plain(parts["blocks"], neurons_only=True, dtype=np.float32), part.labels, list(range(4)))
    for key in ("share", "expected", "uniform", "total", "k"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    assert 0 < got["share"] < 1
