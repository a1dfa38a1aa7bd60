"""Convolutional networks whose spatial mixer is attention (HaloNet, BoTNet, MobileNet-V5): their neurons
are conv channels, attention mixes positions and passes the value channels through channel by channel,
queries and keys have no neurons (docs/transformers.md, "Attention in a convolutional network")."""

import numpy as np
import pytest
import torch

from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from test_ops_families import _randomize, assert_lesions_equal_oracle
from tiny_conv_attention import MIXERS, TinyAttentionCNN

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")

CAPTURES = ("export", "fx")
NEURONS = {   # value layers are neurons; query and key convs (and HaloNet's position table) are not
    "halo": ["stem", "block.conv1", "block.mixer.kv", "block.conv3"],
    "bot": ["stem", "block.conv1", "block.mixer.qkv", "block.conv3"],
    "mqa": ["stem", "block.0.expand", "block.0.project", "block.1.mixer.value", "block.1.mixer.output"],
}


def _adapter(mixer, capture, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyAttentionCNN(mixer).to(dtype).eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 8, 8, dtype=dtype), capture=capture)
    assert a.capture_method == capture
    return model, a


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_neurons_are_conv_channels_and_queries_and_keys_have_none(mixer, capture):
    model, a = _adapter(mixer, capture)
    assert not a.is_transformer and a.is_cnn
    assert a.layer_names == NEURONS[mixer]
    assert a.layer_sizes == [getattr(model.get_submodule(n), "out_channels") for n in NEURONS[mixer]]


def _block(a, src: str, dst: str) -> np.ndarray:
    i, j = a.layer_names.index(src), a.layer_names.index(dst)
    return next(b for s, d, b in a.weight_blocks(bn_fold="none") if (s, d) == (i, j))


@pytest.mark.parametrize("capture", CAPTURES)
def test_halo_values_reach_the_next_conv_channel_by_channel_and_keys_have_no_edges(capture):
    model, a = _adapter("halo", capture)
    block = _block(a, "block.mixer.kv", "block.conv3")   # (conv3's 8 outputs, kv's 16 channels)
    w = model.block.conv3.weight.detach().abs().double().numpy()[:, :, 0, 0]
    dh = model.block.mixer.dh
    # per head: dh key channels, then dh value channels; value channel i of head h is output channel h * dh + i
    for head in range(model.block.mixer.heads):
        keys = slice(2 * dh * head, 2 * dh * head + dh)
        values = slice(2 * dh * head + dh, 2 * dh * (head + 1))
        np.testing.assert_array_equal(block[:, keys], 0)
        np.testing.assert_allclose(block[:, values], w[:, dh * head: dh * (head + 1)])


@pytest.mark.parametrize("capture", CAPTURES)
def test_bot_fused_qkv_only_its_value_third_has_edges(capture):
    model, a = _adapter("bot", capture)
    block = _block(a, "block.mixer.qkv", "block.conv3")
    w = model.block.conv3.weight.detach().abs().double().numpy()[:, :, 0, 0]
    np.testing.assert_array_equal(block[:, :16], 0)
    np.testing.assert_allclose(block[:, 16:], w)


@pytest.mark.parametrize("capture", CAPTURES)
def test_multi_query_value_channels_reach_one_output_channel_per_head(capture):
    model, a = _adapter("mqa", capture)
    block = _block(a, "block.1.mixer.value", "block.1.mixer.output")   # (8 outputs, 4 value channels)
    w = model.block[1].mixer.output.weight.detach().abs().double().numpy()[:, :, 0, 0]
    kd = model.block[1].mixer.kd
    np.testing.assert_allclose(block, sum(w[:, h * kd:(h + 1) * kd] for h in range(model.block[1].mixer.heads)))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_incremental_lesions_equal_the_plain_oracle_on_every_layer(mixer, capture):
    torch.manual_seed(0)
    model = TinyAttentionCNN(mixer).double().eval()
    with torch.no_grad():
        _randomize(model)
    x = torch.randn(48, 3, 8, 8, dtype=torch.float64)
    a = NetworkAdapter(model, x[:2], capture=capture)
    with torch.no_grad():  # centre the logits so that random inputs get varied predictions
        a.output_module.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    assert sum(assert_lesions_equal_oracle(a, x, y)) >= 2


def test_value_channels_are_found_exactly_in_half_precision():
    """The channel labels (up to 2**24) run on a float32 copy of a bfloat16 model: bfloat16 holds integers
    up to 256 only, and this model has more labels than that."""
    torch.manual_seed(0)
    model = TinyAttentionCNN("bot", mid=96).eval()
    ref = NetworkAdapter(model, torch.randn(2, 3, 8, 8), capture="export").structure.mixing.routes
    half = NetworkAdapter(model.to(torch.bfloat16), torch.randn(2, 3, 8, 8, dtype=torch.bfloat16),
                          capture="export").structure.mixing.routes
    assert [(n.name, [r.positions for _, r in rs]) for n, rs in half.items()] == \
        [(n.name, [r.positions for _, r in rs]) for n, rs in ref.items()]
    assert max(ref[next(iter(ref))][0][1].positions) == 95


@pytest.mark.parametrize("depth", (1, 2))
@pytest.mark.parametrize("capture", CAPTURES)
def test_a_lambda_layer_is_refused_in_one_line_naming_the_product(capture, depth):
    """In the second block, the 1x1 conv before the lambda layer's qkv conv looks like a transformer MLP
    (conv -> activation -> conv after attention): the refusal still names the lambda layer."""
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(TinyAttentionCNN("lambda", depth=depth).eval(), torch.randn(2, 3, 8, 8), capture=capture)
    msg = str(info.value)
    where = "block.mixer" if depth == 1 else "block.0.mixer"
    assert "\n" not in msg and "'matmul" in msg and f"module '{where}'" in msg and "lambda" in msg
