"""Layers with computed weights and matrix products with parameters (issue 20, modlens.nn._computed)
on timm models with random weights at a small size: NFNet's weight-standardized convs
(``ScaledStdConv2d``) and SwiftFormer's ``query @ w_g``; and gMLP's gated units (one ``fc1`` cut in
two halves, modlens.nn._split_linear); and Gemma-4's ViT (a position table read by a one-hot
product of the patch grid, clamped GLU maps); DeepSeek's ViT (RMS norms whose scale is cast in forward). ``partition`` without data succeeds, and
lesions of every neuron layer by the fast incremental engine equal the plain oracle in float64.
Run with ``pytest -m zoo`` in the zoo environment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modlens
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

from model_helpers import zoo_import

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def _swiftformer():
    from timm.models.swiftformer import SwiftFormer
    return SwiftFormer(layers=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32], num_classes=5)


def _gmlp():   # gmlp_ti16_224's blocks (SpatialGatingBlock, GatedMlp), two of them, narrow
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock
    return MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=16, mlp_ratio=3,
                    block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)


def _gemma4_vit():   # gemma4_vit_167m's blocks (clipped Linears, one-hot position table), two of them, narrow
    return timm.create_model("gemma4_vit_167m", num_classes=5, depth=2, embed_dim=32, num_heads=2, head_dim=16,
                             intermediate_size=48, img_size=32, patch_size=16, position_embedding_size=64)


def _deepseek_vit():   # deepseek_vit_412m's blocks (RmsNormFp32: the norm scale cast in forward), two, narrow
    return timm.create_model("deepseek_vit_412m", num_classes=5, depth=2, embed_dim=32, num_heads=2, img_size=56)


MODELS = {
    "standardized convs (test_nfnet)": (lambda: timm.create_model("test_nfnet", num_classes=5), 32, True),
    "x @ w_g (swiftformer)": (_swiftformer, 32, False),
    "spatial gating unit (gmlp)": (_gmlp, 32, False),
    "one-hot position table, clipped GLU (gemma4_vit)": (_gemma4_vit, 32, False),
    "norm scale computed in forward (deepseek_vit)": (_deepseek_vit, 56, False),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_zoo_computed_weights_partition_and_lesions_equal_the_oracle(family):
    make, size, has_std_convs = MODELS[family]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(16, 3, size, size, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2])
    assert a.layer_sizes and all(w > 0 for w in a.layer_sizes)
    if "deepseek" in family:   # exported (before: torch.export's rms_norm had a computed weight, and fx ran)
        assert a.capture_method == "export" and a.layer_names == ["encoder.blocks.0.mlp.fc1", "encoder.blocks.1.mlp.fc1"]
    if has_std_convs:   # the stem's weight is computed from its parameter: a layer named by that module
        assert "stem.conv1" in a.layer_names
    if "gmlp" in family:   # the gated units: the half of fc1 through the spatial gating unit is the value
        assert a.layer_names == ["blocks.0.mlp_channels.fc1_part1", "blocks.1.mlp_channels.fc1_part1"]
    part = modlens.partition(a, "weights/global", n_clusters=2, random_state=0)
    assert len(part.labels) == len(a.layer_sizes)
    out = a.output_module
    with torch.no_grad():   # unit-gain Linear maps (timm starts them near zero) and centred logits
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 1.0 / m.weight.shape[1] ** 0.5)
        for _ in range(3):
            out.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1, "random inputs get one class; the check would not see lesions change predictions"
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, max(1, width // 2))]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1
