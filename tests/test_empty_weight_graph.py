"""A weight graph with no edge at all (every map between analysed neurons is zero, as in models whose
residual branches start at zero before training) fails with a message that says so and names the
zero maps, not with the clustering's bare "no edges"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modlens
from tiny_transformers import TokenClassifier


def test_a_transformer_whose_mlps_write_nothing_names_their_output_maps():
    torch.manual_seed(0)
    model = TokenClassifier(n_blocks=3).eval()
    with torch.no_grad():
        model.embed.weight.zero_()
        for block in model.blocks:
            block.mlp.fc2.weight.zero_()
    with pytest.raises(ValueError) as err:
        modlens.partition(model, "weights/global", n_clusters=2, input_shape=(5, 6))
    msg = str(err.value)
    assert "the weight graph has no edges" in msg
    assert "the output maps of 3 of the 3 MLPs" in msg
    assert "'blocks.0.mlp.fc1'" in msg and "trained model" in msg
    # one nonzero output map is enough for a graph (the zero check is not a blanket refusal)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.normal_()
    part = modlens.partition(model, "weights/global", n_clusters=2, input_shape=(5, 6))
    assert part.n_clusters == 2


def test_a_cnn_with_zero_batch_norm_scales_names_the_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    ).eval()
    with torch.no_grad():
        model[1].weight.zero_()  # the scale of the first conv's batch norm: the edges out of it fold to 0
    with pytest.raises(ValueError) as err:
        modlens.partition(model, "weights/global", n_clusters=2, input_shape=(1, 8, 8))
    msg = str(err.value)
    assert "the weight graph has no edges" in msg and "the weights into 1 of the 2 layers" in msg
    assert "'3'" in msg
