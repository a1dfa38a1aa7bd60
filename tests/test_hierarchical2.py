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
