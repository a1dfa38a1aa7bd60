"""Patch unfolding and folding with kernel == stride (``F.unfold``/``F.fold``, ATen im2col/col2im), as
MobileViT-V2 uses them around a transformer of 1x1 convs over (B, C, pixels per patch, patches): every
value on the way is one input value of the same channel, so the channels are followed unchanged, the
convs over the patches are ordinary conv layers, and lesions equal the plain oracle (float64).
Overlapping patches are refused in one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from test_ops_families import _oracle_check

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


class PatchNet(nn.Module):
    """conv -> unfold(2x2 patches) -> (B, C, 4, L) -> 1x1 convs (an MLP with a residual) -> (B, 4C, L) -> fold
    -> conv."""

    def __init__(self, c=6, hidden=10, patch=2):
        super().__init__()
        self.p = patch
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.up = nn.Conv2d(c, hidden, 1)
        self.down = nn.Conv2d(hidden, c, 1)
        self.proj = nn.Conv2d(c, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        b, c, height, width = h.shape
        patches = F.unfold(h, kernel_size=self.p, stride=self.p).reshape(b, c, self.p * self.p, -1)
        patches = patches + self.down(F.gelu(self.up(patches)))
        b, c, k, n = patches.shape
        h = F.fold(patches.reshape(b, c * k, n), output_size=(height, width), kernel_size=self.p, stride=self.p)
        return self.fc(F.relu(self.proj(h)).mean((2, 3)))


class PixelPatchNet(PatchNet):
    """PatchNet with the patches folded by ``pixel_shuffle`` (timm's exportable MobileViT-V2), and unfolded by
    ``F.unfold`` or by ``pixel_unshuffle``."""

    def __init__(self, unshuffle=False):
        super().__init__()
        self.unshuffle = unshuffle

    def forward(self, x):
        h = F.relu(self.stem(x))
        b, c, height, width = h.shape
        u = F.pixel_unshuffle(h, self.p) if self.unshuffle else F.unfold(h, kernel_size=self.p, stride=self.p)
        patches = u.reshape(b, c, self.p * self.p, -1)
        patches = patches + self.down(F.gelu(self.up(patches)))
        h = F.pixel_shuffle(patches.reshape(b, c * self.p * self.p, height // self.p, width // self.p), self.p)
        return self.fc(F.relu(self.proj(h)).mean((2, 3)))


class LinearAttentionNet(nn.Module):
    """MobileViT-V2's block: unfold, a GroupNorm, linear self-attention written with 1x1 convs (one query channel
    softmaxed over the patches, a context vector broadcast back over them), an FFN, fold, a fusion conv."""

    def __init__(self, c=6, patch=2):
        super().__init__()
        self.c, self.p = c, patch
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(1, c)
        self.qkv = nn.Conv2d(c, 1 + 2 * c, 1)
        self.out = nn.Conv2d(c, c, 1)
        self.norm2 = nn.GroupNorm(1, c)
        self.ffn1, self.ffn2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.proj = nn.Conv2d(c, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = F.silu(self.stem(x))
        b, c, height, width = h.shape
        t = F.unfold(h, kernel_size=(self.p, self.p), stride=(self.p, self.p)).reshape(b, c, self.p * self.p, -1)
        q, k, v = torch.split(self.qkv(self.norm1(t)), [1, self.c, self.c], dim=1)
        context = (k * F.softmax(q, dim=-1)).sum(-1, keepdim=True)
        t = t + self.out(F.relu(v) * context.expand_as(v))
        t = t + self.ffn2(F.silu(self.ffn1(self.norm2(t))))
        b, c, kk, n = t.shape
        h = F.fold(t.reshape(b, c * kk, n), output_size=(height, width), kernel_size=self.p, stride=self.p)
        return self.fc(self.proj(h).mean((2, 3)))


class FoldedRowsNet(nn.Module):
    """A Conv1d writes (B, C * K, L) rows that fold into a (B, C, H, W) map: row r is channel r // K."""

    def __init__(self, c=4, patch=2):
        super().__init__()
        self.p = patch
        self.rows = nn.Conv1d(3, c * patch * patch, 1)
        self.d = nn.Conv2d(c, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):   # x: (B, 3, 16), 16 patches of a 8x8 map
        h = F.fold(F.gelu(self.rows(x)), output_size=(8, 8), kernel_size=self.p, stride=self.p)
        return self.fc(F.relu(self.d(h)).mean((2, 3)))


