"""timm's hierarchical vision transformers, second round (Swin-V2-CR, ...), built tiny with random weights
(the zoo environment; run with ``pytest -m zoo``): every stage's MLP units are neuron layers, the stage
boundaries are read from the model, and the incremental lesion engine equals the plain oracle on every
layer (float64)."""

import numpy as np
import pytest
import torch

from model_helpers import zoo_import
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")]


def make(name):
    torch.manual_seed(0)
    if name == "swinv2_cr":   # the stream is (B, C, H, W) between stages, (B, H, W, C) in the blocks and the merging
        return timm.create_model("swinv2_cr_tiny_224", pretrained=False, img_size=32, patch_size=2, embed_dim=8,
                                 depths=(1, 2), num_heads=(1, 2), window_size=4, mlp_ratio=2.0, num_classes=3)
    if name == "tiny_vit":    # a conv stage, then local convs in every block and 3-conv downsamplings
        return timm.create_model("tiny_vit_5m_224", pretrained=False, embed_dims=(8, 16, 24),
                                 depths=(1, 2, 1), num_heads=(1, 2, 2), window_sizes=(4, 4, 2), mlp_ratio=2.0,
                                 num_classes=3)
    if name == "edgenext":    # conv blocks (a depthwise conv on the MLP branch), then split-transpose attention blocks
        return timm.create_model("edgenext_xx_small", pretrained=False, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                                 heads=(1, 1, 2, 2), num_classes=3)
    if name == "pit":         # a class token; the grid pooled by a grouped strided conv, the class token by a Linear
        return timm.create_model("pit_ti_224", pretrained=False, img_size=32, patch_size=4, stride=2,
                                 base_dims=[4, 4], depth=[1, 2], heads=[1, 2], mlp_ratio=2, num_classes=3)
    if name == "mobilevit":   # transformers over unfolded patches, joined by conv chains with a concatenation
        return timm.create_model("mobilevit_xxs", pretrained=False, num_classes=3)
    raise AssertionError(name)


# MobileViT's and TinyViT's inverted residuals (1x1 conv -> act -> depthwise conv -> act -> 1x1 conv, no
# squeeze-excitation) are conv MLPs too (docs/transformers.md, "MLPs written with 1x1 convolutions"): their
# hidden channels are neuron layers with stages of their own
STAGES = {"mobilevit": [0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4], "swinv2_cr": [0, 1, 1], "tiny_vit": [0, 1, 2, 3],
          "edgenext": [0, 1, 2, 2, 3], "pit": [0, 1, 1]}
SIZE = {"tiny_vit": 64, "edgenext": 64, "mobilevit": 64}
SCALE = {"mobilevit": 1.0}   # its convs and batch norms already give activations of order 1


def _np(t):
    return t.detach().double().numpy()


def _scaled(name):
    model = make(name).double().eval()
    size = SIZE.get(name, 32)
    x = torch.randn(24, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n, p in model.named_parameters():   # timm's initialization is small: scale it so that lesions matter
            if p.dim() > 1:
                p.mul_(SCALE.get(name, 3.0))
            elif n.split(".")[-1].startswith("gamma"):   # layer scales start at 1e-6 (EdgeNeXt)
                p.fill_(1.0)
        for m in model.modules():      # post-norms may start at zero scale (no MLP output)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        model.get_classifier().bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    return model, x, y


@pytest.mark.parametrize("name", list(STAGES))
def test_timm_hierarchical_lesions_equal_the_oracle_on_every_stage(name):
    model, x, y = _scaled(name)
    a = NetworkAdapter(model, x[:2])
    assert [b.stage for b in a.residual_parts()["blocks"]] == STAGES[name]
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 3, width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_timm_swinv2_cr_patch_merging_reads_the_channels_first_stream():
    model = make("swinv2_cr").eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 32, 32))
    (t,) = a.residual_parts()["transitions"]
    ds = model.stages[1].downsample     # norm(4C), then reduction, over the stream permuted back to (B, H, W, C)
    w = _np(ds.reduction.weight) * _np(ds.norm.weight)[None, :]
    np.testing.assert_allclose(t.kernel[:, :, 0, :], w.reshape(16, 4, 8).transpose(0, 2, 1))


def test_timm_pit_pooling_is_a_grid_kernel_and_a_class_token_map():
    model = make("pit").eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 32, 32))
    (t,) = a.residual_parts()["transitions"]
    pool = model.transformers[1].pool
    w = _np(pool.conv.weight)
    per = pool.conv.out_channels // pool.conv.groups
    for o in range(pool.conv.out_channels):   # grouped conv written out dense: out channel o reads channel o // per
        np.testing.assert_allclose(t.kernel[o, o // per], w[o, 0])
        assert not np.delete(t.kernel[o], o // per, axis=0).any()
    np.testing.assert_allclose(t.token_map, _np(pool.fc.weight))
    assert t.stride == tuple(pool.conv.stride)
