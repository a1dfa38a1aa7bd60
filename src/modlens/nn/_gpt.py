"""The reference decoder language model: a small GPT written with plain PyTorch modules.

Token and learned position embeddings, ``n_blocks`` pre-norm blocks (LayerNorm, causal multi-head
attention with one ``qkv`` Linear and ``scaled_dot_product_attention(is_causal=True)``, LayerNorm,
a GELU MLP ``fc -> GELU -> out``), a final LayerNorm and an unembedding tied to the token
embedding (``head="lm"``: logits ``(B, T, vocab)``), or a class head on the last position
(``head="classes"``: logits ``(B, n_classes)``). The kind of decoder people write for themselves,
and the architecture of the ``gpt`` reference recipe (:func:`modlens.nn.models.build_model`).

Weights are drawn from an explicit ``torch.Generator`` (GPT-2's scheme: normal with standard
deviation 0.02, the two maps that write into the residual stream scaled by ``1/sqrt(2 n_blocks)``,
zero biases, unit norm scales), never from torch's global generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()
        self.out = nn.Linear(d_mlp, d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class Decoder(nn.Module):
    """A decoder-only transformer over token ids ``(B, T)`` with ``T <= context``."""

    def __init__(self, vocab_size: int = 128, context: int = 128, d_model: int = 128, n_blocks: int = 4,
                 n_heads: int = 4, d_mlp: int = 512, *, head: str = "lm", n_classes: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("d_model", d_model),
                            ("n_blocks", n_blocks), ("n_heads", n_heads), ("d_mlp", d_mlp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Decoder: {name} must be a positive int, got {value!r}")
        if head not in ("lm", "classes"):
            raise ValueError(f"Decoder: head must be 'lm' (next-token logits) or 'classes' (a class head on the "
                             f"last position), got {head!r}")
        if head == "classes" and (not isinstance(n_classes, int) or n_classes < 2):
            raise ValueError(f"Decoder: head='classes' needs n_classes >= 2, got {n_classes!r}")
        self.context = context
        self.head_kind = head
        with torch.device("meta"):  # no draw from torch's global generator: weights come from `generator` below
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_mlp) for _ in range(n_blocks))
            self.ln_f = nn.LayerNorm(d_model)
            if head == "lm":
                self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
            else:
                self.score = nn.Linear(d_model, n_classes)
        self.to_empty(device="cpu")
        if head == "lm":
            self.lm_head.weight = self.tok.weight  # tied input and output embeddings
        self._init(generator, n_blocks)

    def _init(self, generator: torch.Generator | None, n_blocks: int) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:  # LayerNorm scales
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * n_blocks) if name.endswith(("proj.weight", "out.weight")) else 0.02
                    p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.head_kind == "lm":
            return self.lm_head(x)
        return self.score(x[:, -1])


__all__ = ["Decoder", "DecoderBlock", "CausalSelfAttention"]
