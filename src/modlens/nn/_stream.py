"""Walking a transformer's residual stream in a captured graph: the helpers that the MLP finder
(:mod:`modlens.nn._transformer`) and the stage maps (:mod:`modlens.nn._stage_maps`) share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from modlens.nn._decoder_ops import WrittenNorm
from modlens.nn._pointwise import BATCH_NORMS, norm_scale, norm_width, width_out


@dataclass(frozen=True)
class MLPNeurons:
    """One block's MLP: ``node`` (first or gate map), ``up`` (value map of a GLU, else None),
    ``down`` (second map) and ``value`` (what ``down`` reads); for a Mix-FFN (PVT-v2, SegFormer),
    ``dwconv`` (the depthwise conv over the token grid between ``node`` and the activation, or after it
    in a conv MLP) and ``pre`` (the first activation's input, the units' pre-activation, when a depthwise
    conv or a batch norm read through reshapes comes first), else None. ``node`` and ``down`` are
    Linears over tokens or 1x1 convs over a (B, C, H, W) map (:mod:`modlens.nn._pointwise`). For a fused
    gated MLP ``node``
    computes both halves: ``halves`` = (first row of the gate half, first row of the value half) of its
    weight, ``width`` the number of neurons, and ``pre`` the gate half's activation input."""

    node: fx.Node
    up: fx.Node | None
    down: fx.Node
    value: fx.Node
    dwconv: fx.Node | None = None
    pre: fx.Node | None = None
    halves: tuple[int, int] | None = None
    width: int | None = None

    def n_units(self, s) -> int:
        return self.width if self.width is not None else width_out(s.module(self.node))


_LAYER_NORMS = (nn.LayerNorm, nn.RMSNorm, WrittenNorm)   # per-sample norms
_NORMS = _LAYER_NORMS + BATCH_NORMS                        # and batch norms (a ConvNorm MLP's, a stage's)


def _users(s, node: fx.Node) -> list[fx.Node]:
    """The users that read ``node``'s values (not only its shape: ``y.reshape_as(node)``)."""
    return [u for u in node.users if u in s.live and s.kind(u) != "shape" and not s._shape_only(u, node)]


def _is_activation(s, node: fx.Node) -> bool:
    from modlens.nn._registry import ACTIVATIONS, is_activation_module

    if node.op == "call_module":
        return is_activation_module(s.module(node))
    return node.target in ACTIVATIONS.functions or node.target in ACTIVATIONS.methods


_MOVES = ("permute", "reshape", "merge", "flatten")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _gamma(norm, d_model: int):
    return None if norm is None else norm_scale(norm, d_model)


def _first_after(s, node: fx.Node, found, passes):
    """The first node after ``node``, following single users, for which ``found`` holds, while every node
    before it ``passes``; None when the walk branches or meets anything else."""
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return None
        node = users[0]
        if found(node):
            return node
        if not passes(node):
            return None


def _norm_after(s, node: fx.Node, width: int, norms: tuple = _NORMS):
    """The scale of a norm (one of ``norms``) that ``node``'s output passes through alone (one user at
    every step, no join) before anything else reads it: a patch embedding's or a downsample's norm, a
    post-norm block's norm on its MLP output (Swin-V2), a ConvNorm's batch norm; None when there is none."""
    norm = _first_after(s, node, lambda n: n.op == "call_module" and isinstance(s.module(n), norms),
                        lambda n: s.kind(n) in _MOVES + ("unary",) and len(s.tensor_inputs(n)) == 1
                        and not _is_activation(s, n))
    if norm is None or norm_width(s, norm) != width:
        return None
    return _gamma(s.module(norm), width)


def _passing(s, node: fx.Node) -> bool:
    """Identity in eval: dropout, copies, contiguous (registry's PASSING)."""
    from modlens.nn._registry import PASSING

    if node.op == "call_module":
        return isinstance(s.module(node), PASSING.modules)
    if node.op == "call_method":
        return node.target in PASSING.methods
    return node.target in PASSING.functions


def _closure(node: fx.Node, step) -> set:
    seen, todo = {node}, [node]
    while todo:
        for n in step(todo.pop()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen
