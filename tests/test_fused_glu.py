"""Fused gated MLPs (Phi-3, GLM, ModernBERT: one map computes the gate and value halves, issue 20):
the same neurons, activations, weight graph and lesions as the equivalent two-map SwiGLU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from tiny_transformers import TokenClassifier

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


class FusedGLU(nn.Module):
    """``a, b = fused(x).chunk(2, -1)``; ``act_first``: ``down(silu(a) * b)`` (Phi-3, GLM), else the
    activation on the second half and the operands swapped: ``down(drop(a * gelu(b)))``."""

    def __init__(self, d, h, act_first=True, split="chunk"):
        super().__init__()
        self.fused, self.down = nn.Linear(d, 2 * h, bias=False), nn.Linear(h, d, bias=False)
        self.act_first, self.split, self.h = act_first, split, h
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        y = self.fused(x)
        if self.split == "chunk":
            a, b = y.chunk(2, dim=-1)
        elif self.split == "split":
            a, b = y.split(self.h, dim=-1)
        else:
            a, b = y[..., :self.h], y[..., self.h:]
        if self.act_first:
            return self.down(F.silu(a) * b)
        return self.down(self.drop(a * F.silu(b)))


def fused_and_unfused(act_first=True, split="chunk", n_blocks=2, seed=0):
    """A fused model and the two-map SwiGLU model with the same weights."""
    torch.manual_seed(seed)
    ref = TokenClassifier(glu=True, n_blocks=n_blocks).double().eval()
    fused = TokenClassifier(glu=True, n_blocks=n_blocks).double().eval()
    fused.load_state_dict(ref.state_dict(), strict=False)
    for rb, fb in zip(ref.blocks, fused.blocks):
        h = rb.mlp.gate.out_features
        fb.mlp = FusedGLU(8, h, act_first, split).double()
        gate, up = rb.mlp.gate.weight, rb.mlp.up.weight
        with torch.no_grad():
            fb.mlp.fused.weight.copy_(torch.cat([gate, up]) if act_first else torch.cat([up, gate]))
            fb.mlp.down.weight.copy_(rb.mlp.down.weight)
    return fused, ref


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("act_first,split", [(True, "chunk"), (False, "chunk"), (True, "split"), (False, "slice")])
def test_fused_gate_and_value_halves_are_one_neuron_like_a_swiglu(act_first, split, capture):
    fused, ref = fused_and_unfused(act_first, split)
    x = torch.randn(40, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x))
    a, r = NetworkAdapter(fused, x, capture=capture), NetworkAdapter(ref, x)
    assert a.is_transformer and a.layer_names == ["blocks.0.mlp.fused", "blocks.1.mlp.fused"]
    assert a.layer_sizes == r.layer_sizes == [12, 12]
    # pre-activation: the gate half, the input of the activation
    for got, want in zip(a.record([x]), r.record([x])):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    got, want = {(i, j): b for i, j, b in a.weight_blocks()}, {(i, j): b for i, j, b in r.weight_blocks()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("act_first", [True, False])
def test_fused_glu_lesions_equal_the_plain_oracle_and_the_unfused_model(act_first):
    fused, ref = fused_and_unfused(act_first, n_blocks=3, seed=2)
    x = torch.randn(150, 5, 6, dtype=torch.float64)
    y = fused(x).argmax(-1)
    a, r = NetworkAdapter(fused, x), NetworkAdapter(ref, x)
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer in range(3):
        sets = [rng.choice(12, k, replace=False) for k in (1, 4, 6, 12)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        np.testing.assert_array_equal(fast, correct_counts_plain(r, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
    assert changed >= 2


def test_halves_both_through_an_activation_are_not_a_glu():
    """``gelu(a) * gelu(b)`` is no gate/value pair: the model is refused as having no MLP, not misread."""
    fused, _ = fused_and_unfused()
    for b in fused.blocks:
        b.mlp.forward = lambda x, m=b.mlp: m.down(F.gelu(m.fused(x)[..., :12]) * F.gelu(m.fused(x)[..., 12:]))
    with pytest.raises(Exception, match="no transformer MLP"):
        NetworkAdapter(fused, torch.randn(4, 5, 6, dtype=torch.float64))


def test_modernbert_fused_wi_is_one_gated_layer_and_lesions_equal_the_oracle():
    """ModernBERT's ``input, gate = Wi(x).chunk(2, -1)``; ``Wo(drop(act(input) * gate))``: the activated
    half comes first (Phi-3 and GLM, the other order, run in tests/test_decoders.py)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ModernBertConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, num_labels=3,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                        sep_token_id=2, global_attn_every_n_layers=1, local_attention=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.ModernBertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(3, 64, (40, 8), generator=torch.Generator().manual_seed(1))
    a = NetworkAdapter(model, ids, input_name="input_ids")
    assert a.layer_names == ["model.layers.0.mlp.Wi", "model.layers.1.mlp.Wi"] and a.layer_sizes == [24, 24]
    blocks = a.residual_parts()["blocks"]
    wi = model.model.layers[1].mlp.Wi.weight.detach().double().numpy()
    np.testing.assert_array_equal(blocks[1].w_gate, wi[:24])   # the half through the activation
    np.testing.assert_array_equal(blocks[1].w_in, wi[24:])
    with torch.no_grad():
        y = model(input_ids=ids).logits.argmax(-1)
    ev = IncrementalLesions(a, ids, y)
    rng = np.random.default_rng(0)
    for layer in range(2):
        sets = [rng.choice(24, k, replace=False) for k in (1, 6, 12, 24)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, ids, y))