class SpatialSoftmaxNet(nn.Module):
    """A conv's channels softmaxed over the positions (per channel) gate another conv's channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        scores = F.softmax(self.a(x).flatten(2), dim=-1).reshape(x.shape[0], 4, x.shape[2], x.shape[3])
        return self.fc(F.relu(self.c(F.relu(self.b(x)) * scores * 16)).mean((2, 3)))   # 16: a scale, folded


class PatchLinearNet(nn.Module):
    """Unfolded patches flattened into a Linear: channel c owns the K * L features c * K * L ..."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 9, 7), nn.Linear(7, 4)

    def forward(self, x):
        return self.fc(F.relu(self.fc1(torch.flatten(F.unfold(F.relu(self.stem(x)), 2, stride=2), 1))))


def _l1(conv):
    return conv.weight.detach().abs().double().sum((2, 3)).numpy()


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_unfolded_patches_keep_each_channel_in_the_weight_graph(capture):
    torch.manual_seed(0)
    m = PatchNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.capture_method == capture and a.layer_names == ["stem", "up", "down", "proj"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    assert set(blocks) == {("stem", "up"), ("stem", "proj"), ("up", "down"), ("down", "proj")}
    # unfold -> reshape: channel c of the stem is channel c of the (B, C, 4, L) patches that `up` reads
    np.testing.assert_allclose(blocks[("stem", "up")], _l1(m.up))
    # reshape -> fold: channel c of the patches (the stem's through the residual, and `down`'s) is the
    # folded map's channel c that `proj` reads
    np.testing.assert_allclose(blocks[("stem", "proj")], _l1(m.proj))
    np.testing.assert_allclose(blocks[("down", "proj")], _l1(m.proj))
    # lesions of the stem carry through unfold and reshape to `up`; the residual addition recomputes
    kinds = {(s.kind, s.user.name) for s in a.structure.sinks[a.layer_node(0)]}
    assert ("layer", a.layer_node(1).name) in kinds and {k for k, _ in kinds} == {"layer", "mask"}
    # `down`'s lesions are recomputed from the residual addition; nothing else reads it
    assert {s.kind for s in a.structure.sinks[a.layer_node(2)]} == {"mask"}


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("unshuffle", [False, True])
def test_pixel_shuffle_folds_patches_channel_by_channel(unshuffle, capture):
    torch.manual_seed(0)
    m = PixelPatchNet(unshuffle).eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.capture_method == capture and a.layer_names == ["stem", "up", "down", "proj"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    assert set(blocks) == {("stem", "up"), ("stem", "proj"), ("up", "down"), ("down", "proj")}
    np.testing.assert_allclose(blocks[("stem", "up")], _l1(m.up))
    np.testing.assert_allclose(blocks[("stem", "proj")], _l1(m.proj))
    np.testing.assert_allclose(blocks[("down", "proj")], _l1(m.proj))
    _oracle_check(PixelPatchNet(unshuffle), (3, 8, 8), capture=capture)


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_linear_attention_over_patches_edges(capture):
    torch.manual_seed(0)
    m = LinearAttentionNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 8, 8), capture=capture)
    assert a.capture_method == capture and not a.is_transformer
    assert a.layer_names == ["stem", "qkv", "out", "ffn1", "ffn2", "proj"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    c = m.c
    # qkv's keys (channels 1..c) and values (c+1..2c) reach `out` at column j; the one query channel
    # scales every key through the broadcast softmax: no edge
    expected = np.zeros((c, 1 + 2 * c))
    expected[:, 1:1 + c] = _l1(m.out)
    expected[:, 1 + c:] = _l1(m.out)
    np.testing.assert_allclose(blocks[("qkv", "out")], expected)
    # the stem reaches qkv through unfold, reshape and a GroupNorm (its gamma folded: ones at init)
    np.testing.assert_allclose(blocks[("stem", "qkv")], _l1(m.qkv))
    # the stream, after fold, reaches the fusion conv channel by channel
    for writer in ("stem", "out", "ffn2"):
        np.testing.assert_allclose(blocks[(writer, "proj")], _l1(m.proj))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("make", [PatchNet, LinearAttentionNet, FoldedRowsNet, SpatialSoftmaxNet, PatchLinearNet])
def test_lesions_through_unfold_and_fold_equal_the_oracle(make, capture):
    shape = (3, 16) if make is FoldedRowsNet else (3, 6, 6) if make is PatchLinearNet else (3, 8, 8)
    a = _oracle_check(make(), shape, capture=capture)
    assert a.capture_method == capture


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_folded_rows_of_a_layer_join_their_channel(capture):
    torch.manual_seed(0)
    m = FoldedRowsNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 16), capture=capture)
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    # row r of `rows` is one pixel of channel r // 4 of the folded map
    np.testing.assert_allclose(blocks[("rows", "d")], np.repeat(_l1(m.d), 4, axis=1))
    # a lesion of some rows zeroes part of a channel's positions: recomputed from the fold on
    fold = a.layer_node(1).args[0]
    assert [(s.kind, s.user) for s in a.structure.sinks[a.layer_node(0)]] == [("mask", fold)]


