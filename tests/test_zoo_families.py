"""Every handler family of the operation registry on a real zoo model (timm, torchvision), with random
weights at a small size: ``partition`` without data (weights/global) succeeds, and lesions of every
neuron layer by the fast incremental engine equal the plain oracle in float64. The models are
shrunk through their constructors' arguments (fewer blocks, narrower stages) so that the module stays
a few minutes on two CPU cores. Run with ``pytest -m zoo`` in the zoo environment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modlens
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

from model_helpers import zoo_import

timm = zoo_import("timm")
torchvision = zoo_import("torchvision")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, num_classes=5, **kwargs)


def _mixer(**kwargs):
    from timm.models.mlp_mixer import MlpMixer
    return lambda: MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, **kwargs)


def _resmlp():   # layer scales at 1, not 1e-4: lesions of the MLP units change predictions
    from functools import partial

    from timm.models.mlp_mixer import Affine, ResBlock
    return _mixer(mlp_ratio=4, block_layer=partial(ResBlock, init_values=1.0), norm_layer=Affine)()


def _efficientnet_b0():   # efficientnet_b0's block definitions, a quarter of its widths and depths
    from timm.models.efficientnet import _gen_efficientnet
    return _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, num_classes=5)


def _shufflenet():        # torchvision's ShuffleNetV2 units, one per stage, narrow
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    return ShuffleNetV2(stages_repeats=[1, 1, 1], stages_out_channels=[8, 16, 32, 64, 64], num_classes=5)


def _hrnet():   # HRNet-W18-small's branches and fuse layers (nn.Upsample), one block each and 8 channels per branch
    from timm.models.hrnet import HighResolutionNet

    def stage(n, blocks, block_type="BASIC"):
        return dict(num_modules=1, num_branches=n, block_type=block_type, num_blocks=blocks, num_channels=(8,) * n,
                    fuse_method="SUM")
    cfg = dict(stem_width=8, stage1=stage(1, (1,), "BOTTLENECK"), stage2=stage(2, (1, 1)), stage3=stage(3, (1,) * 3),
               stage4=stage(4, (1,) * 4))
    return HighResolutionNet(cfg, num_classes=5)


# family of the registry -> (builder, image size)
MODELS = {
    "channel-split (cs3darknet_focus_s)": (_timm("cs3darknet_focus_s"), 32),
    "computed-bias attention (beit)": (_timm("beit_base_patch16_224", depth=2, embed_dim=32, num_heads=2,
                                             img_size=32, patch_size=8, init_values=1.0), 32),
    "several heads (repvit_m1)": (_timm("repvit_m1", depth=(1, 1, 1, 1), embed_dim=(16, 16, 16, 16)), 32),
    "GRN statistic (convnextv2_atto)": (_timm("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), 32),
    "token mixing (mixer)": (_mixer(), 32),
    "token mixing, affine (resmlp)": (_resmlp, 32),
    "channel shuffle (shufflenet_v2)": (_shufflenet, 32),
    "selective-kernel stack (skresnet18)": (_timm("skresnet18", layers=[1, 1, 1, 1], channels=(16, 32, 32, 64),
                                                  stem_width=16), 32),
    "radix softmax (resnest14d)": (_timm("resnest14d", channels=(16, 16, 32, 32), stem_width=8), 32),
    "gates, depthwise (efficientnet_b0)": (_efficientnet_b0, 32),
    "norms, layer scale (convnext_atto)": (_timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), 32),
    "attention (vit_tiny)": (_timm("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=32,
                                   patch_size=8), 32),
    "upsampling (hrnet_w18_small)": (_hrnet, 64),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_zoo_family_partitions_and_lesions_equal_the_oracle(family):
    make, size = MODELS[family]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(16, 3, size, size, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2])
    assert a.layer_sizes and all(w > 0 for w in a.layer_sizes)
    if "several heads" in family:   # RepViT's class and distillation heads, averaged
        assert len(a.structure.output_layers) == 2
    part = modlens.partition(a, "weights/global", n_clusters=2, random_state=0)
    assert len(part.labels) == len(a.layer_sizes)
    out = a.output_module
    with torch.no_grad():   # timm starts Linear maps near zero (std 0.02; heads at zero): unit-gain weights, so
        for m in model.modules():   # that an MLP's units move the residual stream, and logits centred
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