def _moe(cls_name, config_name, dtype=torch.float64, **extra):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, config_name)(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_labels=3,
                                             pad_token_id=0, max_position_embeddings=16, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(transformers, cls_name)(cfg).to(dtype).eval()


@pytest.mark.parametrize("cls,config,extra", [
    ("MixtralForSequenceClassification", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # a shared expert beside the routed ones, over tokens flattened into rows (B * T, C)
    ("Qwen2MoeForSequenceClassification", "Qwen2MoeConfig",
     dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=12)),
])
def test_mixture_of_experts_is_refused_in_one_line_naming_the_router(cls, config, extra):
    model = _moe(cls, config, torch.float32, **extra)
    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match=r"routes tokens to experts \(.*model\.layers\.0\.mlp\.gate.*mixture-of-experts"
                                        r" MLPs are not supported") as e:
        NetworkAdapter(model, ids, input_name="input_ids")
    assert "\n" not in str(e.value)


def test_experts_chosen_without_topk_are_named_by_their_grouped_product():
    """Phi-MoE's sparsemixer picks experts with max and masks, not topk: the experts' grouped matrix
    product names the mixture of experts (before: "no transformer MLP")."""
    model = _moe("PhimoeForSequenceClassification", "PhimoeConfig", torch.float32, num_local_experts=4,
                 num_experts_per_tok=2)
    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match=r"routes tokens to experts \(operation '.*grouped_mm.*' in module "
                                        r"'model\.layers\.0\.mlp\.experts': a grouped matrix product over the "
                                        r"experts' weights\).*mixture-of-experts MLPs are not supported") as e:
        NetworkAdapter(model, ids, input_name="input_ids")
    assert "\n" not in str(e.value)


def test_a_model_that_fails_at_the_data_says_what_it_raised():
    """Mixtral's grouped expert products take no float64: the one-line error says so, not only the shape."""
    model = _moe("MixtralForSequenceClassification", "MixtralConfig", torch.float64, num_local_experts=4,
                 num_experts_per_tok=2)
    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(4, 8\).*running it raised RuntimeError: "
                                         r"Expected mat_a to be Float32"):
        NetworkAdapter(model, ids, input_name="input_ids")
