"""timm's hierarchical vision transformers (Swin, Swin-V2, PVT-v2, CoaT-Lite, MaxViT) built tiny with random weights
(the zoo environment; run with ``pytest -m zoo``): the MLP units of every stage are the neuron
layers, the stage boundaries are read from timm's patch merging and overlapping patch embeddings,
and the incremental lesion engine equals the plain oracle on every layer (float64)."""

import numpy as np
import pytest
import torch

from model_helpers import zoo_import
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")]

SWIN = dict(pretrained=False, img_size=32, patch_size=2, embed_dim=8, depths=(1, 2, 1), num_heads=(1, 2, 2),
            window_size=4, mlp_ratio=2.0, num_classes=3)


def make(name):
    torch.manual_seed(0)
    if name == "swin":
        return timm.create_model("swin_tiny_patch4_window7_224", **SWIN)
    if name == "swinv2":
        return timm.create_model("swinv2_tiny_window8_256", **SWIN)
    if name == "maxvit":      # MBConv + block and grid attention per block; the MBConv branch mixes like attention
        return timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=32, embed_dim=(32, 64), depths=(1, 1),
                                 stem_width=16, num_classes=3)
    if name == "coat_lite":   # conv position encodings and a class token per stage; strided conv patch embeddings
        return timm.create_model("coat_lite_tiny", pretrained=False, img_size=32, serial_depths=(1, 1, 1, 1),
                                 embed_dims=(32, 32, 64, 64), num_classes=3)
    if name == "pvt_v2":
        return timm.create_model("pvt_v2_b0", pretrained=False, embed_dims=(8, 16), depths=(1, 2), num_heads=(1, 2),
                                 mlp_ratios=(2, 2), sr_ratios=(2, 1), num_classes=3)
    raise AssertionError(name)


def _np(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("name", ["swin", "swinv2", "pvt_v2", "coat_lite", "maxvit"])
def test_timm_hierarchical_lesions_equal_the_oracle_on_every_stage(name):
    model = make(name).double().eval()
    x = torch.randn(24, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():   # timm's initialization is small: scale it so that lesions matter
            if p.dim() > 1:
                p.mul_(3)
        for m in model.modules():      # timm's Swin-V2 starts its post-norms at zero scale (no MLP output)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        model.get_classifier().bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    a = NetworkAdapter(model, x[:2])
    stages = [b.stage for b in a.residual_parts()["blocks"]]
    assert stages == {"pvt_v2": [0, 1, 1], "coat_lite": [0, 1, 2, 3], "maxvit": [0, 0, 1, 1]}.get(name, [0, 1, 1, 2])
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, width // 3, width)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_timm_swin_patch_merging_is_a_four_tap_transition():
    model = make("swin").eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 32, 32))
    assert a.layer_names == ["layers.0.blocks.0.mlp.fc1", "layers.1.blocks.0.mlp.fc1", "layers.1.blocks.1.mlp.fc1",
                             "layers.2.blocks.0.mlp.fc1"]
    parts = a.residual_parts()
    for t, stage in zip(parts["transitions"], model.layers[1:]):
        ds = stage.downsample    # timm: norm(4C) then reduction, over x.reshape(.., 2, .., 2, C).permute(..).flatten(3)
        w = _np(ds.reduction.weight) * _np(ds.norm.weight)[None, :]
        c = w.shape[1] // 4
        for k in range(4):
            np.testing.assert_allclose(t.kernel[:, :, 0, k], w[:, k * c:(k + 1) * c])
    got = {(i, j): b for i, j, b in a.weight_blocks()}
    blocks = parts["blocks"]
    read = blocks[1].w_in * blocks[1].gamma[None, :]
    taps = [parts["transitions"][0].kernel[:, :, 0, k] for k in range(4)]
    np.testing.assert_allclose(got[(1, 2)], sum(np.abs(read @ m @ blocks[0].w_out) for m in taps))


def test_timm_pvt_v2_overlapping_patch_embedding_is_the_transition():
    model = make("pvt_v2").eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 32, 32))
    assert a.layer_names == ["stages.0.blocks.0.mlp.fc1", "stages.1.blocks.0.mlp.fc1", "stages.1.blocks.1.mlp.fc1"]
    parts = a.residual_parts()
    ds = model.stages[1].downsample
    k = (_np(ds.proj.weight) * _np(model.stages[0].norm.weight)[None, :, None, None]
         * _np(ds.norm.weight)[:, None, None, None])
    (t,) = parts["transitions"]
    np.testing.assert_allclose(t.kernel, k)
    assert t.stride == tuple(ds.proj.stride)
    e = model.patch_embed
    np.testing.assert_allclose(parts["embedding"], _np(e.proj.weight).reshape(8, -1) * _np(e.norm.weight)[:, None])
    blk = model.stages[0].blocks[0].mlp
    l1 = np.abs(_np(blk.dwconv.weight)).reshape(16, -1).sum(1)
    np.testing.assert_allclose(parts["blocks"][0].w_in, _np(blk.fc1.weight) * l1[:, None])


def test_timm_maxvit_shortcut_pool_and_conv_are_the_transition():
    model = make("maxvit").eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 32, 32))
    assert a.layer_names == ["stages.0.blocks.0.attn_block.mlp.fc1", "stages.0.blocks.0.attn_grid.mlp.fc1",
                             "stages.1.blocks.0.attn_block.mlp.fc1", "stages.1.blocks.0.attn_grid.mlp.fc1"]
    (t,) = a.residual_parts()["transitions"]
    # the stream path into stage 1: a 2x2 average pool, then a 1x1 conv: one 2x2 kernel of stride 2, taps W / 4
    w = _np(model.stages[1].blocks[0].conv.shortcut.expand.weight)
    np.testing.assert_allclose(t.kernel, np.tile(w, (1, 1, 2, 2)) / 4)
    assert t.stride == (2, 2)


def test_gcvit_global_query_repeated_per_window_is_cached_with_its_windows():
    """GCViT repeats each image's global query for every window (windows folded into the batch
    dimension): the lesion cache keeps those rows with their sample, and lesions equal the oracle."""
    from timm.models.gcvit import GlobalContextVit
    from test_ops_families import _oracle_check

    torch.manual_seed(0)
    model = GlobalContextVit(num_classes=4, depths=(2, 2, 1, 1), num_heads=(2, 2, 2, 2), embed_dim=16, img_size=64)
    a = _oracle_check(model, (3, 64, 64))     # fast engine == plain oracle on every layer, float64
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    ev = IncrementalLesions(a, x, torch.zeros(3, dtype=torch.long))
    cached = ev._fill(a.lesion_plan(0), 0, 3)
    assert max(cached.rows.values()) > 1 and all(v.shape[0] == 3 * cached.rows[n] for n, v in cached.items())
