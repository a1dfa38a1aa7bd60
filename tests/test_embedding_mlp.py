"""An MLP-shaped pair that changes the width before any attention is part of computing the input
embedding (MarkupLM's XPath embedding: Linear -> ReLU -> Linear to the model width), not a block MLP:
the neurons are the blocks' MLPs, and lesions equal the plain oracle (before: refused, "reads a stream
of width ..."). A pair before attention that keeps the width (a residual MLP block, as in CoAtNet's
conv stages) is still a block MLP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from tiny_transformers import Block


class EmbeddedByMLP(nn.Module):
    """(B, T, 6) -> an embedding MLP 6 -> 20 -> 8 -> two blocks -> mean over tokens -> head; with
    ``residual``, a Linear embedding and a residual MLP 8 -> 20 -> 8 before the blocks instead."""

    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.inner, self.act = nn.Linear(8 if residual else 6, 20), nn.ReLU()
        self.to_model = nn.Linear(20, 8)
        self.lift = nn.Linear(6, 8)
        self.blocks = nn.Sequential(Block(8, 12), Block(8, 12))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.residual:
            h = self.lift(x)
            h = h + self.to_model(self.act(self.inner(h)))
        else:
            h = self.to_model(self.act(self.inner(x)))
        return self.head(self.blocks(h).mean(1))


def test_an_embedding_mlp_is_not_a_block_and_lesions_equal_the_oracle():
    torch.manual_seed(0)
    m = EmbeddedByMLP().double().eval()
    x = torch.randn(64, 5, 6, dtype=torch.float64)
    a = NetworkAdapter(m, x[:2])
    assert a.is_transformer and a.layer_names == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    with torch.no_grad():
        for _ in range(3):
            m.head.bias -= m(x).mean(0)
        y = m(x).argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, 4, 8)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y))


def test_a_residual_mlp_before_attention_is_still_a_block():
    torch.manual_seed(0)
    m = EmbeddedByMLP(residual=True).double().eval()
    a = NetworkAdapter(m, torch.randn(4, 5, 6, dtype=torch.float64))
    assert a.layer_names == ["inner", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
