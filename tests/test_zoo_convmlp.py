"""timm transformers whose MLPs are 1x1 convs or Linear + BatchNorm (EfficientFormer-V2, EfficientViT-MSRA,
SHViT, iFormer, NextViT, CoAtNet, LowFormer, CPU-Bone), built with random weights at 32 x 32 (the zoo
environment; run with ``pytest -m zoo``): the MLP hidden units are the neuron layers, the stages are joined
(through one layer or through several conv layers), and the incremental lesion engine equals the plain oracle
(float64) on the first and the last neuron layer."""

import numpy as np
import pytest
import torch

from model_helpers import zoo_import
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")]

# model -> (first neuron layer, number of neuron layers, number of stages with MLPs)
MODELS = {
    "efficientformerv2_s0": ("stages.0.blocks.0.mlp.fc1.conv", 14, 4),
    "efficientvit_m0": ("stages.0.blocks.0.ffn0.m.pw1.conv", 16, 3),
    "shvit_s1": ("stages.0.blocks.0.ffn.m.pw1.c", 15, 3),
    "iformer_t": ("stages.0.blocks.0.mixer.module.1.c", 16, 4),
    "cpubone_nano": (None, 3, 2),
    "lowformer_b0": (None, 11, 2),
    "nextvit_small": (None, 20, 9),
    "coatnet_nano_rw_224": (None, 9, 2),
}


def _build(name):
    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, num_classes=3, img_size=32).eval()
    except TypeError:   # fully convolutional models take any size without an img_size argument
        return timm.create_model(name, pretrained=False, num_classes=3).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_conv_mlp_transformers_have_mlp_neurons_stages_and_exact_lesions(name):
    model = _build(name).double()
    x = torch.randn(12, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():   # timm's initialization is small: scale it so that lesions matter
            if p.dim() > 1:
                p.mul_(2)
        for m in model.modules():      # timm zeroes some batch norms' scale (the last map of a block)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        heads = model.get_classifier()   # centre the scores (distilled models have two heads, some wrap a Linear)
        heads = heads if isinstance(heads, tuple) else (heads,)
        linears = [[m for m in h.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None] for h in heads]
        shift = model(x).mean(0) / len(heads)
        for lin in linears:
            if lin:
                lin[-1].bias -= shift
        y = model(x).argmax(-1)
    first, n_layers, n_stages = MODELS[name]
    a = NetworkAdapter(model, x[:2])
    assert a.is_transformer and len(a.layers) == n_layers
    if first is not None:
        assert a.layer_names[0] == first
    parts = a.residual_parts()
    assert parts["blocks"][-1].stage + 1 == n_stages and len(parts["transitions"]) == n_stages - 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    for layer in (0, len(a.layers) - 1):
        width = a.layer_sizes[layer]
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 2, width)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y),
                                      err_msg=a.layer_names[layer])
