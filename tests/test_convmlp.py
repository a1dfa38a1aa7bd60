"""Transformer MLPs written with 1x1 convolutions and batch norms (docs/transformers.md, "MLPs written with
1x1 convolutions and batch norms"): EfficientFormer-V2/EfficientViT-style ConvNorm MLPs over a (B, C, H, W)
map, LeViT-style Linear + BatchNorm1d MLPs over tokens, a depthwise conv inside the MLP, and two stages
joined by a strided ConvNorm. The hidden units are the neurons on both capture paths, the batch norms
are folded into the weight graph, and the incremental lesion engine equals the plain oracle (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")


def _np(t):
    return t.detach().double().numpy()


def _bn(bn):
    return _np(bn.weight).__abs__() / np.sqrt(_np(bn.running_var) + bn.eps)


class ConvNorm(nn.Sequential):
    def __init__(self, a, b, k=1, stride=1, groups=1):
        super().__init__(nn.Conv2d(a, b, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(b))


class MapAttention(nn.Module):
    """Attention over the positions of a (B, C, H, W) map, queries/keys/values from 1x1 ConvNorms."""

    def __init__(self, c):
        super().__init__()
        self.qkv, self.proj = ConvNorm(c, 3 * c), ConvNorm(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(F.relu(o.transpose(1, 2).reshape(b, c, h, w)))


class ConvMlp(nn.Module):
    """fc1 (ConvNorm 1x1) -> act -> [depthwise ConvNorm 3x3 -> act] -> fc2 (ConvNorm 1x1)."""

    def __init__(self, c, hidden, mid=False):
        super().__init__()
        self.fc1, self.fc2 = ConvNorm(c, hidden), ConvNorm(hidden, c)
        self.mid = ConvNorm(hidden, hidden, 3, groups=hidden) if mid else None

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        if self.mid is not None:
            h = F.gelu(self.mid(h))
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, c, hidden, mid=False):
        super().__init__()
        self.attn, self.mlp = MapAttention(c), ConvMlp(c, hidden, mid)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class ConvMlpNet(nn.Module):
    """A conv stem (not a neuron layer), stage 0 (width 8, plain ConvNorm MLPs), a strided ConvNorm,
    stage 1 (width 16, MLPs with a depthwise conv inside), BN, pooling and a Linear head."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, 8, 3, 2), nn.ReLU())
        self.stage0 = nn.Sequential(Block(8, 16), Block(8, 16))
        self.down = ConvNorm(8, 16, 3, 2)
        self.stage1 = nn.Sequential(Block(16, 24, mid=True))
        self.norm, self.head = nn.BatchNorm2d(16), nn.Linear(16, n_classes)

    def forward(self, x):
        x = self.stage1(self.down(self.stage0(self.stem(x))))
        return self.head(self.norm(x).mean((2, 3)))


