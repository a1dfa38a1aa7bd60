"""Issue 20: operation families of library models (timm, torchvision, Hugging Face): channel
splits, ... Each family: capture, the weight graph it gives, and lesions of every layer, the
incremental engine equal to the plain oracle in float64; planted modules where the family has
neurons of its own."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modlens
from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from test_capture_ops import _train, check_planted
from planted import block_masks
from test_cnn_models import planted_images

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


# ----- small models of each family ----------------------------------------------------------------
class ChannelSplitNet(nn.Module):
    """split, split_with_sizes, narrow, slice and chunk of conv channels (CSPNet, Res2Net, GhostNet style)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 1)
        self.c = nn.Conv2d(5, 4, 3, padding=1)
        self.mix = nn.Conv2d(6 + 6 + 4 + 2, 8, 1)
        self.fc = nn.Linear(8 + 3, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        xs, xb = h.split(6, dim=1)                    # CSP: one half passes by, the other is transformed
        p, _, r = torch.split(h, [4, 5, 3], dim=1)
        a = F.relu(self.a(xb))
        b = F.relu(self.b(p))
        c = self.c(h.narrow(1, 3, 5))
        m = F.relu(self.mix(torch.cat([a, b, c, xs[:, 1:3]], 1)))
        m1, m2 = m.chunk(2, dim=1)
        return self.fc(torch.cat([m1.mean((2, 3)), m2.mean((2, 3)), r.mean((2, 3))], 1))


class ComputedBiasViT(nn.Module):
    """BEiT/EVA attention: ``F.linear(x, self.qkv.weight, cat(q_bias, zeros, v_bias))``, the key bias
    computed in forward; an MLP per block, a residual stream of tokens (B, T, C)."""

    def __init__(self, d=8, hidden=16, heads=2, depth=2, n_classes=4, distilled=False):
        super().__init__()
        self.heads = heads
        self.head_dist = nn.Linear(d, n_classes) if distilled else None
        self.embed = nn.Linear(5, d)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1, blk.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            blk.qkv, blk.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
            blk.q_bias, blk.v_bias = nn.Parameter(torch.randn(d) * 0.5), nn.Parameter(torch.randn(d) * 0.5)
            blk.fc1, blk.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
            self.blocks.append(blk)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, n_classes)

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        for blk in self.blocks:
            bias = torch.cat((blk.q_bias, torch.zeros_like(blk.v_bias), blk.v_bias))
            qkv = F.linear(blk.norm1(x), blk.qkv.weight, bias).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, d)
            x = x + blk.proj(h)
            x = x + blk.fc2(F.gelu(blk.fc1(blk.norm2(x))))
        if self.head_dist is not None:  # DeiT-distilled: the mean of the class and distillation heads
            return (self.head(self.norm(x)[:, 0]) + self.head_dist(self.norm(x)[:, 1])) / 2
        return self.head(self.norm(x).mean(1))


class DistilledCNN(nn.Module):
    """LeViT / EfficientFormer / DeiT-distilled: the scores are the mean of a class head and a
    distillation head; ``stacked`` sums the heads as EfficientViM does (``torch.stack(hs).sum(0)``)."""

    def __init__(self, stacked=False):
        super().__init__()
        self.stacked = stacked
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head, self.head_dist = nn.Linear(8, 4), nn.Linear(8, 4)
        self.pre = nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3))
        if self.stacked:
            return torch.stack([self.head(h), self.head_dist(F.relu(self.pre(h)))]).sum(0)
        return (self.head(h) + self.head_dist(F.relu(self.pre(h)))) / 2


