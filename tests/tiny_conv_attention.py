"""Tiny convolutional networks whose spatial mixer is attention (HaloNet, BoTNet, MobileNet-V5 alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HaloMixer(nn.Module):
    """Attention of each 2x2 block of positions over that block and a halo of 1 around it (HaloNet):
    queries and fused keys/values from 1x1 convs, the windows cut by padding and sliding windows."""

    def __init__(self, dim: int, heads: int = 2, block: int = 2, halo: int = 1):
        super().__init__()
        self.heads, self.block, self.halo, self.dh = heads, block, halo, dim // heads
        self.win = block + 2 * halo
        self.q = nn.Conv2d(dim, dim, 1, bias=False)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.rel = nn.Parameter(torch.randn(self.win * self.win, self.dh) * 0.1)

    def forward(self, x):
        B, C, H, W = x.shape
        b, nh, nw = self.block, H // self.block, W // self.block
        q = self.q(x).reshape(-1, self.dh, nh, b, nw, b).permute(0, 1, 3, 5, 2, 4)
        q = q.reshape(B * self.heads, self.dh, -1, nh * nw).transpose(1, 3)        # (BH, blocks, b*b, dh)
        kv = F.pad(self.kv(x), [self.halo] * 4)
        kv = kv.unfold(2, self.win, b).unfold(3, self.win, b).reshape(
            B * self.heads, 2 * self.dh, nh * nw, -1).permute(0, 2, 3, 1)              # (BH, blocks, win*win, 2dh)
        k, v = torch.split(kv, [self.dh, self.dh], dim=-1)
        attn = (q @ k.transpose(-1, -2) + q @ self.rel.t()) * self.dh ** -0.5
        out = (attn.softmax(dim=-1) @ v).transpose(1, 3)                               # (BH, dh, b*b, blocks)
        out = out.reshape(-1, b, b, nh, nw).permute(0, 3, 1, 4, 2).contiguous()
        return out.view(B, C, H, W)


class BotMixer(nn.Module):
    """Global attention over all positions with one fused qkv 1x1 conv (BoTNet's bottleneck attention)."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = torch.split(self.qkv(x), [C, C, C], dim=1)
        q = q.reshape(B * self.heads, self.dh, -1).transpose(-1, -2)
        k = k.reshape(B * self.heads, self.dh, -1)
        v = v.reshape(B * self.heads, self.dh, -1).transpose(-1, -2)
        attn = (q @ k * self.dh ** -0.5).softmax(dim=-1)
        return (attn @ v).transpose(-1, -2).reshape(B, C, H, W)


class LambdaMixer(nn.Module):
    """A lambda layer (LambdaNet): the keys softmaxed over positions summarize the values into a "lambda"
    (``softmax(k) @ v``, key_dim x value channels) that each position's queries read (``q @ lambda``)."""

    def __init__(self, dim: int, heads: int = 2, key_dim: int = 4):
        super().__init__()
        self.heads, self.kd, self.dv = heads, key_dim, dim // heads
        self.qkv = nn.Conv2d(dim, heads * key_dim + key_dim + self.dv, 1, bias=False)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = torch.split(self.qkv(x), [self.heads * self.kd, self.kd, self.dv], dim=1)
        q = q.reshape(B, self.heads, self.kd, H * W).transpose(-1, -2)
        k = F.softmax(k.reshape(B, self.kd, H * W), dim=-1)
        lam = k @ v.reshape(B, self.dv, H * W).transpose(-1, -2)                     # (B, kd, dv)
        out = q @ lam.unsqueeze(1)                                                   # (B, heads, HW, dv)
        return out.transpose(-1, -2).reshape(B, C, H, W)


class MultiQueryMixer(nn.Module):
    """Multi-query attention (MobileNet-V5): several query heads, one key and one value map shared by all
    heads (each value channel reaches one output channel per head), then an output 1x1 conv."""

    def __init__(self, dim: int, heads: int = 2, key_dim: int = 4):
        super().__init__()
        self.heads, self.kd = heads, key_dim
        self.query = nn.Conv2d(dim, heads * key_dim, 1, bias=False)
        self.key = nn.Conv2d(dim, key_dim, 1, bias=False)
        self.value = nn.Conv2d(dim, key_dim, 1, bias=False)
        self.output = nn.Conv2d(heads * key_dim, dim, 1, bias=False)

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.query(x).reshape(B, self.heads, self.kd, -1).transpose(-1, -2)
        k = self.key(x).reshape(B, self.kd, -1).transpose(1, 2).unsqueeze(1)
        v = self.value(x).reshape(B, self.kd, -1).transpose(1, 2).unsqueeze(1)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.output(o.reshape(B, H, W, self.heads * self.kd).permute(0, 3, 1, 2).contiguous())


class Bottleneck(nn.Module):
    """1x1 conv, the mixer in place of the 3x3 conv, 1x1 conv, each with a batch norm; a residual."""

    def __init__(self, dim: int, mixer: nn.Module, mid: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(dim, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.mixer, self.bn2 = mixer, nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, dim, 1, bias=False), nn.BatchNorm2d(dim)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.mixer(h)))
        return F.relu(x + self.bn3(self.conv3(h)))


class EdgeResidual(nn.Module):
    """A 3x3 expanding conv and a 1x1 projection, each with a batch norm; a residual (MobileNet-V5's
    first blocks)."""

    def __init__(self, dim: int, mid: int):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(dim, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.project, self.bn2 = nn.Conv2d(mid, dim, 1, bias=False), nn.BatchNorm2d(dim)

    def forward(self, x):
        return x + self.bn2(self.project(F.relu(self.bn1(self.expand(x)))))


class RmsNorm2d(nn.Module):
    """An RMS norm over the channels of a (B, C, H, W) map, written out (timm's ``RmsNorm2d``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.2 * torch.randn(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.weight.reshape(1, -1, 1, 1)


class AttentionBlock(nn.Module):
    """``x + mixer(norm(x))`` with an RMS norm over the channels (MobileNet-V5's multi-query attention block)."""

    def __init__(self, dim: int, mixer: nn.Module):
        super().__init__()
        self.norm, self.mixer = RmsNorm2d(dim), mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class TinyAttentionCNN(nn.Module):
    """A stem conv, then a bottleneck with HaloNet's or BoTNet's mixer in place of its 3x3 conv, or an
    edge residual followed by a multi-query attention block (MobileNet-V5); pooled, one Linear."""

    def __init__(self, mixer: str, width: int = 8, mid: int = 8, n_classes: int = 4, depth: int = 1):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        if mixer == "mqa":
            self.block = nn.Sequential(EdgeResidual(width, 2 * width), AttentionBlock(width, MultiQueryMixer(width)))
        else:
            make = {"halo": HaloMixer, "bot": BotMixer, "lambda": LambdaMixer}[mixer]
            blocks = [Bottleneck(width, make(mid), mid) for _ in range(depth)]
            self.block = blocks[0] if depth == 1 else nn.Sequential(*blocks)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


MIXERS = ("halo", "bot", "mqa")
