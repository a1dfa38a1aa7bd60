"""Hierarchical vision transformers (Swin, Swin-V2, PVT-v2, SegFormer; docs/transformers.md, "Stages"):
every stage's MLP units are neuron layers, a Mix-FFN's units are read through their depthwise conv,
the weight graph joins stages through the downsampling map (patch merging, strided conv) composed as
convolutions compose, and the incremental lesion engine equals the plain oracle on every layer
(float64). Tiny Hugging Face configs with random weights: nothing is downloaded."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modlens
from modlens.core.residual_graph import MLPBlockWeights, StageMap, residual_edge_blocks
from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")

SIZE = 32


def make(family: str):
    t = transformers
    torch.manual_seed(0)
    common = dict(image_size=SIZE, num_labels=3, initializer_range=0.2)
    if family == "swin":
        cfg = t.SwinConfig(patch_size=2, embed_dim=8, depths=[1, 2, 1], num_heads=[1, 2, 2], window_size=4,
                           mlp_ratio=2.0, **common)
        return t.SwinForImageClassification(cfg)
    if family == "swinv2":
        cfg = t.Swinv2Config(patch_size=2, embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=4,
                             mlp_ratio=2.0, **common)
        return t.Swinv2ForImageClassification(cfg)
    if family == "pvt":   # PVT (v1): plain MLPs, non-overlapping strided conv patch embeddings, a class token at the end
        cfg = t.PvtConfig(num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[8, 16], sequence_reduction_ratios=[2, 1],
                          num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[4, 2], strides=[4, 2], **common)
        return t.PvtForImageClassification(cfg)
    kw = dict(num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[8, 16], sr_ratios=[2, 1],
              num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[3, 3], strides=[2, 2], **common)
    if family == "pvt_v2":
        return t.PvtV2ForImageClassification(t.PvtV2Config(**kw))
    if family == "segformer":
        return t.SegformerForImageClassification(t.SegformerConfig(decoder_hidden_size=16, **kw))
    raise AssertionError(family)


FAMILIES = ["swin", "swinv2", "pvt", "pvt_v2", "segformer"]


def _np(t):
    return t.detach().double().numpy()


def _data(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return x, model(pixel_values=x).logits.argmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_engine_equals_plain_oracle_on_every_stage(family):
    model = make(family).double().eval()
    x, _ = _data(model, 32, 1)
    with torch.no_grad():  # centre the logits so that random inputs get varied predictions
        model.classifier.bias -= model(pixel_values=x).logits.mean(0)
    x, y = _data(model, 32, 1)
    assert len(y.unique()) > 1
    a = NetworkAdapter(model, x[:2], input_name="pixel_values")
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 3, width // 2)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1
    # a random partition of every layer into 2 clusters reaches every layer: each cluster lesioned alone
    labels = [rng.integers(0, 2, size=w) for w in a.layer_sizes]
    for layer, lab in enumerate(labels):
        sets = [np.flatnonzero(lab == c) for c in (0, 1)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y))


def test_swin_every_stage_is_a_stream_and_patch_merging_joins_them():
    model = make("swin").eval()
    a = NetworkAdapter(model, _data(model, 2, 0)[0], input_name="pixel_values")
    layers = model.swin.encoder.layers
    blocks = [blk for stage in layers for blk in stage.blocks]
    assert a.layer_names == [f"swin.encoder.layers.{s}.blocks.{b}.mlp.fc1" for s, n in enumerate([1, 2, 1])
                             for b in range(n)]
    assert a.layer_sizes == [16, 32, 32, 64]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1, 1, 2]
    assert [t.kernel.shape for t in parts["transitions"]] == [(16, 8, 1, 4), (32, 16, 1, 4)]

    def taps(stage):  # the reduction over the concatenation of 4 neighbours, its norm's gamma folded in
        ds = layers[stage].downsample
        w = _np(ds.reduction.weight) * _np(ds.norm.weight)[None, :]
        c = w.shape[1] // 4
        return [w[:, k * c:(k + 1) * c] for k in range(4)]

    def read(j):
        return _np(blocks[j].mlp.fc1.weight) * _np(blocks[j].layernorm_after.weight)[None, :]

    def write(i):
        return _np(blocks[i].mlp.fc2.weight)

    got = {(i, j): blk for i, j, blk in a.weight_blocks()}
    first = 1  # the patch embedding's input nodes come first
    # within a stage: the single-width edge
    np.testing.assert_allclose(got[(first + 1, first + 2)], np.abs(read(2) @ write(1)))
    # across one boundary: the L1 norm over the 4 neighbours
    np.testing.assert_allclose(got[(first + 0, first + 1)], sum(np.abs(read(1) @ m @ write(0)) for m in taps(0)))
    # across two: over the 16 positions of the composed 4x4 patch
    want = sum(np.abs(read(3) @ m2 @ m1 @ write(0)) for m1 in taps(0) for m2 in taps(1))
    np.testing.assert_allclose(got[(first + 0, first + 3)], want)
    # the signed sum over the neighbours would be a different (smaller) graph
    assert not np.allclose(want, np.abs(read(3) @ sum(taps(1)) @ sum(taps(0)) @ write(0)))
    # the embedding (its norm's gamma folded in) writes into stage 0; the head reads the last stage
    emb = model.swin.embeddings
    e = _np(emb.patch_embeddings.projection.weight).reshape(8, -1) * _np(emb.norm.weight)[:, None]
    np.testing.assert_allclose(got[(0, first + 1)], sum(np.abs(read(1) @ m @ e) for m in taps(0)))
    h = _np(model.classifier.weight) * _np(model.swin.layernorm.weight)[None, :]
    np.testing.assert_allclose(got[(first + 3, first + 4)], np.abs(h @ write(3)))
    np.testing.assert_allclose(got[(first + 1, first + 4)], sum(np.abs(h @ m @ write(1)) for m in taps(1)))
    assert a.node_layer_sizes() == [12, 16, 32, 32, 64, 3]


def test_swin_v2_folds_the_post_norm_into_what_a_block_writes():
    model = make("swinv2").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 2.0)
    a = NetworkAdapter(model, _data(model, 2, 0)[0], input_name="pixel_values")
    blocks = [blk for stage in model.swinv2.encoder.layers for blk in stage.blocks]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1, 1]
    for blk, b in zip(blocks, parts["blocks"]):  # res-post-norm: x + norm(mlp(x)); the MLP reads x unnormalized
        np.testing.assert_allclose(b.w_out, _np(blk.output.dense.weight) * _np(blk.layernorm_after.weight)[:, None])
        assert b.gamma is None
    ds = model.swinv2.encoder.layers[0].downsample  # Swin-V2 merges: reduction, then norm
    w = _np(ds.reduction.weight) * _np(ds.norm.weight)[:, None]
    np.testing.assert_allclose(parts["transitions"][0].kernel[:, :, 0, :], w.reshape(16, 4, 8).transpose(0, 2, 1))


@pytest.mark.parametrize("family", ["pvt_v2", "segformer"])
def test_mix_ffn_units_are_one_layer_read_through_the_depthwise_conv(family):
    model = make(family).eval()
    x = _data(model, 3, 0)[0]
    a = NetworkAdapter(model, x[:2], input_name="pixel_values")
    if family == "pvt_v2":
        stages = model.pvt_v2.encoder.layers
        fc1, fc2, act, norm2 = "dense1", "dense2", "intermediate_act_fn", "layer_norm_2"
        prefix = "pvt_v2.encoder.layers.{s}.blocks.{b}.mlp.dense1"
    else:
        stages = model.segformer.stages
        fc1, fc2, act, norm2 = "fc1", "fc2", "activation_fn", "layernorm_after"
        prefix = "segformer.stages.{s}.blocks.{b}.mlp.fc1"
    blocks = [blk for stage in stages for blk in stage.blocks]
    prefix = [prefix.format(s=s, b=b) for s, n in enumerate([1, 2]) for b in range(n)]
    assert a.layer_names == prefix
    assert a.layer_sizes == [16, 32, 32]
    # the pre-activation is the GELU's input: after the depthwise conv, back in the tokens' layout
    seen = []
    hooks = [getattr(blk.mlp, act).register_forward_pre_hook(lambda m, args: seen.append(args[0])) for blk in blocks]
    with torch.no_grad():
        model(pixel_values=x)
        got = a.values()(x)
    for h in hooks:
        h.remove()
    for s, v in zip(seen, got):
        torch.testing.assert_close(v, s.transpose(1, 2))
    # weights: each unit's read row scaled by its spatial filter's L1 norm
    parts = a.residual_parts()
    for blk, b in zip(blocks, parts["blocks"]):
        l1 = _np(blk.mlp.dwconv.dwconv.weight).reshape(b.width, -1).__abs__().sum(1)
        np.testing.assert_allclose(b.w_in, _np(getattr(blk.mlp, fc1).weight) * l1[:, None])
        np.testing.assert_allclose(b.gamma, _np(getattr(blk, norm2).weight))
        np.testing.assert_allclose(b.w_out, _np(getattr(blk.mlp, fc2).weight))
    # the stage boundary: the strided conv, the stage's final norm scaling its input channels and the
    # patch embedding's norm its output channels
    embed = stages[1].patch_embedding if family == "pvt_v2" else stages[1].patch_embeddings
    end_norm, proj, embed_norm = stages[0].layer_norm, embed.proj, embed.layer_norm
    k = _np(proj.weight) * _np(end_norm.weight)[None, :, None, None] * _np(embed_norm.weight)[:, None, None, None]
    (t,) = parts["transitions"]
    np.testing.assert_allclose(t.kernel, k)
    assert t.stride == (2, 2)
    reads = [b.w_in * b.gamma[None, :] for b in parts["blocks"]]
    got = {(i, j): blk for i, j, blk in a.weight_blocks()}
    want = sum(np.abs(reads[1] @ k[:, :, p, q] @ parts["blocks"][0].w_out) for p in range(3) for q in range(3))
    np.testing.assert_allclose(got[(1, 2)], want)
    np.testing.assert_allclose(got[(2, 3)], np.abs(reads[2] @ parts["blocks"][1].w_out))


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_partition_without_data_covers_every_stage(family):
    model = make(family).eval()
    part = modlens.partition(model, "weights/global", n_clusters=2, input_name="pixel_values", random_state=0)
    a = NetworkAdapter(model, _data(model, 2, 0)[0], input_name="pixel_values")
    assert list(part.layer_names) == a.layer_names
    assert [len(l) for l in part.labels] == a.layer_sizes
    same = modlens.partition(a, "weights/global", n_clusters=2, random_state=0)
    for l1, l2 in zip(part.labels, same.labels):
        np.testing.assert_array_equal(l1, l2)


def _impulse_paths(kernels, strides, reads, write):
    """The composed map of strided convs, read off by pushing every input position through them."""
    d0 = kernels[0].shape[1]
    span = 1
    for k, s in zip(kernels[::-1], strides[::-1]):
        span = (span - 1) * s + k.shape[2]
    total = 0
    for y in range(span):
        for x in range(span):
            v = torch.zeros(d0, d0, span, span, dtype=torch.float64)
            v[torch.arange(d0), torch.arange(d0), y, x] = 1.0
            for k, s in zip(kernels, strides):
                v = F.conv2d(v, torch.from_numpy(k), stride=s)
            tap = v[:, :, 0, 0].T.numpy()                      # (d_last, d0): this position's map
            total = total + np.abs(reads @ tap @ write)
    return total


def test_overlapping_downsamples_compose_as_convolutions():
    rng = np.random.default_rng(0)
    widths, m = [3, 4, 5], 6
    kernels = [rng.normal(size=(widths[1], widths[0], 3, 3)), rng.normal(size=(widths[2], widths[1], 3, 3))]
    blocks = [MLPBlockWeights(rng.normal(size=(m, d)), rng.normal(size=(d, m)), rng.uniform(0.5, 2, d), stage=s)
              for s, d in enumerate(widths)]
    maps = [StageMap(k, (2, 2)) for k in kernels]
    got = {(i, j): a for i, j, a in residual_edge_blocks(blocks, transitions=maps)}
    reads = [b.w_in * b.gamma[None, :] for b in blocks]
    # 3x3 taps of stride 2 twice: a 7x7 composed kernel whose overlapping taps add before |.|
    np.testing.assert_allclose(got[(0, 2)], _impulse_paths(kernels, [2, 2], reads[2], blocks[0].w_out))
    np.testing.assert_allclose(got[(0, 1)], _impulse_paths(kernels[:1], [2], reads[1], blocks[0].w_out))
    np.testing.assert_allclose(got[(1, 2)], _impulse_paths(kernels[1:], [2], reads[2], blocks[1].w_out))


def test_stage_inputs_are_checked():
    rng = np.random.default_rng(0)
    b0 = MLPBlockWeights(rng.normal(size=(6, 3)), rng.normal(size=(3, 6)))
    b1 = MLPBlockWeights(rng.normal(size=(6, 4)), rng.normal(size=(4, 6)), stage=1)
    with pytest.raises(ValueError, match="2 stages need 1 transitions"):
        list(residual_edge_blocks([b0, b1]))
    with pytest.raises(ValueError, match=r"transition 0 has kernel shape \(4, 4, 2, 2\); expected \(4, 3, kh, kw\)"):
        list(residual_edge_blocks([b0, b1], transitions=[StageMap(np.ones((4, 4, 2, 2)), (2, 2))]))
    with pytest.raises(ValueError, match="block stages must start at 0"):
        list(residual_edge_blocks([b1]))


class TwoMapsBetweenStages(nn.Module):
    """Two stages whose streams are joined by two Linear maps in a row: not one downsampling layer."""

    def __init__(self, d0=4, d1=6):  # down1 reads pairs of tokens: 2 * d0 features
        super().__init__()
        self.embed = nn.Linear(5, d0)
        self.n0, self.fc1a, self.fc2a = nn.LayerNorm(d0), nn.Linear(d0, 8), nn.Linear(8, d0)
        self.q0 = nn.Linear(d0, d0)
        self.down1, self.down2 = nn.Linear(2 * d0, d1), nn.Linear(d1, d1)
        self.n1, self.fc1b, self.fc2b = nn.LayerNorm(d1), nn.Linear(d1, 8), nn.Linear(8, d1)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + F.scaled_dot_product_attention(self.q0(x), x, x)
        x = x + self.fc2a(F.gelu(self.fc1a(self.n0(x))))
        b, t, d = x.shape
        x = self.down2(self.down1(x.reshape(b, t // 2, 2 * d)))
        x = x + self.fc2b(F.gelu(self.fc1b(self.n1(x))))
        return self.head(x.mean(1))


def test_a_stage_boundary_that_is_not_one_downsampling_layer_is_refused_in_one_line():
    a = NetworkAdapter(TwoMapsBetweenStages().eval(), torch.randn(2, 8, 5))
    assert a.layer_names == ["fc1a", "fc1b"]
    with pytest.raises(UnsupportedModelError, match="between the MLPs 'fc1a' .* through the layers down1, down2 in a row, which map 8 to 6 channels") as err:
        a.residual_parts()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["swin", "pvt_v2"])
def test_analyze_runs_every_method_and_leaves_the_model_as_it_was(family):
    from modlens.experiments.partitioning import METHODS
    from test_capture_hf import _assert_unchanged, _snapshot

    model = make(family).eval()
    x0, _ = _data(model, 24, 3)
    with torch.no_grad():
        model.classifier.bias -= model(pixel_values=x0).logits.mean(0)
    test, (held, _) = _data(model, 24, 1), _data(model, 24, 2)
    model.train()
    snap = _snapshot(model)
    res = modlens.analyze(model, test, activation_data=held, input_name="pixel_values", n_clusters=2, n_random=2,
                          partitionings=list(METHODS), feature_vis=True, vis_options={"steps": 2}, random_state=0)
    assert set(res.summary["partitioning"]) == set(METHODS)
    assert {"acc_drop", "vis_score"} <= set(res.summary["metric"])
    assert len(res.config["layers"]) == len(NetworkAdapter(model.eval(), held[:2], input_name="pixel_values").layers)
    model.train()
    _assert_unchanged(model, snap)


def test_pvt_v1_patch_embedding_conv_is_the_transition():
    model = make("pvt").eval()
    a = NetworkAdapter(model, _data(model, 2, 0)[0], input_name="pixel_values")
    assert a.layer_names == ["pvt.encoder.block.0.0.mlp.dense1", "pvt.encoder.block.1.0.mlp.dense1",
                             "pvt.encoder.block.1.1.mlp.dense1"]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1, 1]
    embed = model.pvt.encoder.patch_embeddings[1]   # no norm closes stage 0; the embedding's norm scales the rows
    (t,) = parts["transitions"]
    np.testing.assert_allclose(t.kernel, _np(embed.projection.weight) * _np(embed.layer_norm.weight)[:, None, None, None])
    assert t.stride == (2, 2)


class PooledStages(nn.Module):
    """Two stages of a (B, T, C) stream on a 4x4 then 2x2 grid, joined by a 2x2 average pool and a 1x1 conv
    (MaxViT's shortcut); attention biased by a table computed from parameters with einsum (a constant)."""

    def __init__(self, d0=4, d1=8, hidden=8, pool=(2, 2, 0)):
        super().__init__()
        self.embed = nn.Conv2d(3, d0, 2, stride=2)
        self.q0, self.q1 = nn.Linear(d0, d0), nn.Linear(d1, d1)
        self.bias_a, self.bias_b = nn.Parameter(torch.randn(16, 3)), nn.Parameter(torch.randn(3, 16))
        self.n0, self.fc1a, self.fc2a = nn.LayerNorm(d0), nn.Linear(d0, hidden), nn.Linear(hidden, d0)
        size, stride, pad = pool   # torchvision's MaxViT: (3, 2, 1), overlapping and padded
        self.pool, self.expand = nn.AvgPool2d(size, stride, pad), nn.Conv2d(d0, d1, 1)
        self.n1, self.fc1b, self.fc2b = nn.LayerNorm(d1), nn.Linear(d1, hidden), nn.Linear(hidden, d1)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)                            # (B, 16, d0)
        bias = torch.einsum("ik,kj->ij", self.bias_a, self.bias_b)
        x = x + F.scaled_dot_product_attention(self.q0(x), x, x, attn_mask=bias)
        x = x + self.fc2a(F.gelu(self.fc1a(self.n0(x))))
        b, t, d = x.shape
        x = self.expand(self.pool(x.transpose(1, 2).reshape(b, d, 4, 4))).flatten(2).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(self.q1(x), x, x)
        x = x + self.fc2b(F.gelu(self.fc1b(self.n1(x))))
        return self.head(x.mean(1))


