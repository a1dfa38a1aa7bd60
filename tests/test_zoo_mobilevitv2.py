"""Hugging Face and timm MobileViT-V2, built tiny with random weights (run with ``pytest -m zoo``): its blocks unfold a
conv map into 2x2 patches (``F.unfold``, kernel == stride), run linear self-attention and an FFN written with
1x1 convs over (B, C, pixels per patch, patches), and fold the patches back (``F.fold``). Every conv is a
neuron layer, the channels are followed through unfold and fold unchanged, partition runs without data, and
the incremental lesion engine equals the plain oracle on every layer (float64). timm's MobileViT-V2, built
exportable, unfolds with ``F.unfold`` and folds with ``pixel_shuffle``."""

import numpy as np
import pytest
import torch

import modlens
from model_helpers import zoo_import
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

transformers = zoo_import("transformers")
timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")]


def make():
    torch.manual_seed(0)
    cfg = transformers.MobileViTV2Config(image_size=64, width_multiplier=0.25, n_attn_blocks=[1, 1, 1],
                                         base_attn_unit_dims=[32, 48, 64], num_labels=3)
    return transformers.MobileViTV2ForImageClassification(cfg).eval()


def _l1(conv):
    return conv.weight.detach().abs().double().sum((2, 3)).numpy()


def test_hf_mobilevitv2_channels_pass_unfold_and_fold():
    model = make()
    a = NetworkAdapter(model, torch.randn(2, 3, 64, 64))
    assert a.capture_method == "export" and not a.is_transformer
    block = model.mobilevitv2.encoder.layer[2]
    prefix = "mobilevitv2.encoder.layer.2."
    names = {n: i for i, n in enumerate(a.layer_names)}
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    # conv_1x1's channels, unfolded into patches, reach the first transformer layer's qkv projection through
    # its GroupNorm (gamma folded: the column scale), channel by channel
    attn = block.transformer.layer[0].attention
    gamma = block.transformer.layer[0].layernorm_before.weight.detach().abs().double().numpy()
    np.testing.assert_allclose(
        blocks[(prefix + "conv_1x1.convolution", prefix + "transformer.layer.0.attention.qkv_proj.convolution")],
        _l1(attn.qkv_proj.convolution) * gamma[None, :])
    # after the last transformer layer, its GroupNorm and the fold, the stream reaches conv_projection
    gamma = block.layernorm.weight.detach().abs().double().numpy()
    np.testing.assert_allclose(
        blocks[(prefix + "transformer.layer.0.ffn.conv2.convolution", prefix + "conv_projection.convolution")],
        _l1(block.conv_projection.convolution) * gamma[None, :])
    assert prefix + "transformer.layer.0.attention.out_proj.convolution" in names
    part = modlens.partition(model, "weights/global", n_clusters=3, random_state=0)
    assert part.layer_sizes == tuple(a.layer_sizes)


def test_hf_mobilevitv2_lesions_equal_the_oracle_on_every_layer():
    model = make().double()
    x = torch.randn(16, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = NetworkAdapter(model, x[:2])
    with torch.no_grad():   # centre the logits so that random inputs get varied predictions
        for _ in range(4):
            a.output_module.bias -= model(x).logits.mean(0)
        y = model(x).logits.argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, max(1, width // 2))]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_timm_mobilevitv2_exportable_unfold_and_pixel_shuffle():
    from timm.layers import set_layer_config

    torch.manual_seed(0)
    with set_layer_config(exportable=True):   # F.unfold and pixel_shuffle instead of reshapes and permutes
        model = timm.create_model("mobilevitv2_050", pretrained=False, num_classes=3).eval().double()
    x = torch.randn(16, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = NetworkAdapter(model, x[:2])
    ops = {str(n.target) for n in a.gm.graph.nodes if n.op == "call_function"}
    assert {"aten.im2col.default", "aten.pixel_shuffle.default"} <= ops and not a.is_transformer
    block = model.stages[2][1]
    p = "stages.2.1."
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    gamma = block.transformer[0].norm1.weight.detach().abs().double().numpy()
    np.testing.assert_allclose(blocks[(p + "conv_1x1", p + "transformer.0.attn.qkv_proj")],
                               _l1(block.transformer[0].attn.qkv_proj) * gamma[None, :])
    gamma = block.norm.weight.detach().abs().double().numpy()
    np.testing.assert_allclose(blocks[(p + "transformer.1.mlp.fc2", p + "conv_proj.conv")],
                               _l1(block.conv_proj.conv) * gamma[None, :])
    with torch.no_grad():
        for _ in range(4):
            model.head.fc.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    for layer, name in enumerate(a.layer_names):
        if not name.startswith(p):
            continue
        sets = [rng.choice(a.layer_sizes[layer], size=k, replace=False) for k in (1, a.layer_sizes[layer] // 2)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y),
                                      err_msg=name)


def test_timm_mobilevit_v1_folds_patch_pixels_into_the_batch_and_its_activations_are_per_sample():
    """timm's MobileViT (v1) runs its transformers on (B * patch pixels, patches, C): each sample's rows
    are summed (nn/_batch_fold.py), so the activation graph has one row per sample in every layer."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=4).eval()
    x = torch.randn(6, 3, 64, 64)
    a = NetworkAdapter(model, x[:2])
    acts = a.record(iter([x]))
    assert any(".transformer." in n for n in a.layer_names)
    assert [z.shape for z in acts] == [(6, w) for w in a.layer_sizes]
    part = modlens.partition(a, "activations/global", data=x, n_clusters=2, random_state=0)
    assert list(part.layer_names) == a.layer_names
