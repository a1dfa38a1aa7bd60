"""timm's convolutional networks whose spatial mixer is attention, at a tiny size with random weights:
HaloNet's and BoTNet's attention blocks in a ByobNet (family byoanet) and MobileNet-V5's multi-query
attention beside its inverted residuals. Their neurons are conv channels, queries and keys have none,
``partition`` without data succeeds and the fast lesion engine equals the plain oracle in float64 on
every layer. A lambda layer is refused in one line. Run with ``pytest -m zoo`` in the zoo environment."""

from __future__ import annotations

import pytest
import torch

import modlens
from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from test_ops_families import assert_lesions_equal_oracle

from model_helpers import zoo_import

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def _byoanet(layer: str, **kwargs):
    """One bottleneck stage, then one stage of attention blocks (timm's halonet26t/botnet26t/lambda_resnet26t
    pattern), 16 stem channels."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg
    cfg = ByoModelCfg(blocks=(ByoBlockCfg("bottle", d=1, c=32, s=2, gs=0, br=0.25),
                              ByoBlockCfg("self_attn", d=1, c=64, s=2, gs=0, br=0.25)),
                      stem_chs=16, stem_type="tiered", stem_pool="", self_attn_layer=layer, self_attn_kwargs=kwargs,
                      fixed_input_size=layer == "bottleneck")
    return ByobNet(cfg, num_classes=5, img_size=32)


def _mobilenetv5():
    """mobilenetv5_base's block kinds (edge residual, universal inverted residuals with and without
    depthwise convs, multi-query attention, the multi-scale fusion adapter), narrow and shallow."""
    from timm.layers import RmsNorm2d
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv5 import _GELU, MobileNetV5
    arch = [["er_r1_k3_s2_e4_c8"],
            ["uir_r1_a3_k5_s2_e4_c16", "uir_r1_a0_k0_s1_e2_c16", "mqa_r1_k3_h2_s1_d8_c16", "uir_r1_a0_k0_s1_e2_c16"],
            ["uir_r1_a5_k5_s2_e4_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"]]
    return MobileNetV5(decode_arch_def(arch), num_classes=5, stem_size=8, num_features=32, msfa_output_resolution=2,
                       norm_layer=RmsNorm2d, act_layer=_GELU, layer_scale_init_value=1.0)


MODELS = {   # name -> (builder, value layers, score layers)
    "halonet": (lambda: _byoanet("halo", block_size=2, halo_size=1, num_heads=2), ["stages.1.0.self_attn.kv"],
                ["stages.1.0.self_attn.q"]),
    "botnet": (lambda: _byoanet("bottleneck", num_heads=2), ["stages.1.0.self_attn.qkv"], []),
    "mobilenetv5": (_mobilenetv5, ["blocks.1.2.attn.value.proj", "blocks.2.1.attn.value.proj"],
                    ["blocks.1.2.attn.query.proj", "blocks.1.2.attn.key.proj"]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_conv_attention_partitions_and_lesions_equal_the_oracle(name):
    make, values, scores = MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2])
    assert not a.is_transformer and a.is_cnn
    assert set(values) <= set(a.layer_names) and not set(scores) & set(a.layer_names)
    assert all(a.layer_names.count(v) == 1 for v in values)
    part = modlens.partition(model, "weights/global", n_clusters=2, random_state=0)   # without data
    assert len(part.labels) == len(a.layer_sizes)
    with torch.no_grad():   # timm zero-initializes each block's last batch norm and its heads: unit gains
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
        a.output_module.weight.normal_(0, 1.0 / a.output_module.weight.shape[1] ** 0.5)
        for _ in range(3):
            a.output_module.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    changed = assert_lesions_equal_oracle(a, x, y, sizes=lambda w: (1, max(1, w // 2), w))
    assert sum(c for name, c in zip(a.layer_names, changed) if name in values) >= 1   # value-layer lesions change predictions


def test_lambda_layer_is_refused_in_one_line():
    model = _byoanet("lambda", r=3).eval()
    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(model, torch.randn(2, 3, 32, 32))
    msg = str(info.value)
    assert "\n" not in msg and "stages.1.0.self_attn" in msg and "lambda" in msg and "matmul" in msg
