"""Weight-graph edges and activation summaries of conv channels (paper section 3.1).

* Edge between channel ``i`` of a layer and channel ``o`` of a conv that reads it: the L1
  norm of the kernel slice ``W[o, i]`` (or the original code's matrix 1-norm, row 1 of the
  notes), times the batch-norm scale of channel ``o`` (row 3). A Linear that reads a
  flattened conv output joins channel ``i`` to unit ``o`` by the sum of ``|W[o, j]|`` over the
  features ``j`` that channel ``i`` owns after channel-major flattening.
* Activation summary of a conv channel: the L1 norm over spatial positions of its
  pre-activation map (or the matrix 1-norm of the map, row 2), computed on the model's device
  inside the probe, so full maps are never stored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modlens.core.graph import CONV_EDGE_NORMS, kernel_slice_norms
from modlens.nn._bn import bn_scale
from modlens.nn._structure import Route

ACT_REDUCTIONS = ("l1", "matrix_1_norm")


def edge_block(consumer: nn.Module, routes: list[Route], n_source: int, *, norm: str = "l1",
               row_scale: torch.Tensor | None = None, name: str = "") -> np.ndarray:
    """(out, n_source) non-negative edges from the ``n_source`` channels of a layer, reaching
    ``consumer`` through ``routes``, to the consumer's output channels or units."""
    if norm not in CONV_EDGE_NORMS:
        raise ValueError(f"conv_edge must be one of {CONV_EDGE_NORMS}, got {norm!r}")
    w = consumer.weight.detach().cpu().double().numpy()
    source = np.arange(n_source)
    block = np.zeros((w.shape[0], n_source))
    for route in routes:
        if isinstance(consumer, nn.Linear):
            idx = route.indices(source, consumer.in_features, f"layer '{name}'")
            block += np.abs(w[:, idx]).reshape(w.shape[0], n_source, -1).sum(axis=2)
        else:
            block += kernel_slice_norms(w[:, route.indices(source, w.shape[1])], norm)
    if row_scale is not None:
        block *= row_scale.cpu().numpy()[:, None]
    return block


def bn_row_scale(bns: list[nn.Module]) -> torch.Tensor | None:
    scale = None
    for bn in bns:
        s = bn_scale(bn)
        scale = s if scale is None else scale * s
    return scale


def reduce_l1(t: torch.Tensor) -> torch.Tensor:
    """Per-channel L1 norm over spatial positions; a (batch, units) value is copied as is."""
    if t.dim() <= 2:
        return t.detach().clone()
    return t.detach().abs().flatten(2).sum(-1)


def reduce_matrix_1_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-channel matrix 1-norm of a (h, w) map: the largest column sum of |values| (row 2)."""
    if t.dim() <= 2:
        return t.detach().clone()
    if t.dim() == 3:
        return t.detach().abs().sum(-1)
    return t.detach().abs().sum(-2).flatten(2).amax(-1)


REDUCERS = {"l1": reduce_l1, "matrix_1_norm": reduce_matrix_1_norm}