@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1)])
def test_an_average_pool_before_a_1x1_conv_is_one_strided_kernel_and_lesions_equal_the_oracle(pool):
    torch.manual_seed(0)
    model = PooledStages(pool=pool).double().eval()
    size = pool[0]
    x = torch.randn(48, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model.head.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    a = NetworkAdapter(model, x[:2])
    assert a.layer_names == ["fc1a", "fc1b"]
    parts = a.residual_parts()
    (t,) = parts["transitions"]
    np.testing.assert_allclose(t.kernel, np.tile(_np(model.expand.weight), (1, 1, size, size)) / size ** 2)
    assert t.stride == (2, 2)
    got = {(i, j): blk for i, j, blk in a.weight_blocks()}
    read = _np(model.fc1b.weight) * _np(model.n1.weight)[None, :]
    w = _np(model.expand.weight)[:, :, 0, 0] / size ** 2
    np.testing.assert_allclose(got[(1, 2)], size ** 2 * np.abs(read @ w @ _np(model.fc2a.weight)))
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 2, width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_streams_of_one_width_without_a_single_downsampling_layer_stay_one_stream():
    # as before stages existed (an encoder's stream and a decoder's): no transition, one stage
    a = NetworkAdapter(TwoMapsBetweenStages(d0=4, d1=4).eval(), torch.randn(2, 8, 5))
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 0]
    assert parts["transitions"] == []


