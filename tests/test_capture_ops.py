"""Issue 8: capture (export, outputs, keyword inputs, shape errors), the new operation families
(grouped/depthwise conv, LayerNorm/GroupNorm/RMSNorm, gates, layer scale, channels-last Linear,
activations), the incremental engine against the plain oracle on each, and batch-norm folding
(issue 10, row 3)."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from torch import nn

import modlens
from modlens.nn._bn import bn_scale
from modlens.nn._fx import ModelTraceError
from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from planted import block_masks, planted_data
from test_cnn_models import planted_images

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


# ----- small models of each family ----------------------------------------------------------------
class DepthwiseSeparable(nn.Module):
    """MobileNet-style: conv, depthwise 3x3, pointwise 1x1, with BN and ReLU6 / Hardswish."""

    def __init__(self, act=nn.ReLU6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.act = act()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.act(self.pw(self.act(self.dw(x))))
        x = self.act(self.grouped(x))
        return self.fc(x.mean((2, 3)))


class NormMLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear -> RMSNorm -> SiLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(6, 10), nn.LayerNorm(10)
        self.fc2, self.rms = nn.Linear(10, 10), nn.RMSNorm(10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(F.silu(self.rms(self.fc2(F.gelu(self.ln(self.fc1(x)))))))


class SEBlockNet(nn.Module):
    """Conv -> GroupNorm -> Mish, a squeeze-excitation gate (Hardsigmoid), a layer-scaled residual branch."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.mish(self.gn(self.c1(x)))
        g = F.hardsigmoid(self.se2(torch.tanh(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        h = h * g
        h = h + self.gamma.view(-1, 1, 1) * torch.sigmoid(self.c2(h))  # a scale computed from a parameter
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ConvNeXtLike(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm and pointwise Linear MLP, layer scale, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pw1, self.pw2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.post = nn.Conv2d(8, 8, 1)
        self.head_norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.scale * self.pw2(F.gelu(self.pw1(h)))
        x = self.post(x + h.permute(0, 3, 1, 2))
        return self.head(self.head_norm(x.mean((-2, -1))))


class TokenMLP(nn.Module):
    """Per-position Linear layers over (B, T, C) with a LayerNorm, averaged over T."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.head = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.gelu(self.norm(self.fc1(x))))).mean(1))


FAMILIES = {
    "tokens-bt-c": (TokenMLP, (5, 6)),
    "depthwise-relu6": (lambda: DepthwiseSeparable(nn.ReLU6), (3, 8, 8)),
    "depthwise-hardswish": (lambda: DepthwiseSeparable(nn.Hardswish), (3, 8, 8)),
    "layernorm-rmsnorm-mlp": (NormMLP, (6,)),
    "groupnorm-se-layerscale": (SEBlockNet, (3, 8, 8)),
    "convnext-like": (ConvNeXtLike, (3, 8, 8)),
}


def _randomize_bn(model):
    """Random running statistics, and weights scaled up so that random inputs get varied predictions."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.mul_(2.5)
            m.bias.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_incremental_equals_plain_oracle(family):
    make, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = make().double().eval()
    with torch.no_grad():
        _randomize_bn(model)
    x = torch.randn(48, *shape, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2])
    assert a.capture_method == "export"
    with torch.no_grad():  # centre the logits so that random inputs get varied predictions
        a.output_module.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, max(1, width // 3), max(1, width // 3))]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_exported_mlp_keeps_the_exact_skipping_chain():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 5)).eval()
    x = torch.randn(200, 20)
    y = m(x).argmax(-1)
    a = NetworkAdapter(m, x)
    ev = IncrementalLesions(a, x, y)
    sets = [np.random.default_rng(i).choice(32, 8, replace=False) for i in range(10)]
    fast = ev.correct_counts(0, sets)
    assert a.capture_method == "export" and ev.last_stats["skip"] == "chain"
    np.testing.assert_array_equal(fast, correct_counts_plain(a, 0, sets, x, y))


def test_layers_named_by_module_path_and_channels_last_linear_is_a_neuron_layer():
    a = NetworkAdapter(ConvNeXtLike(), torch.randn(2, 3, 8, 8))
    assert a.layer_names == ["stem", "dw", "pw1", "pw2", "post"] and a.layer_sizes == [8, 8, 16, 8, 8]
    blocks = {(i, j): b for i, j, b in a.weight_blocks(bn_fold="paper")}
    # the depthwise conv joins each channel only to itself
    dw = blocks[(0, 1)]
    assert np.count_nonzero(dw - np.diag(np.diag(dw))) == 0
    # dw -> LayerNorm (|gamma| folded per channel) -> pw1 (channels-last Linear: |W|)
    m = a.model
    expected = m.pw1.weight.detach().abs().double().numpy() * m.norm.weight.detach().abs().double().numpy()
    np.testing.assert_allclose(blocks[(1, 2)], expected)
    # pw2 -> layer scale (folded) -> permute -> residual addition -> post (1x1 conv)
    post = m.post.weight.detach().abs().double().sum((2, 3)).numpy()
    np.testing.assert_allclose(blocks[(3, 4)], post * m.scale.detach().abs().double().numpy()[None, :])
    np.testing.assert_allclose(blocks[(0, 4)], post)      # the stem writes to the same stream
    assert set(blocks) == {(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)}


def test_gate_units_are_neuron_layers_and_gated_channels_reach_the_next_layer():
    m = SEBlockNet()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8))
    assert a.layer_names == ["c1", "se1", "se2", "c2"]
    # lesions: c1's channels are zeroed where they enter the GroupNorm, the gate's where they enter the product
    sinks = a.structure.sinks
    assert [(s.kind, s.user.name) for s in sinks[a.layer_node(0)]] == [("mask", "gn")]
    assert [(s.kind, str(s.user.target)) for s in sinks[a.layer_node(2)]] == [("mask", "aten.mul.Tensor")]
    blocks = {(i, j): b for i, j, b in a.weight_blocks()}
    assert set(blocks) == {(0, 1), (1, 2), (0, 3), (2, 3)}   # the gated channels (and the gate) reach c2
    with torch.no_grad():
        c2 = m.c2.weight.abs().double().sum((2, 3)).numpy()
        gn = m.gn.weight.abs().double().numpy()
    np.testing.assert_allclose(blocks[(0, 3)], c2 * gn[None, :])
    np.testing.assert_allclose(blocks[(2, 3)], c2)


def test_grouped_conv_edges_exist_only_within_groups():
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    a = NetworkAdapter(model, torch.randn(2, 2, 8, 8))
    block = a.weight_blocks()[0][2]
    w = model[2].weight.detach().abs().double().sum((2, 3)).numpy()   # (4, 3)
    expected = np.zeros((4, 6))
    expected[:2, :3], expected[2:, 3:] = w[:2], w[2:]
    np.testing.assert_allclose(block, expected)


# ----- batch-norm folding (issue 10, row 3) --------------------------------------------------------
def test_bn_fold_paper_and_original_differ_as_documented():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double().eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(-2, 2)
    a = NetworkAdapter(model, torch.randn(2, 2, 8, 8, dtype=torch.float64))
    l1 = lambda w: w.detach().abs().sum((2, 3)).numpy()  # noqa: E731
    paper = {(i, j): b for i, j, b in a.weight_blocks()}
    original = {(i, j): b for i, j, b in a.weight_blocks(bn_fold="original")}
    none = {(i, j): b for i, j, b in a.weight_blocks(bn_fold="none")}
    s1, s2 = bn_scale(model[1]).numpy(), bn_scale(model[4]).numpy()
    # paper: BN of layer l's channel c scales the edges out of c into layer l + 1
    np.testing.assert_allclose(paper[(0, 1)], l1(model[3].weight) * s1[None, :])
    np.testing.assert_allclose(paper[(1, 2)], l1(model[6].weight) * s2[None, :])
    # original: the BN after the consumer scales the edges into its channels
    np.testing.assert_allclose(original[(0, 1)], l1(model[3].weight) * s2[:, None])
    np.testing.assert_allclose(original[(1, 2)], l1(model[6].weight))
    np.testing.assert_allclose(none[(0, 1)], l1(model[3].weight))
    assert not np.allclose(paper[(0, 1)], original[(0, 1)])
    # the paper's folded weight: |W[o, c] * gamma_c / sqrt(var_c + eps)|, summed over the kernel
    gamma, var, eps = model[1].weight.detach(), model[1].running_var, model[1].eps
    folded = model[3].weight.detach() * (gamma / torch.sqrt(var + eps)).view(1, -1, 1, 1)
    np.testing.assert_allclose(paper[(0, 1)], folded.abs().sum((2, 3)).numpy())
    with pytest.raises(ValueError, match="bn_fold"):
        a.weight_blocks(bn_fold="sideways")


# ----- capture -------------------------------------------------------------------------------------
class KeywordDictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, pixel_values=None, scale: float = 1.0):
        if pixel_values.dtype != torch.float32:  # a data-dependent check torch.fx cannot trace
            raise ValueError("float32 only")
        h = torch.relu(self.fc1(pixel_values))
        return {"hidden": h, "logits": self.fc2(h) * scale}


def test_keyword_inputs_and_dict_outputs_are_captured_by_export():
    model = KeywordDictModel()
    x = torch.randn(10, 5)
    a = NetworkAdapter(model, x, input_name="pixel_values")
    assert a.capture_method == "export" and a.layer_names == ["fc1"]
    torch.testing.assert_close(a.values([], logits=True)(x), model(pixel_values=x)["logits"])
    b = NetworkAdapter(model, x, input_name="pixel_values", output=lambda o: o["logits"])
    torch.testing.assert_close(b.values([], logits=True)(x), model(pixel_values=x)["logits"])

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = KeywordDictModel()

        def forward(self, x):
            out = self.m(pixel_values=x)
            return out["hidden"], out["logits"]

    c = NetworkAdapter(Pair(), x, output=1)
    assert c.layer_names == ["m.fc1"]
    with pytest.raises(modlens.nn.adapter.ModelTraceError, match="output="):
        NetworkAdapter(Pair(), x)


def test_input_shape_mismatch_is_one_line_for_test_and_activation_data():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    with pytest.raises(ValueError) as info:
        modlens.analyze(model, (torch.randn(30, 7), y), partitionings=["weights/global"], n_clusters=2, n_random=2)
    msg = str(info.value)
    assert "(30, 7)" in msg and "(batch, 6)" in msg and "mat1" not in msg and "\n" not in msg
    with pytest.raises(ValueError) as info:
        modlens.analyze(model, (x, y), activation_data=torch.randn(20, 7), partitionings=["activations/global"],
                        n_clusters=2, n_random=2)
    msg = str(info.value)
    assert msg.startswith("activation data") and "(20, 7)" in msg and "(batch, 6)" in msg and "mat1" not in msg


def test_when_export_and_fx_both_fail_the_error_names_module_line_and_workaround():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither export nor fx can capture it
                return x
            return -x

    model = nn.Sequential(nn.Linear(4, 4), Branchy(), nn.Linear(4, 2))
    with pytest.raises(modlens.nn.adapter.ModelTraceError) as info:
        NetworkAdapter(model, torch.randn(3, 4))
    msg = str(info.value)
    assert "submodule '1' (Branchy)" in msg and "if x.sum() > 0:" in msg and "leaf_modules=['1']" in msg
    assert "\n" not in msg
    # fx was only the fallback: the export error comes first, with its submodule and line
    export, fx = msg.split("the torch.fx fallback failed too")
    assert export.startswith("modlens could not capture Sequential: torch.export failed inside submodule '1' "
                              "(Branchy), at test_capture_ops.py:")
    assert "if x.sum() > 0:" in export and "with torch.fx" in fx


def test_attention_without_a_transformer_mlp_is_refused():
    class TinyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):  # (B, T, 4)
            h = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
            return self.out(h.mean(1))

    with pytest.raises(UnsupportedModelError, match="attention but no transformer MLP"):
        NetworkAdapter(TinyAttention(), torch.randn(2, 3, 4))