class LinearNormMlpNet(nn.Module):
    """LeViT-style: tokens (B, N, C), attention from Linears, an MLP of Linear + BatchNorm1d over
    ``x.flatten(0, 1)``, and a BatchNorm1d + Linear head."""

    def __init__(self, d=8, hidden=16, n_blocks=2):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, 4)
        self.q = nn.ModuleList(nn.Linear(d, d) for _ in range(n_blocks))
        self.fc1 = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(n_blocks))
        self.bn1 = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(n_blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, d, bias=False) for _ in range(n_blocks))
        self.bn2 = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(n_blocks))
        self.head_bn, self.head = nn.BatchNorm1d(d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for q, fc1, bn1, fc2, bn2 in zip(self.q, self.fc1, self.bn1, self.fc2, self.bn2):
            x = x + F.scaled_dot_product_attention(q(x), x, x)
            h = fc1(x)
            h = F.hardswish(bn1(h.flatten(0, 1)).reshape_as(h))   # timm's LinearNorm
            x = x + bn2(fc2(h).flatten(0, 1)).reshape_as(x)
        return self.head(self.head_bn(x.mean(1)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class ConvBoundaryNet(nn.Module):
    """Two stages joined by several conv layers (EfficientViT-MSRA's and SHViT's downsampling): an inverted
    residual (1x1 ConvNorm, strided depthwise ConvNorm, squeeze-excitation, 1x1 ConvNorm) and then a
    residual depthwise ConvNorm, before the next stage's first block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, 8, 3, 2), nn.ReLU())
        self.stage0 = Block(8, 16)
        self.expand, self.dw, self.se, self.project = ConvNorm(8, 16), ConvNorm(16, 16, 3, 2, 16), SqueezeExcite(16), \
            ConvNorm(16, 12)
        self.res = ConvNorm(12, 12, 3, groups=12)
        self.stage1 = Block(12, 24)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stage0(self.stem(x))
        x = self.project(self.se(F.relu(self.dw(F.relu(self.expand(x))))))
        x = x + self.res(x)
        return self.head(self.stage1(x).mean((2, 3)))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(-1.5, 1.5, generator=g)   # negative gammas too: the graph takes |gamma|
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0, 1.5 / np.sqrt(m.weight[0].numel()), generator=g)
    return model.eval()


def make(name):
    torch.manual_seed(0)
    return _randomize({"conv": ConvMlpNet, "linear": LinearNormMlpNet, "boundary": ConvBoundaryNet}[name]())


NAMES = {"conv": ["stage0.0.mlp.fc1.0", "stage0.1.mlp.fc1.0", "stage1.0.mlp.fc1.0"],
         "linear": ["fc1.0", "fc1.1"], "boundary": ["stage0.mlp.fc1.0", "stage1.mlp.fc1.0"]}
SIZES = {"conv": [16, 16, 24], "linear": [16, 16], "boundary": [16, 24]}


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("name", ["conv", "linear"])
def test_hidden_units_of_conv_and_batch_norm_mlps_are_the_neurons(name, capture):
    model = make(name)
    x = torch.randn(3, 3, 16, 16)
    a = NetworkAdapter(model, x[:2], capture=capture)
    assert a.is_transformer
    assert a.layer_names == NAMES[name] and a.layer_sizes == SIZES[name]
    # the pre-activation is the activation's input: the hidden batch norm's output, channels first
    seen = []
    if name == "conv":
        hooks = [m.mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o))
                 for m in [*model.stage0, *model.stage1]]
    else:
        hooks = [bn.register_forward_hook(lambda m, i, o: seen.append(o.reshape(3, -1, o.shape[-1]).transpose(1, 2)))
                 for bn in model.bn1]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    got = a.values()(x)
    assert len(got) == len(seen)
    for v, s in zip(got, seen):
        torch.testing.assert_close(v, s)


def test_conv_mlp_weights_fold_the_batch_norms_and_the_strided_conv_joins_the_stages():
    model = make("conv")
    a = NetworkAdapter(model, torch.randn(2, 3, 16, 16))
    parts = a.residual_parts()
    blocks = [*model.stage0, *model.stage1]
    assert [b.stage for b in parts["blocks"]] == [0, 0, 1]
    for blk, b in zip(blocks, parts["blocks"]):
        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        rows = _bn(fc1[1])
        if blk.mlp.mid is not None:   # the unit reads its neighbourhood through its own filter and its BN
            rows = rows * np.abs(_np(blk.mlp.mid[0].weight)).reshape(len(rows), -1).sum(1) * _bn(blk.mlp.mid[1])
        np.testing.assert_allclose(b.w_in, _np(fc1[0].weight)[:, :, 0, 0] * rows[:, None])
        np.testing.assert_allclose(b.w_out, _np(fc2[0].weight)[:, :, 0, 0] * _bn(fc2[1])[:, None])
        assert b.gamma is None   # no norm in front of the MLP
    (t,) = parts["transitions"]
    np.testing.assert_allclose(t.kernel, _np(model.down[0].weight) * _bn(model.down[1])[:, None, None, None])
    assert t.stride == (2, 2)
    np.testing.assert_allclose(parts["head"], _np(model.head.weight))
    np.testing.assert_allclose(parts["final_gamma"], _bn(model.norm))
    got = {(i, j): w for i, j, w in a.weight_blocks()}
    w0, w1 = parts["blocks"][0], parts["blocks"][1]
    first = 0 if parts["embedding"] is None else 1
    np.testing.assert_allclose(got[(first, first + 1)], np.abs(w1.w_in @ w0.w_out))


def test_linear_norm_mlp_weights_fold_the_batch_norms():
    model = make("linear")
    a = NetworkAdapter(model, torch.randn(2, 3, 16, 16))
    parts = a.residual_parts()
    for k, b in enumerate(parts["blocks"]):
        np.testing.assert_allclose(b.w_in, _np(model.fc1[k].weight) * _bn(model.bn1[k])[:, None])
        np.testing.assert_allclose(b.w_out, _np(model.fc2[k].weight) * _bn(model.bn2[k])[:, None])
    np.testing.assert_allclose(parts["final_gamma"], _bn(model.head_bn))
    np.testing.assert_allclose(parts["embedding"], _np(model.embed.weight).reshape(8, -1))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("name", ["conv", "linear", "boundary"])
def test_incremental_lesions_equal_the_plain_oracle(name, capture):
    model = make(name).double()
    x = torch.randn(40, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.head.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    a = NetworkAdapter(model, x[:2], capture=capture)
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 3, width // 2, width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 2


def test_a_boundary_of_several_conv_layers_is_the_sum_over_paths_of_the_composed_absolute_kernels():
    model = make("boundary")
    a = NetworkAdapter(model, torch.randn(2, 3, 16, 16))
    assert a.layer_names == NAMES["boundary"]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1]
    (t,) = parts["transitions"]
    assert t.kernel.shape == (12, 8, 7, 7) and t.stride == (2, 2)   # 3x3 stride 2, then 3x3 at stride 2

    def absolute(cn, z, stride=1, groups=1):   # a ConvNorm with |kernel| and its BN's weight-graph scale
        conv, bn = cn
        z = F.conv2d(z, conv.weight.detach().double().abs(), stride=stride, padding=conv.padding, groups=groups)
        return z * torch.from_numpy(_bn(bn))[None, :, None, None]

    # the same paths as a linear network of absolute kernels (activations and the SE gate pass, the SE's
    # pooled branch carries no path), probed with one impulse per input channel and position
    n = 12
    z = torch.zeros(8 * n * n, 8, n, n, dtype=torch.float64)
    idx = torch.arange(8 * n * n)
    z[idx, idx // (n * n), (idx // n) % n, idx % n] = 1.0
    with torch.no_grad():
        h = absolute(model.project, absolute(model.dw, absolute(model.expand, z), 2, 16))
        h = h + absolute(model.res, h, groups=12)
    resp = h[:, :, 3, 3].reshape(8, n, n, 12).permute(3, 0, 1, 2).numpy()   # (out, in, row, col) at output (3, 3)
    # output p reads input rows 2 p - 3 + u (the paddings: 1 at stride 1, then 1 at stride 2)
    np.testing.assert_allclose(t.kernel, resp[:, :, 3:10, 3:10])
    np.testing.assert_allclose(t.kernel.sum(), resp.sum())   # no path reaches outside the 7 x 7 taps
    got = {(i, j): w for i, j, w in a.weight_blocks()}
    b0, b1 = parts["blocks"]
    want = sum(np.abs(b1.w_in @ t.kernel[:, :, p, q] @ b0.w_out) for p in range(7) for q in range(7))
    first = 0 if parts["embedding"] is None else 1
    np.testing.assert_allclose(got[(first, first + 1)], want)


class PlantedConvMlpNet(nn.Module):
    """A conv-MLP transformer whose embedding, MLP maps and head are block-masked: module m reads input
    channels 2m, 2m + 1, owns stream channels 4m..4m + 3 and hidden channels 8m..8m + 7 of every MLP, and
    writes classes 2m, 2m + 1. Attention (dense, unmasked) is not in the weight graph."""

    def __init__(self, n_blocks=2):
        super().__init__()
        self.embed = nn.Conv2d(8, 16, 1)
        self.blocks = nn.Sequential(*[Block(16, 32) for _ in range(n_blocks)])
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean((2, 3)))


def test_planted_conv_mlp_modules_are_recovered_by_the_weight_graph():
    from sklearn.metrics import adjusted_rand_score

    import modlens
    from planted import block_masks

    model = _randomize(PlantedConvMlpNet(), seed=3)
    mask = lambda out, inp: block_masks([inp, out], 4)[0]  # noqa: E731
    with torch.no_grad():
        model.embed.weight.mul_(mask(16, 8)[:, :, None, None])
        model.head.weight.mul_(mask(8, 16))
        for b in model.blocks:
            b.mlp.fc1[0].weight.mul_(mask(32, 16)[:, :, None, None])
            b.mlp.fc2[0].weight.mul_(mask(16, 32)[:, :, None, None])
    x = torch.randn(16, 8, 4, 4)
    part = modlens.partition(model, "weights/global", n_clusters=4, data=x, random_state=0)
    truth = np.repeat(np.arange(4), 8)
    assert len(part.labels) == 2
    for labels in part.labels:
        assert adjusted_rand_score(truth, labels) == 1.0


class UpsamplingBoundaryNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stage0 = ConvNorm(3, 8, 3, 2), Block(8, 16)
        self.a, self.b = ConvNorm(8, 12), ConvNorm(12, 12, 3)
        self.stage1, self.head = Block(12, 24), nn.Linear(12, 3)

    def forward(self, x):
        x = self.stage0(self.stem(x))
        x = self.b(F.interpolate(F.relu(self.a(x)), scale_factor=2.0))
        return self.head(self.stage1(x).mean((2, 3)))


def test_a_boundary_the_layer_paths_cannot_follow_is_refused_in_one_line():
    from modlens.nn.adapter import UnsupportedModelError

    model = _randomize(UpsamplingBoundaryNet())
    a = NetworkAdapter(model, torch.randn(2, 3, 16, 16))
    with pytest.raises(UnsupportedModelError, match="between the MLPs 'stage0.mlp.fc1.0' .* several layers, and "
                       r"operation 'upsample.*changes the map's size from \(8, 8\) to \(16, 16\)") as err:
        a.residual_parts()
    assert "\n" not in str(err.value)
