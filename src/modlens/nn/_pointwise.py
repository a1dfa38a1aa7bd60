"""Pointwise maps of transformer MLPs: a Linear over tokens or a 1x1 conv over a (B, C, H, W) map.

A 1x1 conv of stride 1 in one group is a Linear applied at every position of the map, so an MLP
written ``fc2(act(fc1(x)))`` with 1x1 convs (EfficientFormer-V2, EfficientViT-MSRA, NextViT,
SHViT, CoAtNet's transformer stages) has the same neurons as one written with Linears; the
residual stream is the channel dimension of the map (docs/transformers.md, "MLPs written with
1x1 convolutions and batch norms"). A batch norm after a map (``ConvNorm``, LeViT's
``LinearNorm``) scales its output rows by ``|gamma| / sqrt(running_var + eps)`` in the weight
graph, as for conv nets (:mod:`modlens.nn._bn`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modlens.nn._bn import bn_scale

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def is_map(mod: nn.Module) -> bool:
    """Whether ``mod`` is a Linear or a pointwise conv: a 1x1 Conv2d or a kernel-1 Conv1d (SqueezeBERT's
    MLPs over (B, C, T)), stride 1, no padding, grouped or not (a grouped one is block-diagonal)."""
    if isinstance(mod, nn.Linear):
        return True
    return (isinstance(mod, (nn.Conv1d, nn.Conv2d)) and set(mod.kernel_size) == {1} and set(mod.stride) == {1}
            and set(mod.padding) == {0})


def width_out(mod: nn.Module) -> int | None:
    return mod.out_features if isinstance(mod, nn.Linear) else getattr(mod, "out_channels", None)


def matrix(mod: nn.Module) -> np.ndarray:
    """The map's weight as ``(out, in)``, a copy in float32 or float64 as the model holds it (float64 from
    any other dtype); a grouped conv's as the block-diagonal matrix (zero between groups). The consumers
    (:mod:`modlens.core.residual_graph`) cast to the dtype they compute in, so a float32 copy gives the
    same graph as a float64 one in half the memory (1.7 GB instead of 3.4 GB for ViT-H/14's MLPs)."""
    w = mod.weight.detach().cpu()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.double()
    w = w.reshape(w.shape[0], -1).numpy()
    groups = getattr(mod, "groups", 1)
    if groups == 1:
        return w.copy()   # not a view of the parameter
    out, per = w.shape[0] // groups, w.shape[1]
    full = np.zeros((w.shape[0], per * groups), dtype=w.dtype)
    for g in range(groups):
        full[g * out:(g + 1) * out, g * per:(g + 1) * per] = w[g * out:(g + 1) * out]
    return full


def is_batch_norm(mod) -> bool:
    return isinstance(mod, BATCH_NORMS)


def norm_scale(norm: nn.Module, width: int) -> np.ndarray:
    """The per-channel scale a norm applies in the weight graph: a batch norm's
    ``|gamma| / sqrt(running_var + eps)``, a LayerNorm/RMSNorm's affine weight (ones without one)."""
    if is_batch_norm(norm):
        return bn_scale(norm).cpu().numpy()
    w = getattr(norm, "weight", None)
    return np.ones(width) if w is None else w.detach().cpu().double().numpy()


def norm_width(s, node) -> int | None:
    """The number of channels a norm node normalizes: dim 1 of a batch norm's input, the last
    dimension otherwise."""
    shape = s.shapes.get(node)
    if shape is None:
        return None
    mod = s.module(node) if node.op == "call_module" else None
    return shape[0] if is_batch_norm(mod) else shape[-1]


def depthwise_rows(conv: nn.Module, width: int, bn: np.ndarray | None) -> np.ndarray:
    """``||k_b||_1`` per hidden channel of a depthwise conv inside an MLP, times ``bn`` (the scale of a
    batch norm right after it, or None): the factor on each unit's read row (docs/transformers.md, Mix-FFN)."""
    k = conv.weight.detach().cpu().double().abs().reshape(width, -1).sum(1).numpy()
    return k if bn is None else k * bn
