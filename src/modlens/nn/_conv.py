"""Weight-graph edges and activation summaries of conv channels (paper section 3.1).

* Edge between channel ``i`` of a layer and channel ``o`` of a conv that reads it: the L1
  norm of the kernel slice ``W[o, i]`` (or the original code's matrix 1-norm, row 1 of the
  notes). In a grouped (or depthwise) conv a kernel slice exists only within a group, so
  edges join channels of the same group only. A Linear that reads a flattened conv output
  joins channel ``i`` to unit ``o`` by the sum of ``|W[o, j]|`` over the features ``j`` that
  channel ``i`` owns after channel-major flattening; a per-position (channels-last) Linear
  joins channel ``i`` to unit ``o`` by ``|W[o, i]|``.
* Per-channel scales between two layers are folded into the edges (``bn_fold``, row 3):

  - ``"paper"`` (default; paper section 3.1): every scale met on the way from layer ``l`` to
    layer ``l + 1`` -- batch norm ``gamma_c / sqrt(var_c + eps)``, the ``|gamma_c|`` of a
    LayerNorm/GroupNorm/RMSNorm, a learned layer scale -- multiplies the edges *out of*
    channel ``c`` of ``l`` (absolute value of the folded weight). The paper writes the batch-norm
    factor as ``gamma/(sigma + eps)``; modlens reads it as the factor the network actually
    applies, ``gamma / sqrt(sigma^2 + eps)``, so the folded weights are those of the equivalent
    network without batch norm (the two differ by less than ``eps / (2 sigma)`` relative).
  - ``"original"``: the original code's choice for batch norm: edges *into* a channel that is
    batch-normalized before any branch are multiplied by ``|gamma|/sqrt(var + eps)``; other
    scales (normalizations, layer scales) still fold as in ``"paper"``.
  - ``"none"``: no batch-norm scale (the original CIFAR VGG code in effect); other scales fold.

  A normalization ``|gamma|`` is folded only when it has one entry per channel; LayerNorms over
  several dimensions contribute no scale.
* Activation summary of a conv channel: the L1 norm over spatial positions of its
  pre-activation map (or the matrix 1-norm of the map, row 2), computed on the model's device
  inside the probe, so full maps are never stored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from modlens.core.graph import CONV_EDGE_NORMS, kernel_slice_norms
from modlens.nn._bn import bn_scale
from modlens.nn._fx import extract
from modlens.nn._ops import Route
from modlens.nn._registry import BATCH_NORMS, NORMS

ACT_REDUCTIONS = ("l1", "matrix_1_norm")
BN_FOLDS = ("paper", "original", "none")


def consumer_edges(consumer: nn.Module, route: Route, n_source: int, norm: str, name: str = "") -> np.ndarray:
    """(out, n_source) non-negative edges from ``n_source`` channels reaching ``consumer`` through ``route``."""
    if norm not in CONV_EDGE_NORMS:
        raise ValueError(f"conv_edge must be one of {CONV_EDGE_NORMS}, got {norm!r}")
    source = np.arange(n_source)
    carried = route.carried(source)           # a split leaves some channels out: their edges are 0
    if isinstance(consumer, nn.Linear):
        w = consumer.weight.detach().cpu().double().numpy()
        idx = route.indices(source, consumer.in_features, f"layer '{name}'")
        part = np.abs(w[:, idx]).reshape(w.shape[0], int(carried.sum()), -1).sum(axis=2)
    else:
        idx = route.indices(source, consumer.in_channels)
        slices = _slice_norms(consumer.weight, norm)               # (out, in / groups)
        if consumer.groups == 1:   # every output reads every input: the slices themselves
            whole = idx.size == slices.shape[1] and np.array_equal(idx, np.arange(idx.size))
            part = slices if whole else slices[:, idx]
        else:   # edges only within a group: the block is zero elsewhere, filled group by group
            per_group_in = consumer.in_channels // consumer.groups
            per_group_out = consumer.out_channels // consumer.groups
            local, group = idx % per_group_in, idx // per_group_in
            rows = group[:, None] * per_group_out + np.arange(per_group_out)   # (sources, outputs of their group)
            cols = np.broadcast_to(np.arange(idx.size)[:, None], rows.shape)
            part = np.zeros((consumer.out_channels, idx.size))
            part[rows, cols] = slices[rows, local[:, None]]
    if carried.all():
        return part
    out = np.zeros((part.shape[0], n_source))
    out[:, carried] = part
    return out


def _slice_norms(weight: torch.Tensor, norm: str) -> np.ndarray:
    """(out, in / groups) kernel-slice norms of a conv weight, float64 (:func:`kernel_slice_norms`). A 1x1
    kernel's slice is one weight, whose norm is its absolute value: taken before the float64 copy, with no
    reduction (the same values, without two passes over a weight of up to 10^8 entries)."""
    w = weight.detach().cpu()
    if w.dim() >= 2 and w[0, 0].numel() == 1:
        return w.abs().double().numpy().reshape(w.shape[0], w.shape[1])
    return kernel_slice_norms(w.double().numpy(), norm)


def _per_source(route: Route, n_source: int, values: np.ndarray) -> np.ndarray:
    """Per-channel values of the channels ``route`` carries, as one entry per source channel (1 elsewhere)."""
    carried = route.carried(np.arange(n_source))
    if carried.all():
        return values
    out = np.ones(n_source)
    out[carried] = values
    return out


def _param_scale(node: fx.Node, structure, route: Route, n_source: int) -> np.ndarray | None:
    """|p| per source channel for ``p * x`` (a layer scale or a constant), or None."""
    values = []
    args = node.args[1:3] if "addcmul" in str(node.target) else node.args   # addcmul(b, w, x): the scale is w
    for a in args:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            values.append(_attr(structure.gm, a.target))
        elif isinstance(a, fx.Node) and a not in structure.dynamic and not structure.is_shape(a):
            with torch.no_grad():   # computed from parameters only, e.g. gamma.view(1, -1, 1, 1)
                values.append(extract(structure.gm, [], [a])())
        elif isinstance(a, (int, float)):
            values.append(torch.tensor(float(a)))
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        return None
    p = values[0].detach().double().cpu()
    if p.numel() == 1:
        return np.full(n_source, abs(float(p.reshape(()))))
    axis = route.dim - route.ndim                               # align from the right, as broadcasting does
    if p.dim() < -axis or route.flat:
        return None
    shape = list(p.shape)
    if shape[axis] != p.numel():
        return None
    return _per_source(route, n_source, p.abs().reshape(-1).numpy()[route.indices(np.arange(n_source), p.numel())])


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def channel_scale(node: fx.Node, route: Route, n_source: int, structure, bn_fold: str) -> np.ndarray | None:
    """The scale of one node met on a weight walk, per source channel, or None (no scale)."""
    if node.op != "call_module":
        return _param_scale(node, structure, route, n_source)
    m = structure.module(node)
    if isinstance(m, BATCH_NORMS):
        if bn_fold != "paper" or m.running_var is None:
            return None
        vec = bn_scale(m).numpy()
    elif isinstance(m, NORMS):
        w = getattr(m, "weight", None)
        if w is None or w.dim() != 1:
            return None
        if isinstance(m, nn.GroupNorm) and route.dim != 1:
            return None
        if not isinstance(m, nn.GroupNorm) and route.dim != route.ndim - 1:
            return None
        vec = w.detach().double().abs().cpu().numpy()
    else:
        return None
    idx = route.indices(np.arange(n_source), vec.shape[0])
    n = int(route.carried(np.arange(n_source)).sum())
    return _per_source(route, n_source, vec[idx].reshape(n, -1).mean(axis=1))


def edge_block(consumer_node: fx.Node, sinks: list, n_source: int, structure, *, norm: str = "l1",
               bn_fold: str = "paper") -> np.ndarray:
    """(out, n_source) edges from a layer into ``consumer_node``, summed over the paths (sinks) by
    which its channels reach it, with the per-channel scales of each path folded in."""
    if bn_fold not in BN_FOLDS:
        raise ValueError(f"bn_fold must be one of {BN_FOLDS}, got {bn_fold!r}")
    consumer = structure.module(consumer_node)
    block = None
    for sink in sinks:   # each part is a new array (consumer_edges makes one): scaled and summed in place
        part = consumer_edges(consumer, sink.route, n_source, norm, consumer_node.target)
        for node, route in sink.scales:
            s = channel_scale(node, route, n_source, structure, bn_fold)
            if s is not None:
                part *= s[None, :]
        if block is None:
            block = part
        else:
            block += part
    if bn_fold == "original":
        rows = bn_row_scale(structure.bn_chain(consumer_node))
        if rows is not None:
            block *= rows.numpy()[:, None]
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


def channels_first(t: torch.Tensor) -> torch.Tensor:
    """A channels-last value (B, ..., C) moved to (B, C, ...)."""
    return t.movedim(-1, 1)