class PaddedNet(nn.Module):
    """Spatial paddings (F.pad reflect, nn.ZeroPad2d, a negative pad that crops) and the CIFAR ResNet
    "option A" shortcut that pads the channel dimension: ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3, stride=2)
        self.zero = nn.ZeroPad2d((1, 0, 1, 0))
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.c1(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        short = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        h = F.relu(self.c2(self.zero(h)) + short)
        h = F.pad(F.relu(self.c3(h)), (-1, -1, -1, -1))
        return self.fc(h.mean((2, 3)))


class GRN(nn.Module):
    """ConvNeXt-V2's global response normalization, channels-first (timm) or channels-last (the paper's code)."""

    def __init__(self, dim, channels_last=False):
        super().__init__()
        self.channels_last = channels_last
        shape = (1, 1, 1, dim) if channels_last else (1, dim, 1, 1)
        self.gamma, self.beta = nn.Parameter(torch.rand(shape) + 0.5), nn.Parameter(torch.randn(shape) * 0.1)

    def forward(self, x):
        if self.channels_last:
            gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            return self.gamma * (x * nx) + self.beta + x
        gx = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.beta, self.gamma, x * nx)


class GRNNet(nn.Module):
    """A ConvNeXt-V2 block in each layout (GRN between the MLP's two maps), then ``x / ||x||`` across
    channels and F.normalize."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.fc1, self.grn1, self.fc2 = nn.Conv2d(8, 16, 1), GRN(16), nn.Conv2d(16, 8, 1)
        self.pw1, self.grn2, self.pw2 = nn.Linear(8, 16), GRN(16, channels_last=True), nn.Linear(16, 8)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.fc2(self.grn1(F.gelu(self.fc1(x))))
        h = x.permute(0, 2, 3, 1)
        x = x + self.pw2(self.grn2(F.gelu(self.pw1(h)))).permute(0, 3, 1, 2)
        h = self.c(x)
        h = h / (h.norm(dim=1, keepdim=True) + 1e-6)
        return self.fc(F.normalize(h.mean((2, 3)), dim=1) * 3)


class TinyMixer(nn.Module):
    """MLP-Mixer: a patch embedding flattened into tokens (``flatten(2).transpose(1, 2)``), per block a
    token-mixing MLP over ``norm(x).transpose(1, 2)`` and a channel MLP; ``resmlp`` replaces the token
    MLP by one Linear over tokens after an affine scale (ResMLP)."""

    def __init__(self, d=8, tokens=4, hidden=12, depth=2, resmlp=False):
        super().__init__()
        self.resmlp = resmlp
        self.stem = nn.Conv2d(3, d, 4, stride=4)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1, blk.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            if resmlp:
                blk.alpha = nn.Parameter(torch.rand(d) + 0.5)
                blk.tok = nn.Linear(tokens, tokens)
            else:
                blk.tok1, blk.tok2 = nn.Linear(tokens, 6), nn.Linear(6, tokens)
            blk.fc1, blk.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
            self.blocks.append(blk)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)           # (B, T, C)
        for blk in self.blocks:
            if self.resmlp:
                x = x + blk.tok((blk.alpha * x).transpose(1, 2)).transpose(1, 2)
            else:
                x = x + blk.tok2(F.gelu(blk.tok1(blk.norm1(x).transpose(1, 2)))).transpose(1, 2)
            x = x + blk.fc2(F.gelu(blk.fc1(blk.norm2(x))))
        return self.head(self.norm(x).mean(1))


class TokensCNN(nn.Module):
    """A conv map flattened into tokens (``flatten(2).transpose(1, 2)``) read by a per-position Linear."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        t = F.relu(self.c(x)).flatten(2).transpose(1, 2)
        return self.head(F.relu(self.fc(t)).mean(1))


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class ShuffleNetV2Like(nn.Module):
    """ShuffleNet-V2 units: chunk the channels, transform one half, concatenate, shuffle."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pw1, self.dw, self.pw2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)
        self.b1, self.b2 = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.post = nn.Conv2d(12, 12, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, F.relu(self.pw2(self.dw(F.relu(self.pw1(x2)))))), 1), 2)
        x = channel_shuffle(torch.cat((F.relu(self.b1(x)), F.relu(self.b2(x))), 1), 3)
        return self.fc(F.relu(self.post(x)).mean((2, 3)))


