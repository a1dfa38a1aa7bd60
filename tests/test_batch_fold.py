"""A model that folds part of each sample's positions into the batch (timm's MobileViT runs its
transformer on (B * P, N, C)) gives a layer k rows per sample; recorded activations are one row per
sample, the L1 sums of the sample's rows, whichever way the rows are ordered. Before, the activation
graph failed ("layers 0 and 3 have different numbers of samples")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modlens
from modlens.nn._ops import UnsupportedModelError
from modlens.nn.adapter import NetworkAdapter


class Folded(nn.Module):
    """(B, 3, 4, 4) -> conv -> its 2x2 patch pixels folded into the batch, sample-major (rows b * 4 + p)
    or position-major (rows p * B + b) -> an MLP over the 4 patches of each row -> unfolded -> head."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.head = nn.Linear(6, 4)

    def fold(self, x):   # (B, C, 4, 4) -> (B * 4, 4 patches, C)
        b, c = x.shape[:2]
        x = x.reshape(b, c, 2, 2, 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(b, 4, 4, c)   # (B, pixel, patch, C)
        return x.reshape(b * 4, 4, c) if self.order == "sample" else x.transpose(0, 1).reshape(4 * b, 4, c)

    def forward(self, x):
        h = self.fold(F.relu(self.conv(x)))
        h = h + self.fc2(F.relu(self.fc1(h)))
        b = x.shape[0]
        h = h.reshape(b, 4, 4, 6) if self.order == "sample" else h.reshape(4, b, 4, 6).transpose(0, 1)
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("order", ["sample", "position"])
def test_rows_of_a_sample_are_summed_whatever_their_order(order):
    torch.manual_seed(0)
    m = Folded(order).eval()
    x = torch.randn(6, 3, 4, 4)
    a = NetworkAdapter(m, x[:2])
    fc1 = a.layer_names.index("fc1")
    acts = a.record(iter([x[:4], x[4:]]))
    assert all(z.shape[0] == 6 for z in acts)
    with torch.no_grad():
        pre = m.fc1(m.fold(F.relu(m.conv(x))))                       # (rows, 4, 10)
        rows = pre.abs().sum(1)
        want = rows.reshape(6, 4, 10).sum(1) if order == "sample" else rows.reshape(4, 6, 10).sum(0)
    np.testing.assert_allclose(acts[fc1], want.numpy(), rtol=1e-5, atol=1e-5)
    part = modlens.partition(m, "activations/global", data=x, n_clusters=2, random_state=0)
    assert list(part.layer_names) == a.layer_names


def test_another_reduction_of_folded_rows_is_refused_in_one_line():
    torch.manual_seed(0)
    m = Folded("sample").eval()
    x = torch.randn(4, 3, 4, 4)
    a = NetworkAdapter(m, x[:2])
    with pytest.raises(UnsupportedModelError, match="folded into the batch .*reduce='l1' only") as err:
        a.record(iter([x]), reduce="matrix_1_norm")
    assert "\n" not in str(err.value)
