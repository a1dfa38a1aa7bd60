"""Position terms inside attention (docs/transformers.md, nn/_scores.py): a product of the queries with a
weight (a relative-position table, a projected position embedding after a learned bias vector) that
only feeds the attention scores is part of attention, not a layer; a matrix product with a weight
whose result reaches the stream stays refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn._ops import UnsupportedModelError
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from tiny_transformers import MLP

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")
CAPTURES = ["export", "fx"]
# (term, capture); the mask term under fx is left out: it ran before, with the einsum not looked at
CASES = [("table", "export"), ("table", "fx"), ("bias", "export"), ("bias", "fx"), ("sdpa", "export"),
         ("xlnet", "export"), ("xlnet", "fx")]


class RelAttention(nn.Module):
    """Attention with a position term in its scores. ``table``: ``einsum`` of the queries with a
    relative-position table gathered from a parameter (Swin/SAM-like); ``bias``: learned bias
    vectors added to the queries, one before ``q k^T`` and one before a ``matmul`` with a projected
    position embedding (Transformer-XL, XLNet, the Conformer); ``sdpa``: the table's term passed as
    the mask of ``scaled_dot_product_attention`` (timm's SAM)."""

    def __init__(self, d: int, heads: int, tokens: int, term: str):
        super().__init__()
        self.heads, self.term = heads, term
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        dh = d // heads
        self.table = nn.Parameter(0.5 * torch.randn(2 * tokens - 1, dh))
        i = torch.arange(tokens)
        self.register_buffer("idx", i[:, None] - i[None, :] + tokens - 1, persistent=False)
        self.u, self.w = nn.Parameter(0.5 * torch.randn(heads, 1, dh)), nn.Parameter(0.5 * torch.randn(heads, 1, dh))
        self.register_buffer("pe", torch.randn(tokens, d), persistent=False)
        self.pos = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        split = lambda z: z.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.term == "sdpa":
            mask = torch.einsum("bhid,ijd->bhij", q, self.table[self.idx])
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            if self.term == "table":
                s = q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, self.table[self.idx])
            else:
                r = self.pos(self.pe).view(self.pe.shape[0], self.heads, -1).permute(1, 2, 0)   # (heads, dh, t)
                s = (q + self.u) @ k.transpose(-1, -2) + torch.matmul(q + self.w, r)
            a = torch.softmax(s / 2, dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, c))


class XLAttention(nn.Module):
    """XLNet-like: queries, keys, values and output are einsums with (d, heads, dh) parameters, a bias
    vector is added to the queries before each score term, and the position term is the queries
    times a projected position embedding. ``act_after`` puts a GELU after the output product: then it
    no longer goes straight to the stream and is refused."""

    def __init__(self, d: int, heads: int, tokens: int, act_after: bool = False):
        super().__init__()
        dh = d // heads
        self.q, self.k, self.v, self.o, self.r = (nn.Parameter(torch.randn(d, heads, dh) / d ** 0.5) for _ in range(5))
        self.u, self.w = nn.Parameter(0.5 * torch.randn(heads, dh)), nn.Parameter(0.5 * torch.randn(heads, dh))
        self.register_buffer("pe", torch.randn(tokens, d), persistent=False)
        self.act_after = act_after

    def forward(self, x):
        q, k, v = (torch.einsum("btc,cnd->btnd", x, w) for w in (self.q, self.k, self.v))
        r = torch.einsum("jc,cnd->jnd", self.pe, self.r)
        s = torch.einsum("bind,bjnd->bnij", q + self.u, k) + torch.einsum("bind,jnd->bnij", q + self.w, r)
        a = torch.einsum("bnij,bjnd->bind", torch.softmax(s / 2, dim=-1), v)
        out = torch.einsum("bind,cnd->bic", a, self.o)
        return F.gelu(out) if self.act_after else out


