"""A stage boundary made of several conv layers (docs/transformers.md, "Stage boundaries through
several layers"): the conv downsampling blocks, inverted residuals and conv stages that efficient
hybrid transformers (EfficientViT-MSRA, SHViT, iFormer, EfficientViM, LowFormer, CPU-Bone) put between
the MLP blocks of two stages.

The map from the earlier stream into the later one is the sum over every path of layers between
them of the product of the layers' absolute kernels, composed as convolutions compose (tap ``q`` of a
later kernel after tap ``u`` of an earlier one lands on input offset ``q * stride + u``): the paper's
conv edge (``|kernel|``) followed along the path. Batch norms and per-channel norms scale the rows
by their weight-graph scale; activations, dropout, gates' data operands and spatial padding pass
unchanged; residual joins add the maps of their operands (aligned on their input offsets); branches
that end in a per-sample statistic (a squeeze-excitation's pooled gate) or that mix tokens
(attention) carry no path, as attention carries none in a stream. Anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import fx, nn

from modlens.nn._ops import UnsupportedModelError
from modlens.nn._pointwise import norm_scale
from modlens.nn._stream import _closure


@dataclass
class _Map:
    """Paths from the ``d`` stream channels to a value's ``c`` channels: ``kernel`` ``(c, d, kh, kw)``;
    output position ``p`` reads input positions ``p * stride + offset + tap``."""

    kernel: np.ndarray
    stride: tuple
    offset: tuple

    def rows(self, scale: np.ndarray) -> "_Map":
        return _Map(self.kernel * scale[:, None, None, None], self.stride, self.offset)


def _conv(m: _Map, w: np.ndarray, stride, padding, depthwise: bool) -> _Map:
    """``m`` followed by a conv of absolute kernel ``w`` (``(c_out, c_in or 1, a, b)``)."""
    sh, sw = m.stride
    a, b = w.shape[2:]
    kh, kw = m.kernel.shape[2:]
    out = np.zeros((w.shape[0], m.kernel.shape[1], (a - 1) * sh + kh, (b - 1) * sw + kw))
    for i in range(a):
        for j in range(b):
            if depthwise:
                part = m.kernel * w[:, 0, i, j][:, None, None, None]
            else:
                part = np.einsum("oc,cdhw->odhw", w[:, :, i, j], m.kernel)
            out[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += part
    offset = (m.offset[0] - padding[0] * sh, m.offset[1] - padding[1] * sw)
    return _Map(out, (stride[0] * sh, stride[1] * sw), offset)


def _add(maps: list) -> _Map | None:
    maps = [m for m in maps if m is not None]
    if not maps:
        return None
    if len({m.stride for m in maps}) != 1 or len({m.kernel.shape[:2] for m in maps}) != 1:
        return _Refuse
    lo = [min(m.offset[k] for m in maps) for k in (0, 1)]
    hi = [max(m.offset[k] + m.kernel.shape[2 + k] for m in maps) for k in (0, 1)]
    out = np.zeros(maps[0].kernel.shape[:2] + (hi[0] - lo[0], hi[1] - lo[1]))
    for m in maps:
        i, j = m.offset[0] - lo[0], m.offset[1] - lo[1]
        out[:, :, i:i + m.kernel.shape[2], j:j + m.kernel.shape[3]] += m.kernel
    return _Map(out, maps[0].stride, tuple(lo))


_Refuse = object()
_MOVED = object()   # channels moved out of dim 1 (into tokens, toward attention): followed until attention drops them
_TOKEN_MIXING = ("attention", "token_mix")
_MOVES = ("reshape", "permute", "flatten", "merge", "split")


def _dense(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's kernel ``(c_out, c_in / groups, a, b)`` as a dense ``(c_out, c_in, a, b)``."""
    if groups == 1:
        return w
    co, ci = w.shape[0] // groups, w.shape[1]
    out = np.zeros((w.shape[0], ci * groups) + w.shape[2:])
    for g in range(groups):
        out[g * co:(g + 1) * co, g * ci:(g + 1) * ci] = w[g * co:(g + 1) * co]
    return out


def _cat(parts: list, widths: list) -> _Map | None:
    """Maps concatenated along the channels (None: rows without a path)."""
    present = [m for m in parts if m is not None]
    if not present:
        return None
    d = present[0].kernel.shape[1]
    total, placed, start = sum(widths), [], 0
    for m, w in zip(parts, widths):
        if m is not None:
            k = np.zeros((total,) + m.kernel.shape[1:])
            k[start:start + w] = m.kernel
            placed.append(_Map(k, m.stride, m.offset))
        start += w
    return _add(placed) if all(m.kernel.shape[1] == d for m in present) else _Refuse


