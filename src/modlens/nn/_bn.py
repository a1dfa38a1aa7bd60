"""Batch norm in the weight graph (paper section 3.1; row 3 of the original-code notes).

In eval mode a batch norm multiplies channel ``c`` by ``gamma_c / sqrt(running_var_c + eps)``
and shifts it. modlens folds the scale into the weight graph as the original code did: the
edges *into* the normalized channel are multiplied by ``|gamma_c| / sqrt(running_var_c + eps)``
(the absolute value, so a negative gamma cannot give a negative edge). For a conv directly
followed by its batch norm this is exactly the L1 norm of the kernel slices of the
numerically folded conv (:func:`fold_into_conv`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """``|gamma| / sqrt(running_var + eps)`` per channel, float64."""
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double().abs()
    return scale


def fold_into_conv(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` (Conv1d/Conv2d/Linear) that computes ``bn(conv(x))`` in eval mode."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        inv = 1.0 / torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(inv)
        scale = gamma * inv
        fused.weight.mul_(scale.view(-1, *([1] * (fused.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(inv)
        new_bias = (bias - bn.running_mean) * scale + beta
        if fused.bias is None:
            fused.bias = nn.Parameter(new_bias)
        else:
            fused.bias.copy_(new_bias)
    return fused
