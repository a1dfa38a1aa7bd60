"""Hierarchical vision transformers, second round (docs/transformers.md, "Stages"): stage boundaries
that the first round refused. Tiny hand-written models on both capture paths; the weight graph's
stage maps are checked against the model's weights and the incremental lesion engine against the
plain oracle on every layer (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")


def _np(t):
    return t.detach().double().numpy()


def _lesions_equal_the_oracle(model, shape, capture, n=48):
    """Centre the head on random inputs, capture, and compare fast lesions with the oracle on every layer."""
    torch.manual_seed(1)
    x = torch.randn(n, *shape, dtype=torch.float64)
    with torch.no_grad():
        model.head.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    a = NetworkAdapter(model, x[:2], capture=capture)
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 2, width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1
    return a


class Block(nn.Module):
    """Pre-norm attention and MLP over a (B, T, d) stream."""

    def __init__(self, d, hidden=8):
        super().__init__()
        self.q, self.n = nn.Linear(d, d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = x + F.scaled_dot_product_attention(self.q(x), x, x)
        return x + self.fc2(F.gelu(self.fc1(self.n(x))))


class ChannelsFirstStages(nn.Module):
    """Swin-V2-CR's layout: the stream is kept (B, C, H, W) between stages and permuted to (B, H, W, C)
    for the blocks and for the patch merging (norm over the 4 neighbours, then Linear(4 d0 -> d1))."""

    def __init__(self, d0=4, d1=8):
        super().__init__()
        self.embed = nn.Conv2d(3, d0, 2, stride=2)
        self.b0, self.b1 = Block(d0), Block(d1)
        self.merge_norm, self.reduction = nn.LayerNorm(4 * d0), nn.Linear(4 * d0, d1, bias=False)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.embed(x)                                    # (B, d0, 4, 4)
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1)                            # stage 0 blocks read (B, H, W, C)
        x = self.b0(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        x = x.permute(0, 3, 1, 2)                            # the stage ends channels-first
        x = x.permute(0, 2, 3, 1)                            # stage 1 starts channels-last: patch merging
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.reduction(self.merge_norm(x))               # (B, 2, 2, d1)
        x = self.b1(x.flatten(1, 2))
        return self.head(x.mean(1))


class ChannelsMovedIntoTheMerging(nn.Module):
    """A patch merging whose Linear reads each channel's 4 neighbours side by side (channels interleaved
    with the neighbours, not whole copies of the stream): refused."""

    def __init__(self, d0=4, d1=8):
        super().__init__()
        self.embed = nn.Conv2d(3, d0, 2, stride=2)
        self.b0, self.b1 = Block(d0), Block(d1)
        self.reduction = nn.Linear(4 * d0, d1)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        x = self.b0(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        x = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4).flatten(3)
        x = self.b1(self.reduction(x).flatten(1, 2))
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_stream_permuted_to_channels_first_between_stages_is_followed_to_the_patch_merging(capture):
    torch.manual_seed(0)
    model = ChannelsFirstStages().double().eval()
    a = _lesions_equal_the_oracle(model, (3, 8, 8), capture)
    assert a.layer_names == ["b0.fc1", "b1.fc1"]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1]
    (t,) = parts["transitions"]
    w = _np(model.reduction.weight) * _np(model.merge_norm.weight)[None, :]
    np.testing.assert_allclose(t.kernel[:, :, 0, :], w.reshape(8, 4, 4).transpose(0, 2, 1))
    # the channels may move and come back, but the merging must still read whole copies of them
    a = NetworkAdapter(ChannelsMovedIntoTheMerging().eval(), torch.randn(2, 3, 8, 8), capture=capture)
    with pytest.raises(UnsupportedModelError, match="moves the stream's channels before the patch merging Linear "
                       "'reduction'") as err:
        a.residual_parts()
    assert "\n" not in str(err.value)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    return bn


def _bn_scale(bn):
    return _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)


class LocalConvBlock(nn.Module):
    """TinyViT's block: attention, then a 3x3 depthwise conv + BatchNorm that the whole stream passes
    through, then the MLP (its norm inside)."""

    def __init__(self, d, hidden=8):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.local, self.local_bn = nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False), _bn(d)
        self.n, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x, h, w):
        b, t, c = x.shape
        x = x + F.scaled_dot_product_attention(self.q(x), x, x)
        x = self.local_bn(self.local(x.transpose(1, 2).reshape(b, c, h, w))).flatten(2).transpose(1, 2)
        return x + self.fc2(F.gelu(self.fc1(self.n(x))))


class ConvChainStages(nn.Module):
    """TinyViT's stages: local convs in every block and a downsampling made of three convs with batch
    norms and activations between them (1x1, 3x3 depthwise of stride 2, 1x1)."""

    def __init__(self, d0=4, d1=6, channels=3):
        super().__init__()
        self.embed = nn.Conv2d(channels, d0, 2, stride=2)
        self.b0, self.b1, self.b2 = LocalConvBlock(d0), LocalConvBlock(d0), LocalConvBlock(d1)
        self.conv1, self.bn1 = nn.Conv2d(d0, d1, 1, bias=False), _bn(d1)
        self.conv2, self.bn2 = nn.Conv2d(d1, d1, 3, stride=2, padding=1, groups=d1, bias=False), _bn(d1)
        self.conv3, self.bn3 = nn.Conv2d(d1, d1, 1, bias=False), _bn(d1)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        x = self.b1(self.b0(x.flatten(2).transpose(1, 2), h, w), h, w)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.bn3(self.conv3(F.gelu(self.bn2(self.conv2(F.gelu(self.bn1(self.conv1(x))))))))
        x = self.b2(x.flatten(2).transpose(1, 2), h // 2, w // 2)
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_local_convs_and_a_chain_of_convs_are_stream_maps(capture):
    torch.manual_seed(0)
    model = ConvChainStages().double().eval()
    a = _lesions_equal_the_oracle(model, (3, 8, 8), capture)
    assert a.layer_names == ["b0.fc1", "b1.fc1", "b2.fc1"]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1, 2]

    def gain(blk):   # a stride-1 depthwise conv: its per-channel L1 gain, the BatchNorm's scale folded in
        return np.abs(_np(blk.local.weight)).reshape(-1, 9).sum(1) * np.abs(_bn_scale(blk.local_bn))

    local, down = parts["transitions"]
    np.testing.assert_allclose(local.kernel[:, :, 0, 0], np.diag(gain(model.b1)))
    assert local.stride == (1, 1)
    w1 = _np(model.conv1.weight)[:, :, 0, 0] * _bn_scale(model.bn1)[:, None]
    dw = _np(model.conv2.weight)[:, 0] * _bn_scale(model.bn2)[:, None, None]
    w3 = _np(model.conv3.weight)[:, :, 0, 0] * _bn_scale(model.bn3)[:, None]
    want = np.einsum("om,myx,mi->oiyx", gain(model.b2)[:, None] * w3, dw, w1)
    np.testing.assert_allclose(down.kernel, want)
    assert down.stride == (2, 2)


class BranchConvBlock(nn.Module):
    """EdgeNeXt's conv block on a (B, C, H, W) stream: x + permute(mlp(norm(permute(dwconv(x))))): the
    depthwise conv is on the branch, the shortcut bypasses it."""

    def __init__(self, d, hidden=8):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.n, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.fc2(F.gelu(self.fc1(self.n(y)))).permute(0, 3, 1, 2)


class BranchConvStages(nn.Module):
    """Two EdgeNeXt-style stages (conv blocks, then attention over the tokens), joined by a channels-first
    LayerNorm and a 2x2 conv of stride 2."""

    def __init__(self, d0=4, d1=6):
        super().__init__()
        self.embed = nn.Conv2d(3, d0, 2, stride=2)
        self.c0, self.c1, self.c2 = BranchConvBlock(d0), BranchConvBlock(d0), BranchConvBlock(d1)
        self.q = nn.Linear(d1, d1)
        self.down_norm, self.down = nn.LayerNorm(d0), nn.Conv2d(d0, d1, 2, stride=2)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.c1(self.c0(self.embed(x)))
        x = self.down(self.down_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        x = self.c2(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + F.scaled_dot_product_attention(self.q(t), t, t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_depthwise_conv_on_the_mlp_branch_scales_what_the_mlp_reads(capture):
    torch.manual_seed(0)
    model = BranchConvStages().double().eval()
    a = _lesions_equal_the_oracle(model, (3, 8, 8), capture)
    assert a.layer_names == ["c0.fc1", "c1.fc1", "c2.fc1"]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 0, 1]     # the branch conv is no stream map
    for blk, b in zip([model.c0, model.c1, model.c2], parts["blocks"]):
        gain = np.abs(_np(blk.dw.weight)).reshape(-1, 9).sum(1)
        np.testing.assert_allclose(b.gamma, _np(blk.n.weight) * gain)
        np.testing.assert_allclose(b.w_in, _np(blk.fc1.weight))
    (t,) = parts["transitions"]
    np.testing.assert_allclose(t.kernel, _np(model.down.weight) * _np(model.down_norm.weight)[None, :, None, None])


def test_planted_modules_are_followed_through_a_chain_of_convs_between_stages():
    """Two modules planted in the weights of the TinyViT-style model: each reads its own input channel,
    owns half of every stream and MLP and writes its own classes; the downsampling chain sends module m's
    stage-0 channels to the stage-1 channels at the other end. The weight partition must find the two
    modules across both stages: with the chain read wrongly, the stage-1 units would pair with the wrong
    stage-0 units."""
    import modlens
    from sklearn.metrics import adjusted_rand_score

    torch.manual_seed(0)
    model = ConvChainStages(channels=2).double().eval()
    s0, s1, hid = np.repeat([0, 1], 2), np.repeat([1, 0], 3), np.repeat([0, 1], 4)   # module of each unit
    same = lambda a, b: torch.tensor(a[:, None] == b[None, :], dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        model.embed.weight.mul_(same(s0, np.arange(2))[:, :, None, None])
        for blk, d in ((model.b0, s0), (model.b1, s0), (model.b2, s1)):
            blk.fc1.weight.mul_(same(hid, d))
            blk.fc2.weight.mul_(same(d, hid))
        model.conv1.weight.mul_(same(s1, s0)[:, :, None, None])
        model.conv3.weight.mul_(same(s1, s1)[:, :, None, None])
        model.head.weight.mul_(same(np.array([0, 1, 1]), s1))
    a = NetworkAdapter(model, torch.randn(2, 2, 8, 8, dtype=torch.float64))
    part = modlens.partition(a, "weights/global", n_clusters=2, random_state=0)
    labels = np.concatenate(part.labels)
    assert adjusted_rand_score(np.concatenate([hid, hid, hid]), labels) == 1.0


class GridAndTokenStages(nn.Module):
    """PiT's stages: a class token beside the grid's tokens; between stages the grid goes through a
    grouped conv of stride 2 (each channel to 2 channels) and the class token through a Linear."""

    def __init__(self, d0=4, d1=8):
        super().__init__()
        self.embed = nn.Conv2d(3, d0, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, d0))
        self.b0, self.b1 = Block(d0), Block(d1)
        self.conv = nn.Conv2d(d0, d1, 3, stride=2, padding=1, groups=d0)
        self.fc = nn.Linear(d0, d1)
        self.norm, self.head = nn.LayerNorm(d1), nn.Linear(d1, 3)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        t = self.b0(torch.cat([self.cls.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1))
        cls, grid = self.fc(t[:, :1]), self.conv(t[:, 1:].transpose(1, 2).reshape(b, c, h, w))
        t = self.b1(torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1))
        return self.head(self.norm(t[:, 0]))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_grid_conv_beside_a_class_token_linear_is_one_stage_map_with_a_token_path(capture):
    torch.manual_seed(0)
    model = GridAndTokenStages().double().eval()
    a = _lesions_equal_the_oracle(model, (3, 8, 8), capture)
    assert a.layer_names == ["b0.fc1", "b1.fc1"]
    parts = a.residual_parts()
    assert [b.stage for b in parts["blocks"]] == [0, 1]
    (t,) = parts["transitions"]
    w = _np(model.conv.weight)                     # (8, 1, 3, 3): out channel o reads in channel o // 2
    dense = np.zeros((8, 4, 3, 3))
    for o in range(8):
        dense[o, o // 2] = w[o, 0]
    np.testing.assert_allclose(t.kernel, dense)
    assert t.stride == (2, 2)
    np.testing.assert_allclose(t.token_map, _np(model.fc.weight))
    # the edge: the 9 grid taps and the class token's path, each |.| summed
    got = {(i, j): blk for i, j, blk in a.weight_blocks()}
    b0, b1 = parts["blocks"]
    read = b1.w_in * b1.gamma[None, :]
    want = sum(np.abs(read @ dense[:, :, p, q] @ b0.w_out) for p in range(3) for q in range(3))
    np.testing.assert_allclose(got[(1, 2)], want + np.abs(read @ _np(model.fc.weight) @ b0.w_out))


class ParallelStreams(nn.Module):
    """CrossViT's shape: two branches of different widths side by side, joined only at the head."""

    def __init__(self):
        super().__init__()
        self.embed_a, self.embed_b = nn.Linear(5, 4), nn.Linear(5, 6)
        self.a, self.b = Block(4), Block(6)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.cat([self.a(self.embed_a(x)).mean(1), self.b(self.embed_b(x)).mean(1)], -1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_parallel_streams_of_different_widths_are_refused_in_one_line(capture):
    a = NetworkAdapter(ParallelStreams().eval(), torch.randn(2, 8, 5), capture=capture)
    assert a.layer_names == ["a.fc1", "b.fc1"]
    with pytest.raises(UnsupportedModelError, match=r"the MLP 'b.fc1' \(stream width 6\) runs beside 'a.fc1' "
                       r"\(width 4\).* parallel residual streams") as err:
        a.residual_parts()
    assert "\n" not in str(err.value)


class FusedStages(nn.Module):
    """MobileViT's stages: a transformer over the grid's tokens ends with a norm, a 1x1 conv projects it
    back, a 3x3 conv fuses it with the block's input (a concatenation), and convs (a strided depthwise
    conv, a 1x1 conv) lead into the next transformer."""

    def __init__(self, c=4, d0=6, d1=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.into0 = nn.Conv2d(c, d0, 1)
        self.b0, self.b1 = Block(d0), Block(d1)
        self.norm0 = nn.LayerNorm(d0)
        self.proj, self.proj_bn = nn.Conv2d(d0, c, 1, bias=False), _bn(c)
        self.fusion, self.fusion_bn = nn.Conv2d(2 * c, c, 3, padding=1, bias=False), _bn(c)
        self.dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c)
        self.into1 = nn.Conv2d(c, d1, 1)
        self.head = nn.Linear(d1, 3)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        t = self.norm0(self.b0(self.into0(x).flatten(2).transpose(1, 2)))
        y = self.proj_bn(self.proj(t.transpose(1, 2).reshape(b, -1, h, w)))
        y = F.silu(self.fusion_bn(self.fusion(torch.cat([x, y], 1))))
        y = self.into1(F.silu(self.dw(y)))
        return self.head(self.b1(y.flatten(2).transpose(1, 2)).mean(1))


def _composed(convs, strides):
    """The kernel of convs applied in a row (no padding), read off by pushing one-hot inputs through them."""
    span = 1
    for k, st in zip(convs[::-1], strides[::-1]):
        span = (span - 1) * st + k.shape[2]
    d = convs[0].shape[1]
    v = torch.eye(d * span * span, dtype=torch.float64).reshape(-1, d, span, span)
    for k, st in zip(convs, strides):
        v = F.conv2d(v, torch.from_numpy(k), stride=st)
    return v.reshape(d, span, span, -1).permute(3, 0, 1, 2).numpy()


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_chain_through_a_concatenation_reads_its_channels_at_their_offset(capture):
    torch.manual_seed(0)
    model = FusedStages().double().eval()
    a = _lesions_equal_the_oracle(model, (3, 8, 8), capture)
    assert a.layer_names == ["b0.fc1", "b1.fc1"]
    (t,) = a.residual_parts()["transitions"]
    proj = (_np(model.proj.weight) * _bn_scale(model.proj_bn)[:, None, None, None]
            * _np(model.norm0.weight)[None, :, None, None])
    fusion = _np(model.fusion.weight)[:, 4:] * _bn_scale(model.fusion_bn)[:, None, None, None]   # the chain's half
    dw = np.zeros((4, 4, 3, 3))
    dw[range(4), range(4)] = _np(model.dw.weight)[:, 0]
    want = _composed([proj, fusion, dw, _np(model.into1.weight)], [1, 1, 2, 1])
    np.testing.assert_allclose(t.kernel, want)
    assert t.stride == (2, 2)


class GatingStream(nn.Module):
    """CSATv2's spatial attention: a transformer block on a 1-channel map (the channel mean) whose output
    gates the main stream; its MLP's stream is no stage of the main one."""

    def __init__(self, d=6):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.main = Block(d)
        self.gate_block = Block(1, hidden=4)
        self.after = Block(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.main(self.embed(x))
        g = self.gate_block(x.mean(-1, keepdim=True))
        return self.head(self.after(x * torch.sigmoid(g)).mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_an_mlp_whose_stream_only_gates_the_main_one_is_refused_in_one_line(capture):
    a = NetworkAdapter(GatingStream().eval(), torch.randn(2, 8, 5), capture=capture)
    assert a.layer_names == ["main.fc1", "gate_block.fc1", "after.fc1"]
    with pytest.raises(UnsupportedModelError, match=r"the MLP 'main.fc1' writes a stream of width 6 that reaches the "
                       r"MLP 'gate_block.fc1' \(width 1\) through no layer, by operation 'mean.*: a reduction, "
                       r"broadcast or gate between streams") as err:
        a.residual_parts()
    assert "\n" not in str(err.value)
