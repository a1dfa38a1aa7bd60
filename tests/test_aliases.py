"""Aliases of an operation are read as that operation: ``swapaxes`` and ``swapdims`` are ``transpose``
(torchvision's MaxViT moves its grid-attention windows back with ``torch.swapaxes``). Before, both capture
paths refused them as unknown operations between a layer and its readers. A model written with the
aliases has the neurons, weight graph and lesions of the same model written with ``transpose``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn.adapter import NetworkAdapter
from test_ops_families import _oracle_check


class ChannelsLastMLP(nn.Module):
    """conv stem -> channels moved last by ``swap`` -> a residual MLP over channels -> back -> conv -> head."""

    def __init__(self, swap: str = "swapaxes"):
        super().__init__()
        self.swap = swap
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def _move(self, x):
        if self.swap == "swapaxes":
            return torch.swapaxes(x, 1, 3)
        if self.swap == "swapdims":
            return x.swapdims(1, 3)
        return x.transpose(1, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        t = self._move(h)                                   # (B, W, H, C)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        h = F.relu(self.conv(self._move(t)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("swap", ["swapaxes", "swapdims"])
def test_aliases_of_transpose_are_followed_and_lesions_equal_the_oracle(swap, capture):
    a = _oracle_check(ChannelsLastMLP(swap), (3, 5, 4), capture=capture)
    assert a.capture_method == capture
    assert a.layer_names == ["stem", "fc1", "fc2", "conv"]


@pytest.mark.parametrize("swap", ["swapaxes", "swapdims"])
def test_the_weight_graph_is_that_of_the_model_written_with_transpose(swap):
    torch.manual_seed(0)
    alias = ChannelsLastMLP(swap).double().eval()
    plain = ChannelsLastMLP("transpose").double().eval()
    plain.load_state_dict(alias.state_dict())
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    a, b = NetworkAdapter(alias, x), NetworkAdapter(plain, x)
    assert a.layer_names == b.layer_names and a.layer_sizes == b.layer_sizes
    blocks_a = {(i, j): w for i, j, w in a.weight_blocks()}
    blocks_b = {(i, j): w for i, j, w in b.weight_blocks()}
    assert blocks_a.keys() == blocks_b.keys() and len(blocks_a) >= 4
    for key in blocks_a:
        np.testing.assert_allclose(blocks_a[key], blocks_b[key])