class ReshapeNet(nn.Module):
    """Reshapes of the dimensions other than the channels: ``view(B, C, -1)`` and (B, T, C) back to (B, H, W, C)."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc, self.c2, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 8), nn.Conv2d(8, 4, 1), \
            nn.Linear(4, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        b, c, hh, ww = h.shape
        t = F.relu(self.fc(h.view(b, c, -1).transpose(1, 2)))        # (B, H * W, 8)
        h = t.reshape(b, hh, ww, 8).permute(0, 3, 1, 2)
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


class SelectiveKernelNet(nn.Module):
    """SKNet / ResNeSt split attention: branches stacked into groups (SK) or a conv's channels reshaped
    into radix groups, a softmax across the groups as a gate, the groups summed."""

    def __init__(self, radix=False):
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        if radix:
            self.conv = nn.Conv2d(8, 16, 3, padding=1)
        else:
            self.p0, self.p1 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.reduce, self.select = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 16, 1)
        self.post, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b, _, h, w = x.shape
        if self.radix:
            x = F.relu(self.conv(x)).reshape(b, 2, 8, h, w)
        else:
            x = torch.stack([F.relu(self.p0(x)), F.relu(self.p1(x))], dim=1)
        a = self.select(F.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
        a = torch.softmax(a.view(b, 2, 8, 1, 1), dim=1)
        x = (x * a).sum(dim=1)
        return self.fc(F.relu(self.post(x)).mean((2, 3)))


class RadixSplitAttention(nn.Module):
    """ResNeSt (timm's SplitAttn): a conv's channels reshaped into radix groups, the attention
    vector's channels put in (cardinality, radix) order by ``view(B, cardinality, radix, -1)``,
    transposed to (radix, cardinality), a softmax across the radix groups, flattened back and viewed
    as (B, radix, C, 1, 1) to gate the groups."""

    def __init__(self, radix=2, cardinality=2, width=8):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, width * radix, 3, padding=1, groups=cardinality * radix)
        self.bn0 = nn.BatchNorm2d(width * radix)
        self.reduce = nn.Conv2d(width, 4, 1, groups=cardinality)
        self.select = nn.Conv2d(4, width * radix, 1, groups=cardinality)
        self.post, self.fc = nn.Conv2d(width, 8, 1), nn.Linear(8, 4)

    def rsoftmax(self, a):
        b = a.size(0)
        a = a.view(b, self.cardinality, self.radix, -1).transpose(1, 2)
        return F.softmax(a, dim=1).reshape(b, -1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(F.relu(self.stem(x)))))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        a = self.select(F.relu(self.reduce(x.sum(dim=1).mean((2, 3), keepdim=True))))
        a = self.rsoftmax(a).view(b, -1, 1, 1)
        x = (x * a.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)
        return self.fc(F.relu(self.post(x.contiguous())).mean((2, 3)))


FAMILIES = {
    "radix-softmax": (RadixSplitAttention, (3, 6, 6)),
    "radix-softmax-cardinality-1": (lambda: RadixSplitAttention(radix=2, cardinality=1), (3, 6, 6)),
    "selective-kernel": (SelectiveKernelNet, (3, 6, 6)),
    "radix-split-attention": (lambda: SelectiveKernelNet(radix=True), (3, 6, 6)),
    "reshape-other-dims": (ReshapeNet, (3, 4, 4)),
    "channel-shuffle": (ShuffleNetV2Like, (3, 8, 8)),
    "mixer": (TinyMixer, (3, 8, 8)),
    "resmlp": (lambda: TinyMixer(resmlp=True), (3, 8, 8)),
    "tokens-from-conv": (TokensCNN, (3, 8, 8)),
    "grn-norms": (GRNNet, (3, 8, 8)),
    "padding": (PaddedNet, (3, 8, 8)),
    "heads-mean": (DistilledCNN, (3, 8, 8)),
    "heads-stack-sum": (lambda: DistilledCNN(stacked=True), (3, 8, 8)),
    "channel-split": (ChannelSplitNet, (3, 8, 8)),
    "computed-bias-attention": (ComputedBiasViT, (6, 5)),
    "distilled-transformer": (lambda: ComputedBiasViT(distilled=True), (6, 5)),
}


def _randomize(model):
    """Random batch-norm statistics, weights scaled up so that random inputs get varied predictions."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.mul_(2.5)
            if m.bias is not None:
                m.bias.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _oracle_check(model, shape, capture="auto"):
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        _randomize(model)
    x = torch.randn(48, *shape, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2], capture=capture)
    with torch.no_grad():  # centre the logits so that random inputs get varied predictions
        for _ in range(4):   # (a head whose scores are averaged with others moves them by a fraction)
            a.output_module.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    assert sum(assert_lesions_equal_oracle(a, x, y)) >= 1
    return a


