"""Stream maps made of several layers or of depthwise convs (docs/transformers.md, "Stage boundaries
through several layers"): the linear map a chain of convs applies to the residual stream.

* a **depthwise conv of stride 1** on the stream (TinyViT's local conv between attention and MLP,
  EdgeNeXt's conv before each MLP) is its per-channel gain ``||k_c||_1``, the paper's conv edge of a
  depthwise layer: one tap, so that composing it over every block does not grow the composed kernel;
* every other conv (1x1, strided depthwise, dense) is its kernel, groups expanded to a dense
  ``(out, in, kh, kw)`` weight, and a Linear over the channels is a 1x1 conv;
* a BatchNorm right after a layer scales its output rows by ``gamma / sqrt(var + eps)``;
* a chain of such maps (TinyViT's downsampling: 1x1 conv, 3x3 depthwise conv of stride 2, 1x1 conv,
  with activations between them) composes as convolutions compose; the activations between the links
  are taken as the identity, as the weight graph leaves out every nonlinearity on a stream path.
"""

from __future__ import annotations

import numpy as np
from torch import fx, nn

from modlens.core.residual_graph import StageMap
from modlens.nn._ops import UnsupportedModelError
from modlens.nn._stream import _MOVES, _np, _users

MAX_LINKS = 8


def depthwise_stride1(mod) -> bool:
    return (isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels
            and tuple(mod.stride) == (1, 1))


def bn_after(s, node: fx.Node):
    """``gamma / sqrt(var + eps)`` of a BatchNorm that ``node``'s output passes through alone (through
    reshapes), else None."""
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return None
        node = users[0]
        if s.kind(node) == "bn" and node.op == "call_module":
            bn = s.module(node)
            scale = 1.0 / np.sqrt(_np(bn.running_var) + bn.eps)
            return scale * (_np(bn.weight) if bn.weight is not None else 1.0)
        if s.kind(node) not in _MOVES:
            return None


def l1_gain(s, conv: fx.Node) -> np.ndarray:
    """A stride-1 depthwise conv's per-channel gain: the L1 norm of its filter, times the BatchNorm after it."""
    mod = s.module(conv)
    gain = np.abs(_np(mod.weight)).reshape(mod.out_channels, -1).sum(1)
    bn = bn_after(s, conv)
    return gain if bn is None else gain * np.abs(bn)


def layer_map(s, layer: fx.Node, names: str) -> StageMap:
    """The stream map of one layer (module docstring), BatchNorm after it folded in."""
    mod = s.module(layer)
    if depthwise_stride1(mod):
        return StageMap(np.diag(l1_gain(s, layer))[:, :, None, None], (1, 1))
    if isinstance(mod, nn.Conv2d):
        w = _np(mod.weight)
        g, cin = mod.groups, mod.in_channels // mod.groups
        dense = np.zeros((mod.out_channels, mod.in_channels, *w.shape[2:]))
        per = mod.out_channels // g
        for k in range(g):
            dense[k * per:(k + 1) * per, k * cin:(k + 1) * cin] = w[k * per:(k + 1) * per]
        kernel, stride = dense, tuple(int(v) for v in mod.stride)
    elif isinstance(mod, nn.Linear):
        kernel, stride = _np(mod.weight)[:, :, None, None], (1, 1)
    else:
        raise UnsupportedModelError(f"{names} the stream passes through '{layer.target}' ({type(mod).__name__}); "
                                    "modlens composes Conv2d and Linear layers there")
    bn = bn_after(s, layer)
    return StageMap(kernel if bn is None else kernel * bn[:, None, None, None], stride)


def compose(maps: list[StageMap]) -> StageMap:
    """One map equal to applying ``maps`` in order, composed as convolutions (taps that land on the same
    input offset add)."""
    kernel, stride = maps[0].kernel, tuple(maps[0].stride)
    for m in maps[1:]:
        k = m.kernel
        span = ((k.shape[2] - 1) * stride[0] + kernel.shape[2], (k.shape[3] - 1) * stride[1] + kernel.shape[3])
        out = np.zeros((k.shape[0], kernel.shape[1], *span))
        for qy in range(k.shape[2]):
            for qx in range(k.shape[3]):
                oy, ox = qy * stride[0], qx * stride[1]
                out[:, :, oy:oy + kernel.shape[2], ox:ox + kernel.shape[3]] += np.einsum(
                    "om,miyx->oiyx", k[:, :, qy, qx], kernel)
        kernel, stride = out, (stride[0] * m.stride[0], stride[1] * m.stride[1])
    return StageMap(kernel, stride)


def find_chain(s, start: fx.Node, target: fx.Node, stream_layers) -> list | None:
    """The layers the stream passes through in a row from ``start``'s output to ``target`` (each reached
    from the previous one through the stream, only one of them leading on to ``target``), or None."""
    def leads(layer, depth):
        nxt = stream_layers(s, layer)
        return target in nxt or (depth > 0 and any(leads(l, depth - 1) for l in nxt if l is not target))

    chain, cur = [], start
    for depth in range(MAX_LINKS, 0, -1):
        nxt = stream_layers(s, cur)
        if target in nxt:
            return chain
        on = [l for l in nxt if leads(l, depth - 1)]
        if len(on) != 1:
            return None
        chain.append(on[0])
        cur = on[0]
    return None