def paths_map(s, start: fx.Node, end: fx.Node, d_in: int, names: str):
    """(kernel ``(c_end, d_in, kh, kw)``, stride) of every layer path from ``start``'s output (the earlier
    stream, channels first) to ``end`` (the value the later stage's first MLP reads)."""
    region = _closure(start, lambda n: n.users) & _closure(end, lambda n: n.all_input_nodes)
    order = [n for n in s.gm.graph.nodes if n in region]
    maps: dict = {start: _Map(np.eye(d_in)[:, :, None, None], (1, 1), (0, 0))}
    # what the MLP's second map writes before it joins the stream (its own batch norm, a layer scale) is in
    # its W_out already: those steps pass the identity on
    node, written = start, set()
    while len(users := [u for u in node.users if u in region]) == 1 and s.kind(users[0]) != "join":
        node = users[0]
        written.add(node)

    def refuse(node, why):
        return UnsupportedModelError(
            f"{names} the stream passes through several layers, and {s.describe(node)} {why}; modlens follows conv "
            "layers (dense or depthwise), batch and per-channel norms, activations, gates, padding and residual "
            "joins over (batch, channels, height, width) maps between stages")

    for node in order[1:]:
        ins = [a for a in s.tensor_inputs(node) if a in maps]
        got = [maps[a] for a in ins if maps[a] is not None]
        if not got:
            maps[node] = None
            continue
        kind = s.kind(node)
        shape = s.shapes.get(node)
        mod = s.module(node) if node.op == "call_module" else None
        if node in written and len(got) == 1:
            maps[node] = got[0]
            continue
        if any(g is _MOVED for g in got):
            if kind in _TOKEN_MIXING:
                maps[node] = None
            elif kind in _MOVES + ("unary", "scale", "bn", "norm", "pad", "layer", "final") or (
                    node.op == "call_function" and "getitem" in str(node.target)):
                maps[node] = _MOVED
            elif kind in ("gate", "join") and all(g is _MOVED for g in got):
                # an element-wise product or sum of moved values (EfficientViM's state-space mixer: a softmax
                # over the tokens times the input-dependent B): still toward the token mixer, still no path
                maps[node] = _MOVED
            else:
                raise refuse(node, "reads channels moved out of the channel dimension (toward attention)")
            continue
        if kind in _MOVES or (node.op == "call_function" and "getitem" in str(node.target)):
            maps[node] = _MOVED
            continue
        spatial = s.shapes.get(ins[0]) if ins else None
        pooled = (kind == "unary" and shape is not None and spatial is not None and len(shape) == len(spatial) == 3
                  and tuple(shape[1:]) == (1, 1) != tuple(spatial[1:]))
        if kind in _TOKEN_MIXING or kind in ("mean", "stat") or pooled:
            maps[node] = None   # attention, or a pooled statistic (a squeeze-excitation's gate): no path
            continue
        if shape is None or len(shape) != 3:
            raise refuse(node, f"has shape {shape}")
        if kind == "layer":
            if not isinstance(mod, nn.Conv2d) or any(v != 1 for v in mod.dilation) or not isinstance(mod.padding, tuple):
                raise refuse(node, "is not a conv with explicit padding and no dilation")
            if ins[0] is not node.args[0]:
                raise refuse(node, "reads the path through another argument than its input")
            dw = mod.groups == mod.in_channels == mod.out_channels
            w = np.abs(mod.weight.detach().cpu().double().numpy())
            w = w if dw else _dense(w, mod.groups)
            maps[node] = _conv(got[0], w, tuple(mod.stride), tuple(mod.padding), dw)
        elif kind in ("bn", "norm") and mod is not None and shape[0] == got[0].kernel.shape[0]:
            maps[node] = got[0].rows(norm_scale(mod, shape[0]) if getattr(mod, "weight", None) is not None
                                     or isinstance(mod, nn.modules.batchnorm._BatchNorm) else np.ones(shape[0]))
        elif kind == "cat":
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim % 4 != 1:
                raise refuse(node, f"concatenates along dimension {dim}, not the channels")
            if any(maps.get(a) is _MOVED for a in tensors):
                raise refuse(node, "concatenates channels moved out of the channel dimension")
            maps[node] = _cat([maps.get(a) for a in tensors], [s.shapes[a][0] for a in tensors])
            if maps[node] is _Refuse:
                raise refuse(node, "concatenates paths of different strides")
        elif kind in ("unary", "scale", "pad", "gate", "join"):
            if kind in ("unary", "scale") and spatial is not None and spatial[1:] != shape[1:]:
                raise refuse(node, f"changes the map's size from {spatial[1:]} to {shape[1:]}")
            if kind == "pad":
                pad = node.args[1] if len(node.args) > 1 else getattr(mod, "padding", None)
                if not isinstance(pad, (list, tuple)) or len(pad) != 4:
                    raise refuse(node, "pads other than the two spatial dimensions")
                m = got[0]
                maps[node] = _Map(m.kernel, m.stride, (m.offset[0] - pad[2] * m.stride[0],
                                                       m.offset[1] - pad[0] * m.stride[1]))
                continue
            summed = _add(got) if kind == "join" else got[0] if len(got) == 1 else _add(got)
            if summed is _Refuse:
                raise refuse(node, "joins paths of different strides or widths")
            maps[node] = summed
        else:
            raise refuse(node, f"is a '{kind}' operation")
        if maps[node] is not None and maps[node].kernel.shape[0] != shape[0]:
            raise refuse(node, f"has {shape[0]} channels where its path has {maps[node].kernel.shape[0]}")
    m = maps.get(end)
    if m is None or m is _MOVED:
        raise refuse(end, "is reached by no layer path from the earlier stream")
    return m.kernel, m.stride