def assert_lesions_equal_oracle(a, x, y, sizes=lambda w: (1, max(1, w // 3), max(1, w // 2))) -> list[bool]:
    """Lesion random sets of ``sizes(width)`` neurons in every layer of adapter ``a`` with the fast engine and
    the plain oracle on ``(x, y)``, assert equal class counts; per layer, whether any lesion changed them."""
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = []
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in sizes(width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed.append(bool((fast != ev.baseline).any()))
    return changed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_incremental_equals_plain_oracle(family):
    make, shape = FAMILIES[family]
    torch.manual_seed(0)
    a = _oracle_check(make(), shape)
    assert a.capture_method == "export"


# ----- channel splits --------------------------------------------------------------------------------
def _l1(conv):
    return conv.weight.detach().abs().double().sum((2, 3)).numpy()


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_channel_splits_carry_each_part_at_its_offset(capture):
    torch.manual_seed(0)
    m = ChannelSplitNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.capture_method == capture and a.layer_names == ["stem", "a", "b", "c", "mix"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    assert set(blocks) == {("stem", "a"), ("stem", "b"), ("stem", "c"), ("stem", "mix"), ("a", "mix"),
                           ("b", "mix"), ("c", "mix")}
    expected = np.zeros((6, 12))
    expected[:, 6:] = _l1(m.a)                       # xb = h[:, 6:12]
    np.testing.assert_allclose(blocks[("stem", "a")], expected)
    expected = np.zeros((6, 12))
    expected[:, :4] = _l1(m.b)                       # p = h[:, 0:4]
    np.testing.assert_allclose(blocks[("stem", "b")], expected)
    expected = np.zeros((4, 12))
    expected[:, 3:8] = _l1(m.c)                      # narrow(1, 3, 5)
    np.testing.assert_allclose(blocks[("stem", "c")], expected)
    expected = np.zeros((8, 12))
    expected[:, 1:3] = _l1(m.mix)[:, 16:18]          # xs[:, 1:3] = h[:, 1:3] at offset 16 of the cat
    np.testing.assert_allclose(blocks[("stem", "mix")], expected)
    np.testing.assert_allclose(blocks[("c", "mix")], _l1(m.mix)[:, 12:16])
    # lesions: the stem's channels are zeroed where they enter the splits, and everything after is recomputed
    sinks = a.structure.sinks[a.layer_node(0)]
    assert {s.kind for s in sinks} == {"mask"} and len({s.value for s in sinks}) == 1


def test_channel_split_lesions_match_the_oracle_in_an_fx_graph():
    _oracle_check(ChannelSplitNet(), (3, 8, 8), capture="fx")


def test_strided_channel_slice_is_refused_in_one_line():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.c(x)[:, ::2].mean((2, 3)))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(Strided(), torch.randn(2, 3, 4, 4))
    msg = str(info.value)
    assert "every 2th channel" in msg and "'c'" in msg and "\n" not in msg


class PlantedSplitCNN(nn.Module):
    """CSP-style: a grouped stem (one group per module), its channels split in two halves that two
    grouped convs transform (modules 0-1 and 2-3), concatenated and mixed by a grouped conv."""

    def __init__(self, n_modules=4, width=16):
        super().__init__()
        half = width // 2
        self.stem, self.bn = nn.Conv2d(n_modules, width, 3, padding=1, groups=n_modules), nn.BatchNorm2d(width)
        self.a = nn.Conv2d(half, half, 3, padding=1, groups=n_modules // 2)
        self.b = nn.Conv2d(half, half, 3, padding=1, groups=n_modules // 2)
        self.mix = nn.Conv2d(width, width, 3, padding=1, groups=n_modules)
        self.drop, self.half = nn.Dropout2d(0.2), half
        self.out = nn.Linear(width, 2 * n_modules)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.stem(x))))
        first, _ = h.split(self.half, dim=1)
        h = torch.cat([F.relu(self.a(first)), F.relu(self.b(h[:, self.half:]))], 1)
        h = self.drop(F.max_pool2d(h, 2))
        h = F.relu(self.mix(h))
        return self.out(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


@functools.lru_cache(maxsize=None)
def planted_split_cnn(n_modules=4, width=16, epochs=12, seed=0):
    torch.manual_seed(seed)
    model = PlantedSplitCNN(n_modules, width)
    x, y = planted_images(2000, n_modules=n_modules, seed=seed)
    _train(model, x, y, epochs, seed, [(model.out, block_masks([width, 2 * n_modules], n_modules)[0])])
    per = width // n_modules
    whole = np.repeat(np.arange(n_modules), per)
    return model, (whole, whole[: width // 2], whole[width // 2:], whole)


def test_planted_modules_through_a_channel_split_are_recovered_and_detected():
    model, groups = planted_split_cnn()
    test, held = planted_images(600, seed=1), planted_images(300, seed=2)[0]
    check_planted(model, groups, test, held, n_layers=4)


# ----- a layer whose weight is a parameter and whose bias is computed -----------------------------------
def test_linear_with_a_computed_bias_is_a_layer_plus_the_bias():
    torch.manual_seed(0)
    m = ComputedBiasViT().eval()
    x = torch.randn(3, 6, 5)
    a = NetworkAdapter(m, x)
    assert a.layer_names == ["blocks.0.fc1", "blocks.1.fc1"]
    qkv = a.gm.get_submodule("blocks.0.qkv")
    assert isinstance(qkv, nn.Linear) and qkv.bias is None and qkv.weight is m.blocks[0].qkv.weight
    torch.testing.assert_close(a.values([], logits=True)(x), m(x))


# ----- several heads -------------------------------------------------------------------------------
@pytest.mark.parametrize("stacked", [False, True])
def test_heads_whose_scores_are_averaged_are_output_layers(stacked):
    torch.manual_seed(0)
    m = DistilledCNN(stacked).eval()
    x = torch.randn(3, 3, 8, 8)
    a = NetworkAdapter(m, x)
    assert a.layer_names == ["c1", "c2"] and a.n_classes == 4      # a CNN's dense layers are left out by default
    assert [n.target for n in a.structure.output_layers] == ["head", "head_dist"]
    torch.testing.assert_close(a.values([], logits=True)(x), m(x))
    b = NetworkAdapter(m, x, include_dense=True)
    assert b.layer_names == ["c1", "c2", "pre"]
    part = modlens.partition(b, "weights/global", n_clusters=2, random_state=0)
    assert len(part.labels) == 3


def test_mlp_with_two_heads_sums_their_edges_in_the_weight_graph():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 6)
            self.head, self.head_dist = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            h = F.relu(self.fc2(F.relu(self.fc1(x))))
            return (self.head(h) + self.head_dist(h)) / 2

    m = TwoHeads()
    a = NetworkAdapter(m, torch.randn(2, 5))
    blocks = {(i, j): b for i, j, b in a.weight_blocks()}
    expected = (m.head.weight.abs() + m.head_dist.weight.abs()).detach().double().numpy()
    np.testing.assert_allclose(blocks[(2, 3)], expected)


def test_distilled_transformer_head_is_the_sum_of_both_heads_in_the_residual_graph():
    torch.manual_seed(0)
    m = ComputedBiasViT(distilled=True).eval()
    x = torch.randn(3, 6, 5)
    a = NetworkAdapter(m, x)
    assert a.layer_names == ["blocks.0.fc1", "blocks.1.fc1"]
    head = a.residual_parts()["head"]
    np.testing.assert_allclose(head, (m.head.weight + m.head_dist.weight).detach().double().numpy())
    torch.testing.assert_close(a.values([], logits=True)(x), m(x))
    assert len(modlens.partition(a, "weights/global", n_clusters=2, random_state=0).labels) == 2


# ----- padding --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capture", ["export", "fx"])
def test_channel_padding_is_an_offset_and_spatial_padding_passes_channels(capture):
    torch.manual_seed(0)
    m = PaddedNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.layer_names == ["c1", "c2", "c3"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks()}
    c3 = m.c3.weight.detach().abs().double().sum((2, 3)).numpy()
    np.testing.assert_allclose(blocks[("c1", "c3")], c3[:, 2:6])     # c1's 4 channels at offset 2 of the sum
    np.testing.assert_allclose(blocks[("c2", "c3")], c3)
    np.testing.assert_allclose(blocks[("c1", "c2")], m.c2.weight.detach().abs().double().sum((2, 3)).numpy())


# ----- per-sample norms written as operations --------------------------------------------------------
def test_grn_folds_gamma_and_has_no_edges_through_the_statistic():
    torch.manual_seed(0)
    m = GRNNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8))
    assert a.layer_names == ["stem", "fc1", "fc2", "pw1", "pw2", "c"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks()}
    fc2 = m.fc2.weight.detach().abs().double().sum((2, 3)).numpy()
    gamma = m.grn1.gamma.detach().abs().double().reshape(-1).numpy()
    # x + gamma * (x * N(x)) + beta: two paths into fc2, the identity and the gated one scaled by |gamma|
    np.testing.assert_allclose(blocks[("fc1", "fc2")], fc2 * gamma[None, :] + fc2)
    pw2 = m.pw2.weight.detach().abs().double().numpy()
    gamma2 = m.grn2.gamma.detach().abs().double().reshape(-1).numpy()
    np.testing.assert_allclose(blocks[("pw1", "pw2")], pw2 * gamma2[None, :] + pw2)
    sinks = a.structure.sinks[a.layer_node(1)]
    assert {str(s.user.target) for s in sinks} == {"aten.linalg_vector_norm.default", "aten.mul.Tensor",
                                                   "aten.add.Tensor"}


# ----- token flattening and token-mixing MLPs -------------------------------------------------------
@pytest.mark.parametrize("resmlp", [False, True])
def test_token_mixing_maps_are_not_neuron_layers(resmlp):
    torch.manual_seed(0)
    m = TinyMixer(resmlp=resmlp).eval()
    x = torch.randn(3, 3, 8, 8)
    a = NetworkAdapter(m, x)
    assert a.is_transformer and a.layer_names == ["blocks.0.fc1", "blocks.1.fc1"]
    mixers = sorted(n.target for n in a.structure.token_mixers)
    assert mixers == (["blocks.0.tok", "blocks.1.tok"] if resmlp else
                      ["blocks.0.tok1", "blocks.0.tok2", "blocks.1.tok1", "blocks.1.tok2"])
    parts = a.residual_parts()
    assert parts["embedding"].shape == (8, 3 * 4 * 4) and parts["head"].shape == (4, 8)
    assert len(modlens.partition(a, "weights/global", n_clusters=2, random_state=0).labels) == 2


def test_flattened_patch_tokens_keep_their_channels():
    torch.manual_seed(0)
    m = TokensCNN().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), include_dense=True)
    assert a.layer_names == ["c", "fc"] and not a.is_transformer
    (i, j, block), = a.weight_blocks()
    np.testing.assert_allclose(block, m.fc.weight.detach().abs().double().numpy())


def test_a_linear_over_the_width_of_a_conv_map_is_still_refused():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="without a flatten"):
        NetworkAdapter(model, torch.randn(2, 2, 6, 6))