@pytest.mark.parametrize("budget", [None, 64, 1])
def test_nextvit_like_maps_compose_backwards_to_the_impulse_paths(monkeypatch, budget):
    # NextViT's boundaries: an average pool before a 1x1 conv (2x2 equal taps of stride 2, pushed: one product
    # times 4), a 3x3 map whose off-centre taps reach only the last rows (the conv branch beside the copied
    # channels), a 1x1 map; composed backwards from each reader in row chunks of `budget` bytes (1: one row at a
    # time, the chunks composed again for every stage), equal to the map read off by pushing impulses through
    import modlens.core.residual_graph as rg

    rng = np.random.default_rng(1)
    widths, m = [3, 4, 6, 5, 6], 5
    pooled = rng.normal(size=(4, 3))
    branch = rng.normal(size=(6, 4, 3, 3))
    branch[:4, :, :, :] = 0
    branch[:, :, 1, 1] = rng.normal(size=(6, 4))
    kernels = [np.repeat(np.repeat(pooled[:, :, None, None], 2, 2), 2, 3) / 4, branch,
               rng.normal(size=(5, 6, 1, 1)), rng.normal(size=(6, 5, 3, 3))]
    strides = [2, 1, 1, 1]
    blocks = [MLPBlockWeights(rng.normal(size=(m, d)), rng.normal(size=(d, m)), rng.uniform(0.5, 2, d), stage=s)
              for s, d in enumerate(widths)]
    maps = [StageMap(k, (s, s)) for k, s in zip(kernels, strides)]
    if budget is not None:
        monkeypatch.setattr(rg, "SWEEP_BYTES", budget)
    got = {(i, j): a for i, j, a in residual_edge_blocks(blocks, transitions=maps)}
    reads = [b.w_in * b.gamma[None, :] for b in blocks]
    for i in range(len(blocks)):
        for j in range(i + 1, len(blocks)):
            want = _impulse_paths(kernels[i:j], strides[i:j], reads[j], blocks[i].w_out)
            np.testing.assert_allclose(got[(i, j)], want, rtol=1e-10, atol=1e-12)
