"""timm's SAM ViT (``samvit``), built tiny with random weights (the zoo environment; run with ``pytest -m
zoo``): its attention adds decomposed relative-position terms, einsums of the queries with tables
computed from parameters, to the scores (docs/transformers.md, "Position terms"). They are part of
attention: the MLP units are the neuron layers, a partition without data runs, and the incremental
lesion engine equals the plain oracle on every layer (float64)."""

import numpy as np
import pytest
import torch

import modlens
from model_helpers import zoo_import
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")]


def _samvit():
    """Two blocks: one in 4 x 4 windows, one global; both with relative positions."""
    torch.manual_seed(0)
    return timm.create_model("samvit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=16,
                             depth=2, num_heads=2, global_attn_indexes=[1], window_size=4, mlp_ratio=2.0,
                             num_classes=3)


def test_samvit_relative_positions_partition_and_lesions_equal_the_oracle():
    model = _samvit().double().eval()
    x = torch.randn(24, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # timm's initialization is small: scale it so that lesions matter
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
        model.head.fc.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    part = modlens.partition(model, "weights/global", n_clusters=2, random_state=0)
    assert list(part.layer_names) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"] and [len(l) for l in part.labels] == [32, 32]
    a = NetworkAdapter(model, x[:2])
    assert a.is_transformer and a.layer_names == list(part.layer_names)
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 3, width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
    assert changed == len(a.layer_sizes)