# ----- channel shuffle ---------------------------------------------------------------------------------
@pytest.mark.parametrize("capture", ["export", "fx"])
def test_channel_shuffle_permutes_the_edges(capture):
    torch.manual_seed(0)
    m = ShuffleNetV2Like().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.layer_names == ["stem", "pw1", "dw", "pw2", "b1", "b2", "post"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    l1 = lambda conv: conv.weight.detach().abs().double().sum((2, 3)).numpy()  # noqa: E731
    # cat(x1, y) has 8 channels j; the shuffle by 2 puts j at (j % 4) * 2 + j // 4
    shuffled = [(j % 4) * 2 + j // 4 for j in range(8)]
    np.testing.assert_allclose(blocks[("stem", "b1")], np.hstack([l1(m.b1)[:, shuffled[:4]], np.zeros((6, 4))]))
    np.testing.assert_allclose(blocks[("pw2", "b1")], l1(m.b1)[:, shuffled[4:]])
    # cat(b1, b2) has 12 channels; the shuffle by 3 puts j at (j % 4) * 3 + j // 4
    post = l1(m.post)
    np.testing.assert_allclose(blocks[("b2", "post")], post[:, [((j + 6) % 4) * 3 + (j + 6) // 4 for j in range(6)]])


# ----- groups of channels: selective kernels and radix split attention ------------------------------------
@pytest.mark.parametrize("radix", [False, True])
def test_groups_summed_join_each_channel_to_its_place_in_the_group(radix):
    torch.manual_seed(0)
    m = SelectiveKernelNet(radix).eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 6, 6))
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks()}
    l1 = lambda conv: conv.weight.detach().abs().double().sum((2, 3)).numpy()  # noqa: E731
    # channel p of the group value sits at p % 8 once the groups are summed: in the squeeze (reduce) and
    # through the gate (post); the gate's own channels (select) reach post the same way
    place = [p % 8 for p in range(16)]
    sources = ["conv"] if radix else ["p0", "p1"]
    for src in sources:
        np.testing.assert_allclose(blocks[(src, "post")], l1(m.post) if not radix else l1(m.post)[:, place])
        np.testing.assert_allclose(blocks[(src, "reduce")], l1(m.reduce) if not radix else l1(m.reduce)[:, place])
    np.testing.assert_allclose(blocks[("select", "post")], l1(m.post)[:, place])
    lesion_users = {str(s.user.target) for s in a.structure.sinks[a.layer_node(a.layer_names.index(sources[0]))]}
    assert lesion_users == ({"aten.reshape.default"} if radix else {"aten.stack.default"})


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_other_reshapes_of_the_channels_are_refused_in_one_line(capture):
    class ThreeFactors(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(2, 2)

        def forward(self, x):
            h = self.c(x)
            return self.fc(h.reshape(h.shape[0], 2, 2, 2, 16).sum((1, 2, 4)))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(ThreeFactors(), torch.randn(2, 3, 4, 4), capture=capture)
    msg = str(info.value)
    assert ("reshape of the channel" in msg or "cannot tell what" in msg) and "layer 'c'" in msg and "\n" not in msg


def test_a_slice_of_a_concatenation_carries_only_the_branch_inside_it():
    class DualPath(nn.Module):   # DPN: cat of two branches, then a slice holding one of them, batch-normalized
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn, self.c, self.d = nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1), nn.Conv2d(8, 5, 1)
            self.fc = nn.Linear(10, 3)

        def forward(self, x):
            h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
            y = torch.cat([self.c(self.bn(h[:, 4:8])), self.d(h)], 1)
            return self.fc(y.mean((2, 3)))

    m = DualPath().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 4, 4))
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks()}
    assert set(blocks) == {("a", "d"), ("b", "c"), ("b", "d")}