def test_softmax_over_positions_is_followed_per_channel():
    torch.manual_seed(0)
    m = SpatialSoftmaxNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 6, 6))
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    np.testing.assert_allclose(blocks[("a", "c")], 16 * _l1(m.c))
    np.testing.assert_allclose(blocks[("b", "c")], 16 * _l1(m.c))
    assert {s.kind for s in a.structure.sinks[a.layer_node(0)]} == {"mask"}   # softmax(0) is not 0


def test_flattened_patches_give_each_channel_its_block_of_features():
    torch.manual_seed(0)
    m = PatchLinearNet().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 6, 6), include_dense=True)
    assert a.layer_names == ["stem", "fc1"]
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    w = m.fc1.weight.detach().abs().double().numpy()
    np.testing.assert_allclose(blocks[("stem", "fc1")], w.reshape(7, 4, 36).sum(2))


def test_partition_without_data_through_unfold():
    import modlens

    torch.manual_seed(0)
    part = modlens.partition(LinearAttentionNet().eval(), "weights/global", n_clusters=3, random_state=0)
    assert part.layer_sizes == (6, 13, 6, 12, 6, 5)


@pytest.mark.parametrize("settings", [dict(kernel_size=3, stride=2), dict(kernel_size=2, stride=2, padding=1),
                                      dict(kernel_size=2, stride=2, dilation=2)])
@pytest.mark.parametrize("capture", ["export", "fx"])
def test_overlapping_unfold_is_refused_in_one_line(settings, capture):
    class Overlapping(nn.Module):
        def __init__(self):
            super().__init__()
            rows = 4 * settings["kernel_size"] ** 2
            self.c, self.mix, self.fc = nn.Conv2d(3, 4, 1), nn.Conv1d(rows, 6, 1), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.mix(F.unfold(self.c(x), **settings)).mean(-1))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(Overlapping(), torch.randn(2, 3, 8, 8), capture=capture)
    msg = str(info.value)
    assert "\n" not in msg and "'c'" in msg and "kernel == stride" in msg
    assert ("im2col" if capture == "export" else "unfold") in msg


def test_overlapping_fold_is_refused_in_one_line():
    class OverlappingFold(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d, self.fc = nn.Conv1d(3, 4 * 9, 1), nn.Conv2d(4, 5, 1), nn.Linear(5, 2)

        def forward(self, x):   # (B, 36, 9) rows folded into a 7x7 map by overlapping 3x3 patches of stride 2
            return self.fc(self.d(F.fold(self.c(x), output_size=(7, 7), kernel_size=3, stride=2)).mean((2, 3)))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(OverlappingFold(), torch.randn(2, 3, 9))
    msg = str(info.value)
    assert "\n" not in msg and "col2im" in msg and "'c'" in msg and "kernel == stride" in msg


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_expanding_the_channels_is_refused_in_one_line(capture):
    class ChannelBroadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.one, self.wide, self.fc = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            w = self.wide(x)
            return self.fc((self.one(x).expand_as(w) + w).mean((2, 3)))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(ChannelBroadcast(), torch.randn(2, 3, 4, 4), capture=capture)
    msg = str(info.value)
    assert "\n" not in msg and "expand_as" in msg and "'one'" in msg and "broadcasts the channel dimension" in msg
