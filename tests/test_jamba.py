"""Hugging Face Jamba: Mamba mixers (a selective scan over the tokens) between attention and MLP
blocks. The Mamba mixer mixes tokens, like attention, and has no neurons; the gated MLPs' units are the
neurons, and lesions of them equal the plain oracle in float64 (census record before: "unsupported
functional layer operation 'matmul.default' in module 'model.layers.0.mamba'")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modlens
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _tiny_jamba():
    cfg = transformers.JambaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, num_experts=1, attn_layer_period=2,
                                   attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4,
                                   mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, num_labels=3, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = transformers.JambaForSequenceClassification(cfg).double().eval()
        with torch.no_grad():   # MLPs strong enough that lesions change predictions of the random model
            for name, p in m.named_parameters():
                if "feed_forward" in name:
                    p.mul_(6)
    return m


def test_jamba_mlp_units_are_the_neurons_and_lesions_equal_the_oracle():
    m = _tiny_jamba()
    x = torch.randint(1, 64, (48, 10), generator=torch.Generator().manual_seed(0))
    a = NetworkAdapter(m, x[:2], input_name="input_ids")
    assert a.is_transformer
    assert a.layer_names == ["model.layers.0.feed_forward.gate_proj", "model.layers.1.feed_forward.gate_proj"]
    assert a.layer_sizes == [24, 24]
    part = modlens.partition(m, "weights/global", n_clusters=2, random_state=0)   # without data
    assert list(part.layer_names) == a.layer_names
    with torch.no_grad():
        y = m(input_ids=x).logits.argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, k, replace=False) for k in (1, 8, 12)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed == 2