# ----- upsampling (FPN- and U-Net-style paths) -----------------------------------------------------
class UpsampledNet(nn.Module):
    """A coarse path upsampled back to the fine one and added to it (an FPN/U-Net-style merge)."""

    def __init__(self, mode="nearest", module=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.c4 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.mode = mode
        self.up = nn.Upsample(scale_factor=2, mode=mode) if module else None

    def forward(self, x):
        a = F.relu(self.c1(x))
        lateral = self.c3(F.relu(self.c2(a)))
        u = self.up(lateral) if self.up is not None else F.interpolate(lateral, size=a.shape[-2:], mode=self.mode)
        return self.fc(F.relu(self.c4(F.relu(a + u))).mean((2, 3)))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("mode,module", [("nearest", False), ("bilinear", False), ("nearest", True),
                                         ("bilinear", True)])
def test_upsampling_passes_channels_and_lesions_equal_the_oracle(mode, module, capture):
    torch.manual_seed(0)
    m = UpsampledNet(mode, module).eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.layer_names == ["c1", "c2", "c3", "c4"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks()}
    np.testing.assert_allclose(blocks[("c3", "c4")], _l1(m.c4))   # through the upsampling, channel for channel
    np.testing.assert_allclose(blocks[("c1", "c4")], _l1(m.c4))   # and the skip path
    _oracle_check(UpsampledNet(mode, module), (3, 8, 8), capture=capture)


# ----- concatenations of x with f(x): lesions through two paths ----------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))], 1)


class DenseNetLike(nn.Module):
    """DenseNet: every dense layer concatenates its input with a function of it, so a channel reaches
    later layers directly and through every layer in between; a transition conv after the block."""

    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(*[_DenseLayer(6 + i * growth, growth) for i in range(3)])
        self.trans_norm, self.trans = nn.BatchNorm2d(6 + 3 * growth), nn.Conv2d(6 + 3 * growth, 8, 1)
        self.norm, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.block(self.stem(x))
        h = F.avg_pool2d(self.trans(F.relu(self.trans_norm(h))), 2)
        return self.fc(F.relu(self.norm(h)).mean((2, 3)))


class OSANet(nn.Module):
    """VoVNet/HGNet one-shot aggregation: ``cat(x, f1(x), f2(f1(x)))`` into a 1x1 conv, with a
    residual; GhostNet's ghost module ``cat(p, dwconv(p))``; Res2Net's hierarchical splits, each
    part added to the previous part's output before its conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.f1, self.f2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.agg = nn.Conv2d(8 + 6 + 6, 8, 1)
        self.primary, self.cheap = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.r1, self.r2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8 + 12, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = F.relu(self.f1(x))
        b = F.relu(self.f2(a))
        x = x + F.relu(self.agg(torch.cat([x, a, b], 1)))
        p = F.relu(self.primary(x))
        g = torch.cat([p, F.relu(self.cheap(p))], 1)
        s0, s1 = g.split(4, 1)
        y0 = F.relu(self.r1(s0))
        y1 = F.relu(self.r2(s1 + y0))
        h = torch.cat([x, y0, y1, s1], 1)
        return self.fc(h.mean((2, 3)))


CONCAT_FAMILIES = {"dense": (DenseNetLike, (3, 8, 8)), "osa-ghost-res2": (OSANet, (3, 8, 8))}


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("family", list(CONCAT_FAMILIES))
def test_concatenation_with_a_function_of_itself_lesions_equal_the_oracle(family, capture):
    make, shape = CONCAT_FAMILIES[family]
    torch.manual_seed(0)
    a = _oracle_check(make(), shape, capture=capture)
    assert a.capture_method == capture
    # the paths through two sinks are recomputed with their channels masked on the edge: the plans
    # of the layers whose channels are concatenated with a function of themselves have inner masks
    inner = {a.layer_names[i] for i in range(len(a.layer_sizes)) if a.lesion_plan(i).inner}
    expected = {"dense": {"stem", "block.0.conv2", "block.1.conv2"}, "osa-ghost-res2": {"stem", "f1", "primary", "r1"}}
    assert inner == expected[family]


@pytest.mark.parametrize("family", list(CONCAT_FAMILIES))
def test_concatenation_lesions_in_channels_last_equal_contiguous(family):
    make, shape = CONCAT_FAMILIES[family]
    torch.manual_seed(0)
    model = make().double().eval()
    with torch.no_grad():
        _randomize(model)
    x = torch.randn(40, *shape, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2])
    y = model(x).argmax(-1)
    rng = np.random.default_rng(1)
    last = IncrementalLesions(a, x, y, channels_last=True, batch_size=16)
    first = IncrementalLesions(a, x, y, channels_last=False)
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=max(1, width // 2), replace=False) for _ in range(5)]
        np.testing.assert_array_equal(last.correct_counts(layer, sets), first.correct_counts(layer, sets),
                                      err_msg=a.layer_names[layer])


class TokenMaxHeadViT(ComputedBiasViT):
    """VOLO's token-labelling head: the class token's scores plus half the best token's scores of
    an auxiliary head over the other tokens, ``head(x[:, 0]) + 0.5 * aux(x[:, 1:]).max(1)[0]``."""

    def __init__(self, amax=False):
        super().__init__()
        self.aux, self.amax = nn.Linear(8, 4), amax

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        for blk in self.blocks:
            qkv = blk.qkv(blk.norm1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, d)
            x = x + blk.proj(h)
            x = x + blk.fc2(F.gelu(blk.fc1(blk.norm2(x))))
        x = self.norm(x)
        aux = self.aux(x[:, 1:])
        best = aux.amax(1) if self.amax else aux.max(1)[0]
        return self.head(x[:, 0]) + 0.5 * best


@pytest.mark.parametrize("amax", [False, True])
@pytest.mark.parametrize("capture", ["export", "fx"])
def test_best_token_head_is_an_output_layer(capture, amax):
    torch.manual_seed(0)
    a = _oracle_check(TokenMaxHeadViT(amax), (6, 5), capture=capture)
    assert a.layer_names == ["blocks.0.fc1", "blocks.1.fc1"]
    assert {h.target for h in a.structure.output_layers} == {"head", "aux"}


def test_max_over_classes_after_the_output_layer_is_refused():
    class MaxOverClasses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x))).amax(-1, keepdim=True)

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(MaxOverClasses(), torch.randn(2, 5))
    assert "amax" in str(info.value) and "\n" not in str(info.value)


# ----- modes set around a region (torch.autocast disabled, torch.set_grad_enabled) ---------------------
class ModeRegionsNet(nn.Module):
    """EfficientViT computes its attention under ``torch.autocast(enabled=False)``: export wraps the
    region in a higher-order op whose body is a subgraph; here with layers inside both kinds."""

    def __init__(self, autocast_enabled=False):
        super().__init__()
        self.enabled = autocast_enabled
        self.a, self.b, self.c = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            g = F.relu(self.b(h)) + h
        with torch.set_grad_enabled(False):
            g = F.relu(self.c(g))
        return self.fc(g.mean((2, 3)))


def test_layers_inside_mode_regions_are_captured_and_lesioned():
    torch.manual_seed(0)
    a = _oracle_check(ModeRegionsNet(), (3, 6, 6), capture="export")
    assert a.capture_method == "export" and a.layer_names == ["a", "b", "c"]
    blocks = {(a.layer_names[i], a.layer_names[j]) for i, j, _ in a.weight_blocks()}
    assert blocks == {("a", "b"), ("a", "c"), ("b", "c")}


def test_autocast_to_another_precision_is_refused_in_one_line():
    with pytest.raises(Exception) as info:
        NetworkAdapter(ModeRegionsNet(autocast_enabled=True).eval(), torch.randn(2, 3, 6, 6), capture="export")
    msg = str(info.value)
    assert "autocast" in msg and "enabled=True" in msg and "\n" not in msg


# ----- powers with a constant exponent (StarReLU: s * relu(x) ** 2 + b, MetaFormer-V2) ------------------
class StarReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 5, 1)
        self.scale, self.bias = nn.Parameter(torch.tensor(0.8)), nn.Parameter(torch.tensor(-0.1))
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = self.scale * F.relu(self.a(x)) ** 2 + self.bias
        h = torch.pow(torch.tanh(self.b(h)), 3) + torch.square(h) * 0.1
        return self.fc(F.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_powers_with_a_constant_exponent_are_element_wise(capture):
    torch.manual_seed(0)
    a = _oracle_check(StarReLUNet(), (3, 6, 6), capture=capture)
    assert a.layer_names == ["a", "b", "c"]
    blocks = {(a.layer_names[i], a.layer_names[j]) for i, j, _ in a.weight_blocks()}
    assert blocks == {("a", "b"), ("a", "c"), ("b", "c")}


def test_a_power_of_one_activation_by_another_is_refused():
    class PowNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((torch.sigmoid(self.a(x)) ** torch.sigmoid(self.b(x))).mean((2, 3)))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(PowNet(), torch.randn(2, 3, 4, 4))
    assert "pow" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("cardinality", [1, 2])
def test_radix_softmax_permutes_the_attention_channels_into_their_groups(capture, cardinality):
    torch.manual_seed(0)
    m = RadixSplitAttention(radix=2, cardinality=cardinality).eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 6, 6), capture=capture)
    assert a.capture_method == capture and a.layer_names == ["stem", "conv", "reduce", "select", "post"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    # select's channel s = (k, r, j) in (cardinality, radix, width / cardinality) order moves to
    # (r, k, j), and sits at k * per + j once the radix groups are summed
    per = 8 // cardinality
    place = [(s // (2 * per)) * per + s % per for s in range(16)]
    np.testing.assert_allclose(blocks[("select", "post")], _l1(m.post)[:, place])
    np.testing.assert_allclose(blocks[("conv", "post")], _l1(m.post)[:, [p % 8 for p in range(16)]])
    assert {str(s.user.target) for s in a.structure.sinks[a.layer_node(3)]} <= {"aten.view.default", "view"}
    _oracle_check(RadixSplitAttention(radix=2, cardinality=cardinality), (3, 6, 6), capture=capture)


def test_other_rearrangements_of_an_attention_vector_are_refused_in_one_line():
    class Scrambled(nn.Module):   # a (B, 8, 1, 1) vector viewed as (B, 2, 4) and summed over a part
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(4, 2)

        def forward(self, x):
            a = self.c(x.mean((2, 3), keepdim=True))
            return self.fc(a.view(a.size(0), 2, 4).sum(1))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(Scrambled(), torch.randn(2, 3, 4, 4))
    msg = str(info.value)
    assert "reshape of the channel" in msg and "'c'" in msg and "\n" not in msg