# ----- planted modules through the new operation families ------------------------------------------
@functools.lru_cache(maxsize=None)
def planted_grouped_cnn(n_modules=4, width=16, epochs=12, seed=0):
    """Grouped convs (groups = modules): group m reads input channel m, writes only to its classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(n_modules, width, 3, padding=1, groups=n_modules), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Dropout2d(0.2), nn.Conv2d(width, width, 3, padding=1, groups=n_modules), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout2d(0.2), nn.Conv2d(width, width, 3, padding=1, groups=n_modules), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2 * n_modules))
    out_mask = block_masks([width, 2 * n_modules], n_modules)[0]
    x, y = planted_images(2000, n_modules=n_modules, seed=seed)
    _train(model, x, y, epochs, seed, [(model[-1], out_mask)])
    return model, tuple(np.repeat(np.arange(n_modules), width // n_modules) for _ in range(3))


@functools.lru_cache(maxsize=None)
def planted_layernorm_mlp(n_modules=4, width=32, epochs=40, seed=0):
    """Block-diagonal MLP with LayerNorm (and GELU) between its layers."""
    sizes = [n_modules * 6, width, width, width, 2 * n_modules]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(b), nn.GELU(), nn.Dropout(0.3)]
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    x, y = planted_data(2000, n_modules=n_modules, seed=seed)
    _train(model, x, y, epochs, seed, list(zip(linears, block_masks(sizes, n_modules))))
    return model, [np.repeat(np.arange(n_modules), width // n_modules) for _ in range(3)]


def _train(model, x, y, epochs, seed, masked):
    def apply():
        with torch.no_grad():
            for lin, mask in masked:
                lin.weight.mul_(mask)

    apply()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 100):
            idx = perm[s:s + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            apply()
    model.eval()


@pytest.mark.parametrize("case", ["grouped-cnn", "layernorm-mlp"])
def test_planted_modules_are_recovered_and_detected(case):
    if case == "grouped-cnn":
        model, groups = planted_grouped_cnn()
        test, held = planted_images(600, seed=1), planted_images(300, seed=2)[0]
    else:
        model, groups = planted_layernorm_mlp()
        test, held = planted_data(600, seed=1), planted_data(300, seed=2)[0]
    check_planted(model, groups, test, held, n_layers=3)


def check_planted(model, groups, test, held, *, n_layers: int) -> None:
    """A trained planted network: accurate, its modules recovered exactly (ARI 1) by the weight
    partition at k = 4, and its 12 subclusters detected as important (p < 1e-4)."""
    with torch.no_grad():
        assert (model(test[0]).argmax(-1) == test[1]).float().mean() > 0.9
    part = modlens.partition(model, "weights/global", n_clusters=4, data=held, random_state=0)
    assert len(part.labels) == n_layers
    for labels, truth in zip(part.labels, groups):
        assert adjusted_rand_score(truth, labels) == 1.0
    res = modlens.analyze(model, test, activation_data=held, n_clusters=4, random_state=0,
                          partitionings=["weights/global"])
    row = res.summary.set_index(["partitioning", "metric"]).loc[("weights/global", "acc_drop")]
    assert row["n_subclusters"] == 12
    assert row["p_value"] < 1e-4 and row["significant"]


# ----- rows 1-3 of the notes reachable from partition, analyze and the CLI -------------------------
def test_graph_options_reach_the_adapter_from_partition_analyze_and_cli(monkeypatch):
    from modlens.cli import _analysis_kwargs, build_parser

    seen = []
    blocks = NetworkAdapter.lazy_weight_blocks   # every weight-block read goes through it (computed when read)
    summaries = NetworkAdapter.record

    def spy_blocks(self, **kw):
        seen.append(("blocks", kw.get("conv_edge"), kw.get("bn_fold")))
        return blocks(self, **kw)

    def spy_summaries(self, batches, **kw):
        seen.append(("acts", kw.get("reduce")))
        return summaries(self, batches, **kw)

    monkeypatch.setattr(NetworkAdapter, "lazy_weight_blocks", spy_blocks)
    monkeypatch.setattr(NetworkAdapter, "record", spy_summaries)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(30, 2, 8, 8)
    y = model(x).argmax(-1)
    modlens.partition(model, "activations/global", n_clusters=2, data=x, conv_edge="matrix_1_norm",
                      act_reduce="matrix_1_norm", bn_fold="original")
    assert ("blocks", "matrix_1_norm", "original") in seen and ("acts", "matrix_1_norm") in seen
    seen.clear()
    modlens.analyze(model, (x, y), activation_data=torch.randn(30, 2, 8, 8), n_clusters=2, n_random=1,
                    partitionings=["weights/global", "activations/global"], bn_fold="none", conv_edge="matrix_1_norm",
                    act_reduce="matrix_1_norm")
    assert ("blocks", "matrix_1_norm", "none") in seen and ("acts", "matrix_1_norm") in seen
    with pytest.raises(ValueError, match="bn_fold"):
        modlens.analyze(model, (x, y), bn_fold="folded")
    args = build_parser().parse_args(["analyze", "m", "--out", "o", "--bn-fold", "original", "--conv-edge",
                                      "matrix_1_norm", "--act-reduce", "matrix_1_norm"])
    kw = _analysis_kwargs(args)
    assert (kw["bn_fold"], kw["conv_edge"], kw["act_reduce"]) == ("original", "matrix_1_norm", "matrix_1_norm")


class _LoopOverSamples(nn.Module):
    """A Python loop over the batch (Reformer's position lookup does one): export keeps the batch
    dimension symbolic but unrolls the loop, so the graph computes the model only at the capture batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        h = self.a(x) + torch.stack([self.pos[i % 5] for i in range(x.shape[0])])
        return self.b(torch.relu(h))


def test_a_graph_that_unrolled_the_batch_size_is_refused_in_one_line():
    with pytest.raises(ModelTraceError, match=r"_LoopOverSamples: torch.export built a graph that computes the "
                                              r"model's output on batches of 2 but not of 3") as e:
        NetworkAdapter(_LoopOverSamples(), torch.randn(6, 4))
    assert "\n" not in str(e.value)


def test_a_layer_read_only_for_its_shape_is_not_followed_nor_a_neuron_layer():
    """Hugging Face's MRA attention without its CUDA kernel returns ``zeros_like(query)``: the query
    projection, split into heads by a reshape modlens does not follow outside attention, reaches
    the output only through a read of its shape, so it is no neuron layer and is not walked."""
    class ShapeRead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.q, self.proj, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            heads = self.q(h).view(x.shape[0], 2, 2, 2)   # (B, 8) -> (B, 2, 2, 2): not a channel split modlens follows
            zero = torch.zeros_like(heads).reshape(x.shape[0], 8)
            return self.fc2(torch.relu(h + self.proj(zero)))

    model = ShapeRead().eval()
    x = torch.randn(20, 6)
    with torch.no_grad():
        y = model(x).argmax(-1)
    for a in (NetworkAdapter(model, x[:4]), NetworkAdapter(model, x[:4], capture="fx")):
        assert "q" not in a.layer_names and "fc1" in a.layer_names
    part = modlens.partition(model, "weights/global", n_clusters=2, random_state=0)
    assert "q" not in part.layer_names
    modlens.analyze(model, (x, y), partitionings=["weights/global"], n_clusters=2, n_random=2)