class Block(nn.Module):
    def __init__(self, d, d_mlp, heads, tokens, term, stream_einsum=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = (XLAttention(d, heads, tokens, term == "xlnet-act") if term.startswith("xlnet")
                     else RelAttention(d, heads, tokens, term))
        self.mlp = MLP(d, d_mlp)
        self.mix = nn.Parameter(0.3 * torch.randn(d, 2, d // 2)) if stream_einsum else None

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        if self.mix is not None:   # a linear map written as an einsum with a weight, added to the stream
            x = x + torch.einsum("btc,cgh->btgh", x, self.mix).flatten(2)
        return x + self.mlp(self.ln2(x))


class RelClassifier(nn.Module):
    def __init__(self, term="table", d_in=6, d=8, d_mlp=12, n_blocks=2, n_classes=3, tokens=5, stream_einsum=False):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*(Block(d, d_mlp, 2, tokens, term, stream_einsum) for _ in range(n_blocks)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def _np(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("term,capture", CASES)
def test_position_terms_are_attention_not_layers(term, capture):
    torch.manual_seed(0)
    m = RelClassifier(term).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 2.0)   # non-trivial norm scales
    a = NetworkAdapter(m, torch.randn(4, 5, 6, dtype=torch.float64), capture=capture)
    assert a.is_transformer and a.capture_method == capture
    assert a.layer_names == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"] and a.layer_sizes == [12, 12]
    # the weight graph is the residual-stream graph of the MLPs: nothing from the position terms
    blocks = {(i, j): b for i, j, b in a.weight_blocks()}
    assert set(blocks) == {(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)}
    b0, b1 = m.blocks
    np.testing.assert_allclose(blocks[(1, 2)], np.abs(_np(b1.mlp.fc1.weight) @ np.diag(_np(b1.ln2.weight))
                                                      @ _np(b0.mlp.fc2.weight)))
    np.testing.assert_allclose(blocks[(0, 1)], np.abs(_np(b0.mlp.fc1.weight) @ np.diag(_np(b0.ln2.weight))
                                                      @ _np(m.embed.weight)))


@pytest.mark.parametrize("term,capture", CASES)
def test_lesions_with_position_terms_equal_the_plain_oracle(term, capture):
    torch.manual_seed(2)
    m = RelClassifier(term, n_blocks=3).double().eval()
    with torch.no_grad():   # MLPs strong enough that their lesions change predictions
        for b in m.blocks:
            b.mlp.fc2.weight.mul_(3)
    x = torch.randn(120, 5, 6, dtype=torch.float64)
    y = m(x).argmax(-1)
    a = NetworkAdapter(m, x, capture=capture)
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer in range(3):   # a lesion of block 0 is recomputed through the position terms of blocks 1-2
        sets = [rng.choice(12, k, replace=False) for k in (1, 4, 6, 12)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
    assert changed >= 2


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_weight_product_into_the_stream_is_still_refused(capture):
    m = RelClassifier("table", stream_einsum=True).eval()
    with pytest.raises(UnsupportedModelError) as e:
        NetworkAdapter(m, torch.randn(4, 5, 6), capture=capture)
    msg = str(e.value)
    assert "\n" not in msg and "einsum" in msg and "in module 'blocks.0'" in msg and "nn.Linear" in msg
    assert "outside attention" in msg and "blocks.0.ln2" in msg


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_weight_product_after_attention_into_an_activation_is_refused(capture):
    """XLNet's output einsum goes straight to the stream; with a GELU after it, it is a layer of its own."""
    m = RelClassifier("xlnet-act").eval()
    with pytest.raises(UnsupportedModelError) as e:
        NetworkAdapter(m, torch.randn(4, 5, 6), capture=capture)
    msg = str(e.value)
    assert "\n" not in msg and "einsum" in msg and "in module 'blocks.0.attn'" in msg and "outside attention" in msg


# ----- Hugging Face models with position terms, nothing downloaded ---------------------------------------
def _tiny_funnel():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.FunnelConfig(vocab_size=40, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=24, num_labels=3,
                         num_decoder_layers=1, max_position_embeddings=32)
    return t.FunnelForSequenceClassification(cfg), torch.randint(5, 40, (60, 8)), "ffn.linear_1"


def _tiny_conformer():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.Wav2Vec2ConformerConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        conv_depthwise_kernel_size=3, position_embeddings_type="relative", num_labels=3, classifier_proj_size=8,
        max_source_positions=64)
    return (t.Wav2Vec2ConformerForSequenceClassification(cfg), torch.randn(60, 200, dtype=torch.float64),
            "intermediate_dense")


def _tiny_xlnet():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.XLNetConfig(vocab_size=40, d_model=16, n_layer=2, n_head=2, d_inner=24, num_labels=3)
    return t.XLNetForSequenceClassification(cfg), torch.randint(5, 40, (60, 8)), "ff.layer_1"


@pytest.mark.parametrize("build,budget", [(_tiny_funnel, None), (_tiny_conformer, None), (_tiny_xlnet, None),
                                          (_tiny_xlnet, 60_000)],
                         ids=["funnel", "wav2vec2-conformer", "xlnet", "xlnet-chunked"])
def test_hugging_face_relative_attention_lesions_equal_the_plain_oracle(build, budget):
    """Funnel (einsums of the queries with a projected position embedding and a segment embedding),
    the Wav2Vec2 Conformer (a matmul of the queries plus a bias vector with a projected position
    embedding) and XLNet (every projection an einsum with a parameter, and a time-major (T, B, C)
    stream, cached batch first; with a small memory budget, in chunks and blocks): MLP neurons only,
    and lesions of every MLP layer equal the plain oracle."""
    m, x, unit = build()
    m = m.double().eval()
    with torch.no_grad():   # MLPs strong enough that lesions change predictions of the random model
        for name, p in m.named_parameters():
            if ("ffn" in name or ".ff." in name) and p.dim() == 2:
                p.mul_(8)
    y = m(x).logits.argmax(-1)
    a = NetworkAdapter(m, x)
    assert a.is_transformer and a.layer_names and all(name.endswith(unit) for name in a.layer_names)
    assert a.layer_sizes == [24] * len(a.layer_names)
    ev = IncrementalLesions(a, x, y, batch_size=16, memory_budget_bytes=budget)
    rng = np.random.default_rng(0)
    changed = 0
    for layer in range(len(a.layer_names)):
        sets = [rng.choice(24, k, replace=False) for k in (1, 8, 24)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
        if budget is not None:
            assert ev.last_stats["cache_chunks"] > 1
    assert changed >= 2


def test_activations_of_a_time_major_stream_are_one_row_per_sample():
    """XLNet's MLPs run on a time-major (T, B, C) stream: recorded activations are moved batch first
    before the L1 reduction over tokens, one row per sample (before: the reduction summed over the
    batch and gave one row per token)."""
    m, x, unit = _tiny_xlnet()
    m = m.double().eval()
    x = x[:6]
    a = NetworkAdapter(m, x[:2])
    got = a.record(iter([x[:4], x[4:]]))
    seen = {}
    hooks = [m.get_submodule(name).register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o))
             for name in a.layer_names]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for name, z in zip(a.layer_names, got):
        pre = seen[name]                                   # (T, B, units): XLNet's time-major stream
        assert pre.shape[1] == len(x) and z.shape == (len(x), pre.shape[2])
        np.testing.assert_allclose(z, pre.abs().sum(0).numpy(), rtol=1e-10, atol=1e-12)
