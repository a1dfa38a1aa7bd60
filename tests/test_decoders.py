"""Decoder language models through capture (issue 18): every family of tiny_decoders.py, both heads.

What the capture rewrites do (nn/_decoder_capture.py) is checked on the real Hugging Face modules
and on small hand-written models: GPT-2's Conv1D is a Linear sharing the transposed weight,
gelu_new is one activation, written-out RMSNorm is a norm with its scale (Gemma: 1 + w), OPT's
merged rows are per-token layers again, the last-token head is a reduction after the output layer,
and the captured graph computes the model's logits exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn import IncrementalLesions, NetworkAdapter, UnsupportedModelError, correct_counts_plain
from modlens.nn._decoder_ops import Elementwise, WrittenNorm, take_tokens
from tiny_decoders import C, D, FAMILIES, MLP, V, decoder, logits, token_ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")

GATED = {"llama", "qwen2", "mistral", "gemma", "phi3", "glm"}


@pytest.mark.parametrize("head", ["seqcls", "causal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_families_are_captured_exactly(family, head):
    model = decoder(family, head)
    ids = token_ids(6)
    a = NetworkAdapter(model, ids, input_name="input_ids")
    assert a.is_transformer and a.capture_method == "export"
    with torch.no_grad():
        np.testing.assert_array_equal(a.gm(ids).numpy(), logits(model, ids).numpy())
    out = C if head == "seqcls" else V
    assert a.layer_sizes == [MLP, MLP] and a.n_classes == out
    assert a.node_layer_sizes() == [V, MLP, MLP, out]  # vocabulary, two MLPs, classes or vocabulary
    parts = a.residual_parts()
    assert all(b.gamma is not None for b in parts["blocks"]) and parts["final_gamma"] is not None
    assert [b.w_gate is not None for b in parts["blocks"]] == [family in GATED] * 2
    if head == "seqcls" and family != "plain":  # HF reads the last non-pad token by indexing
        assert any(n.target is take_tokens for n in a.gm.graph.nodes)
        assert a.structure.output_layer.target == "score"


def test_conv1d_is_a_linear_sharing_the_transposed_weight_and_gelu_new_is_one_activation():
    model = decoder("gpt2", "causal")
    ids = token_ids(5)
    a = NetworkAdapter(model, ids, input_name="input_ids")
    assert a.layer_names == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    conv = model.transformer.h[0].mlp.c_fc
    lin = a.gm.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(lin, nn.Linear) and lin.weight.data_ptr() == conv.weight.data_ptr()
    assert torch.equal(lin.weight, conv.weight.T) and lin.bias is conv.bias
    act = a.gm.get_submodule("transformer.h.0.mlp.act")
    assert isinstance(act, Elementwise) and act.nonlinear and "tanh" in act.ops
    # the pre-activation is c_fc's output at every token (the input of gelu_new)
    seen = {}
    hook = conv.register_forward_hook(lambda m, i, o: seen.setdefault("z", o))
    with torch.no_grad():
        model(input_ids=ids)
        got = a.values([0])(ids)
    hook.remove()
    np.testing.assert_array_equal(got.numpy(), seen["z"].transpose(1, 2).numpy())
    # the token embedding is found behind GPT-2's view of the ids
    np.testing.assert_array_equal(a.residual_parts()["embedding"], model.transformer.wte.weight.detach().numpy().T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_written_out_rmsnorm_is_a_norm_with_its_scale(family, dtype):
    # float32: HF's ``x.to(torch.float32)`` is then the value itself, and the trace routes the
    # residual stream on through that cast; the block norms must still be found (the survey found
    # them missing in float32 models while the float64 tests passed)
    model = decoder(family, "causal", dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    ids = token_ids(4)
    a = NetworkAdapter(model, ids, input_name="input_ids")
    with torch.no_grad():
        np.testing.assert_array_equal(a.gm(ids).numpy(), logits(model, ids).numpy())
    for block in range(2):
        for which in ("input_layernorm", "post_attention_layernorm"):
            assert isinstance(a.gm.get_submodule(f"model.layers.{block}.{which}"), WrittenNorm)
    norm = a.gm.get_submodule("model.layers.0.post_attention_layernorm")
    w = model.model.layers[0].post_attention_layernorm.weight.detach()
    want = (1 + w.float()) if family == "gemma" else w  # Gemma scales by 1 + w, computed in float32
    np.testing.assert_array_equal(norm.weight.numpy(), want.numpy())
    parts = a.residual_parts()
    np.testing.assert_array_equal(parts["blocks"][0].gamma, want.double().numpy())
    final = model.model.norm.weight.detach()
    np.testing.assert_array_equal(parts["final_gamma"], ((1 + final.float()) if family == "gemma" else final).double().numpy())
    if family == "gemma":  # the lookup is scaled by sqrt(d_model) before the first block
        emb = model.model.embed_tokens.weight.detach().numpy().T * np.float32(math.sqrt(D))
        np.testing.assert_allclose(parts["embedding"], emb, rtol=1e-6)


def test_opt_merged_rows_become_per_token_layers():
    model = decoder("opt", "causal")
    a = NetworkAdapter(model, token_ids(4), input_name="input_ids")
    assert a.layer_names == ["model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"]
    assert all(a.structure.ndim(a.layer_node(i)) == 3 for i in range(2))   # (B, T, d_mlp), not (B*T, d_mlp)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_lesions_equal_the_plain_oracle_on_sequence_classifiers(family):
    model = decoder(family, "seqcls")
    ids = token_ids(40, seed=1)
    y = logits(model, ids).argmax(-1)
    a = NetworkAdapter(model, ids, input_name="input_ids")
    ev = IncrementalLesions(a, ids, y)
    rng = np.random.default_rng(0)
    for layer in range(2):
        sets = [rng.choice(MLP, k, replace=False) for k in (1, 8, 16, MLP)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, ids, y))


# ----- hand-written patterns ---------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class _HandWritten(nn.Module):
    """Embedding -> block (attention, hand-written RMSNorm, MLP) -> head. ``mlp``: ``"gelu_new"``
    (tanh GELU written out), ``"silu_glu"`` (SwiGLU with SiLU written as x * sigmoid(x)) or
    ``"addmm"`` (both maps written as addmm with (in, out) weights)."""

    def __init__(self, mlp: str, d=8, d_mlp=12, vocab=10):
        super().__init__()
        self.mlp = mlp
        self.emb = nn.Embedding(vocab, d)
        self.attn = _Attention(d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.up = nn.Linear(d, d_mlp)
        self.gate = nn.Linear(d, d_mlp)
        self.w1 = nn.Parameter(torch.randn(d, d_mlp) / 3)
        self.b1 = nn.Parameter(torch.randn(d_mlp) / 3)
        self.w2 = nn.Parameter(torch.randn(d_mlp, d) / 3)
        self.down = nn.Linear(d_mlp, d)
        self.head = nn.Linear(d, vocab)

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.attn(x)
        h = self.rms(x)
        if self.mlp == "gelu_new":
            u = self.up(h)
            x = x + self.down(0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u.pow(3)))))
        elif self.mlp == "silu_glu":
            g = self.gate(h)
            x = x + self.down((g * torch.sigmoid(g)) * self.up(h))
        else:
            b, t, d = h.shape
            u = torch.addmm(self.b1, h.reshape(-1, d), self.w1).view(b, t, -1)
            x = x + torch.mm(torch.relu(u).reshape(b * t, -1), self.w2).view(b, t, d)
        return self.head(x)


@pytest.mark.parametrize("mlp", ["gelu_new", "silu_glu", "addmm"])
def test_hand_written_patterns(mlp):
    torch.manual_seed(0)
    model = _HandWritten(mlp).double().eval()
    ids = torch.randint(0, 10, (7, 5))
    a = NetworkAdapter(model, ids)
    with torch.no_grad():
        np.testing.assert_array_equal(a.gm(ids).numpy(), model(ids).numpy())
    assert len(a.layers) == 1 and a.layer_sizes == [12]
    parts = a.residual_parts()
    np.testing.assert_array_equal(parts["blocks"][0].gamma, model.scale.detach().numpy())  # the written-out RMSNorm
    if mlp == "silu_glu":  # the closure x * sigmoid(x) is the activation; gate * up stays the GLU product
        assert a.layer_names == ["gate"] and parts["blocks"][0].w_gate is not None
    elif mlp == "gelu_new":
        assert a.layer_names == ["up"]
    else:  # addmm(b1, h, w1): a Linear whose weight is w1.T; mm(., w2): the second map
        assert a.layer_names == ["w1"]
        np.testing.assert_array_equal(parts["blocks"][0].w_in, model.w1.detach().numpy().T)
        np.testing.assert_array_equal(parts["blocks"][0].w_out, model.w2.detach().numpy().T)


def test_a_matrix_product_with_a_computed_weight_is_refused_in_one_line():
    class Computed(_HandWritten):
        def forward(self, ids):
            x = self.emb(ids)
            x = x + self.attn(x)
            b, t, d = x.shape
            u = torch.addmm(self.b1, x.reshape(-1, d), self.w1 * 2).view(b, t, -1)  # weight computed in forward
            return self.head(x + self.down(torch.relu(u)))

    model = Computed("addmm").eval()
    with pytest.raises(UnsupportedModelError, match=r"addmm.*written as a matrix product.*use nn.Linear"):
        NetworkAdapter(model, torch.randint(0, 10, (3, 5)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_residual_parts_are_float32_copies_of_a_float32_model_and_give_the_float64_graph(family):
    """The MLP matrices of the weight graph stay in the model's float32 (half the memory of float64 copies);
    they are copies, not views of the parameters, and the graph the core computes from them in float64 is
    exactly the graph of their float64 casts."""
    import dataclasses

    from modlens.core.residual_graph import residual_weight_graph

    model = decoder(family, "seqcls").float()   # the tiny decoders are float64
    a = NetworkAdapter(model, token_ids(6), input_name="input_ids")
    parts = a.residual_parts()
    mats = [w for b in parts["blocks"] for w in (b.w_in, b.w_out, b.w_gate) if w is not None]
    assert len(mats) == (6 if family in GATED else 4) and all(w.dtype == np.float32 for w in mats)
    params = [p.detach().numpy() for p in model.parameters()]
    assert not any(np.shares_memory(w, p) for w in mats for p in params)
    as64 = dict(parts, blocks=[dataclasses.replace(b, w_in=b.w_in.astype(np.float64), w_out=b.w_out.astype(np.float64),
                                                   w_gate=None if b.w_gate is None else b.w_gate.astype(np.float64))
                               for b in parts["blocks"]])
    got, sizes = residual_weight_graph(**parts, mode="dense")
    want, sizes64 = residual_weight_graph(**as64, mode="dense")
    assert sizes == sizes64
    np.testing.assert_array_equal(got.toarray(), want.toarray())
