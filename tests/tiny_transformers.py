"""Small transformer classifiers for the transformer tests (nothing downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        split = lambda z: z.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d: int, d_mlp: int, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d_mlp), act(), nn.Linear(d_mlp, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_mlp: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, d_mlp, bias=False), nn.Linear(d, d_mlp, bias=False), \
            nn.Linear(d_mlp, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d: int, d_mlp: int, heads: int = 2, glu: bool = False, attention: bool = True,
                 norm=nn.LayerNorm):
        super().__init__()
        self.ln1, self.ln2 = norm(d), norm(d)
        self.attn = Attention(d, heads) if attention else None
        self.mlp = SwiGLU(d, d_mlp) if glu else MLP(d, d_mlp)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TokenClassifier(nn.Module):
    """(B, T, d_in) continuous tokens -> Linear embedding -> blocks -> final norm -> mean over
    tokens -> head. ``glu`` gives SwiGLU MLPs and RMSNorm."""

    def __init__(self, d_in=6, d=8, d_mlp=12, n_blocks=2, n_classes=3, tokens=5, glu=False, attention=True):
        super().__init__()
        norm = nn.RMSNorm if glu else nn.LayerNorm
        self.embed = nn.Linear(d_in, d)
        self.pos = nn.Parameter(0.1 * torch.randn(tokens, d))
        self.blocks = nn.Sequential(*(Block(d, d_mlp, glu=glu, attention=attention, norm=norm)
                                      for _ in range(n_blocks)))
        self.norm = norm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(h).mean(1))
