"""Transformer MLP neurons (docs/transformers.md): which layers hold them and the residual weights.

In a model with attention (a product of two activations: ``scaled_dot_product_attention``,
``matmul``/``bmm`` of queries and keys), the neuron layers are the hidden units of each
block's MLP only, the units between its two linear maps:

* plain MLP: ``down(act(up(x)))``: the neurons are ``up``'s output units (pre-activation: the
  input of ``act``), read by ``down``;
* gated MLP (GLU, SwiGLU): ``down(act(gate(x)) * up(x))``: gate unit ``b`` and value unit ``b``
  are one neuron; the layer is named after the gate map (the branch through the activation
  function), its pre-activation is the gate's output, and a lesion zeroes the product.

Queries, keys, values, attention output projections, the patch/token embedding and a pooler
are not neuron layers: they mix tokens or write the residual stream. A lesion of an MLP
neuron zeroes its columns in ``down`` (every token position) and everything after ``down`` is
recomputed, attention included, so lesions stay exact.

:func:`residual_parts` reads the matrices of :func:`modlens.core.residual_graph.residual_weight_graph`
from the captured model: per block ``W_in`` (value map), ``W_gate``, ``W_out`` (``down``) and
``gamma`` (the affine scale of the LayerNorm/RMSNorm that the block's MLP reads, ones when it
has none, ``None`` when no norm precedes it); the embedding (a Linear or a patch conv reading
the input, reshaped to ``d_model x inputs``, or the token embedding transposed) and the head
(the output layer, times any dense Linear between it and the stream, e.g. a pooler, with its
nonlinearity left out) with the final norm's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from modlens.core.residual_graph import MLPBlockWeights, StageMap
from modlens.nn._decoder_ops import WrittenNorm
from modlens.nn._ops import Sink, UnsupportedModelError
from modlens.nn._pointwise import BATCH_NORMS, depthwise_rows, is_map, matrix, norm_scale, norm_width, width_out
from modlens.nn._stage_paths import paths_map

aten = torch.ops.aten
_NORMS = (nn.LayerNorm, nn.RMSNorm, WrittenNorm) + BATCH_NORMS


@dataclass(frozen=True)
class MLPNeurons:
    """One block's MLP: ``node`` (first or gate map), ``up`` (value map of a GLU, else None),
    ``down`` (second map) and ``value`` (what ``down`` reads); for a Mix-FFN (PVT-v2, SegFormer),
    ``dwconv`` (the depthwise conv over the token grid between ``node`` and the activation, or after it
    in a conv MLP) and ``pre`` (the first activation's input, the units' pre-activation, when a depthwise
    conv or a batch norm read through reshapes comes first), else None. ``node`` and ``down`` are
    Linears over tokens or 1x1 convs over a (B, C, H, W) map (:mod:`modlens.nn._pointwise`)."""

    node: fx.Node
    up: fx.Node | None
    down: fx.Node
    value: fx.Node
    dwconv: fx.Node | None = None
    pre: fx.Node | None = None


def _users(s, node: fx.Node) -> list[fx.Node]:
    """The users that read ``node``'s values (not only its shape: ``y.reshape_as(node)``)."""
    return [u for u in node.users if u in s.live and s.kind(u) != "shape" and not s._shape_only(u, node)]


def _is_activation(s, node: fx.Node) -> bool:
    from modlens.nn._registry import ACTIVATIONS, is_activation_module

    if node.op == "call_module":
        return is_activation_module(s.module(node))
    return node.target in ACTIVATIONS.functions or node.target in ACTIVATIONS.methods


_MOVES = ("permute", "reshape", "merge", "flatten")


def _depthwise(s, node: fx.Node, width: int) -> bool:
    """Whether ``node`` is a depthwise conv over ``width`` channels (one filter per channel)."""
    mod = s.module(node) if node.op == "call_module" else None
    return (isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == mod.in_channels == mod.out_channels == width
            and all(v == 1 for v in mod.stride))


def _forward(s, layer: fx.Node):
    """(value entering the next layer, that layer, activation seen, gate product or None, depthwise conv
    or None, activation input or None), or None when ``layer``'s output does not go through element-wise
    ops (and at most one product) into exactly one layer. A Mix-FFN's depthwise conv over the token grid
    (with the reshapes and transposes around it) may come before the activation; a conv MLP's depthwise
    conv may come after it. Batch norms pass (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``: reshapes
    around a batch norm that end in the layer's own layout)."""
    node, acted, gate, dw, pre, moved, normed = layer, False, None, None, None, False, False
    width = width_out(s.module(layer))
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return None
        u = users[0]
        kind = s.kind(u)
        if kind == "layer" and dw is None and gate is None and _depthwise(s, u, width):
            dw = u
        elif kind == "layer":
            if moved and dw is None and not (normed and s.shapes.get(node) == s.shapes.get(layer)):
                return None
            return (node, u, acted, gate, dw, pre) if u.args[0] is node else None
        elif kind == "bn" and gate is None:
            normed = True
        elif kind == "unary" and s.tensor_inputs(u) == [node]:
            if _is_activation(s, u) and not acted:
                pre = node
            acted = acted or _is_activation(s, u)
        elif kind == "gate" and gate is None:
            gate = u
        elif kind in _MOVES and not acted and gate is None:
            moved = True
        else:
            return None
        node = u


def _backward_branch(s, product: fx.Node, other_than: fx.Node):
    """(layer, activation seen) feeding the other operand of a gate product, through unary ops."""
    ins = s.tensor_inputs(product)
    if len(ins) != 2:
        return None
    node = next((a for a in ins if a is not other_than), None)
    acted = False
    while node is not None and s.kind(node) != "layer":
        if s.kind(node) != "unary" or len(s.tensor_inputs(node)) != 1 or len(_users(s, node)) != 1:
            return None
        acted = acted or _is_activation(s, node)
        node = s.tensor_inputs(node)[0]
    return None if node is None else (node, acted)


def _branch_input(s, product: fx.Node, layer: fx.Node) -> fx.Node:
    """The operand of ``product`` that comes from ``layer``."""
    return next(a for a in s.tensor_inputs(product) if layer in _chain_to(s, a))


def _chain_to(s, node: fx.Node) -> set:
    seen = {node}
    while s.kind(node) == "unary" and s.tensor_inputs(node):
        node = s.tensor_inputs(node)[0]
        seen.add(node)
    return seen


def find_mlps(s) -> list[MLPNeurons]:
    """The MLP neuron layers of a captured model with attention, in forward order."""
    out = []
    for layer in s.all_nodes:
        if layer in s.output_layers or not is_map(s.module(layer)) or (s.ndim(layer) or 2) < 3:
            continue
        hit = _forward(s, layer)
        if hit is None:
            continue
        value, down, acted, product, dw, pre = hit
        if down in s.output_layers or not is_map(s.module(down)) or type(s.module(down)) is not type(s.module(layer)):
            continue
        if _gates(s, down):
            continue  # a squeeze-excitation's maps: they compute a per-channel gate, not a block's output
        if dw is not None and (product is not None or not acted or s.ndim(pre) != s.ndim(layer)
                               or s.shapes.get(pre) != s.shapes.get(layer)):
            continue  # the activation reads the units back in the layer's layout (Mix-FFN, conv MLP)
        up = None
        if product is not None:
            other = _backward_branch(s, product, _branch_input(s, product, layer))
            if other is None or other[0].args[0] is not layer.args[0]:
                continue
            up, up_acted = other
            if up_acted and not acted:
                continue  # this is the value map; the gate map (through the activation) names the neuron
            if up_acted == acted and s.all_nodes.index(up) < s.all_nodes.index(layer):
                continue  # symmetric gate: the earlier map names the pair
            if width_out(s.module(up)) != width_out(s.module(layer)):
                continue
        elif not acted:
            continue
        keep_pre = dw is not None or (pre is not None and s.preactivation_node(layer) is not pre)
        out.append(MLPNeurons(layer, up, down, value, dw, pre if keep_pre else None))
    if not out:
        mixing, note = "attention", ""
        if s.token_mixers:
            mixing = f"token-mixing layers ({', '.join(sorted(n.target for n in s.token_mixers)[:2])}, ...)"
            note = " (a gMLP's spatial gating unit, u * proj(v^T)^T, is not one yet)"
        raise UnsupportedModelError(
            f"the model has {mixing} but no transformer MLP (Linear or 1x1 conv -> activation -> Linear or 1x1 "
            f"conv, batch norms allowed after each map, a gated GLU/SwiGLU MLP, or one with a depthwise conv "
            f"between its maps as in a Mix-FFN); modlens analyses the MLP neurons of transformer blocks{note}"
        )
    return out


def _gates(s, down: fx.Node) -> bool:
    """Whether ``down``'s output, through element-wise ops, multiplies another value (a gate)."""
    node = down
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return False
        node = users[0]
        if s.kind(node) == "gate":
            return True
        if s.kind(node) not in ("unary", "bn") + _MOVES:
            return False


def bn_after(s, layer: fx.Node):
    """The weight-graph scale of a batch norm that directly follows ``layer`` (through reshapes: LeViT
    normalizes ``x.flatten(0, 1)``), else None."""
    node = layer
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return None
        node = users[0]
        if s.kind(node) == "bn":
            return norm_scale(s.module(node), norm_width(s, node))
        if s.kind(node) not in _MOVES and not _passing(s, node):
            return None


def mlp_sink(s, m: MLPNeurons) -> Sink:
    """The lesion sink of an MLP layer: its ``down`` map's input, at every token position."""
    return Sink("layer", m.value, m.down, s.layer_route(m.node))


# ----- residual-stream weights -------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _back_to_norm(s, node: fx.Node):
    """(norm module or None, node where the backward walk stopped) through one-input ops."""
    while True:
        if node.op == "call_module" and isinstance(s.module(node), _NORMS):
            return s.module(node), node
        ins = s.tensor_inputs(node)
        if s.kind(node) in ("layer", "input") or len(ins) != 1:
            return None, node
        node = ins[0]


def _gamma(norm, d_model: int):
    return None if norm is None else norm_scale(norm, d_model)


def _embedding(s, d_model: int):
    # layers reading the input (not constants: Swin-V2's position-bias MLP reads a fixed table)
    first = [n for n in s.first_layers() if n not in s.output_layers and n in s.dynamic]
    mods = [s.module(n) for n in first]
    gamma = _norm_after(s, first[0], d_model) if len(first) == 1 else None   # a norm on the patch embedding
    rows = 1.0 if gamma is None else gamma[:, None]
    if len(first) == 1 and isinstance(mods[0], nn.Linear) and mods[0].out_features == d_model:
        return _np(mods[0].weight) * rows
    if len(first) == 1 and isinstance(mods[0], nn.Conv2d) and mods[0].out_channels == d_model:
        return _np(mods[0].weight).reshape(d_model, -1) * rows
    lookups = [n for n in s.gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default
               and _from_input(s, n.args[1]) and n.args[0].op == "get_attr"]
    if len(lookups) == 1:
        w = s.gm
        for part in lookups[0].args[0].target.split("."):
            w = getattr(w, part)
        if w.shape[1] == d_model:
            return _np(w).T * _lookup_scale(s, lookups[0])
    return None


_INDEX_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.alias.default}


def _from_input(s, node) -> bool:
    """Whether ``node`` is the model input, or the input through views and copies (GPT-2 views the
    ids before the lookup)."""
    while isinstance(node, fx.Node) and node is not s.input:
        if node.op != "call_function" or node.target not in _INDEX_VIEWS:
            return False
        node = node.args[0]
    return node is s.input


def _lookup_scale(s, lookup: fx.Node) -> float:
    """A constant factor the looked-up embeddings are multiplied by before anything else (Gemma's
    ``sqrt(d_model)``), else 1."""
    from modlens.nn._fx import extract

    users = [u for u in lookup.users if u in s.live]
    if len(users) != 1 or users[0].op != "call_function" or users[0].target is not aten.mul.Tensor:
        return 1.0
    other = [a for a in users[0].args[:2] if a is not lookup]
    if len(other) != 1:
        return 1.0
    if isinstance(other[0], (int, float)):
        return float(other[0])
    if isinstance(other[0], fx.Node) and other[0] not in s.dynamic:
        with torch.no_grad():
            value = extract(s.gm, [], [other[0]])()
        if value.numel() == 1:
            return float(value.reshape(()))
    return 1.0


def _head(s, d_model: int):
    """(head matrix n_classes x d_model, final gamma) or (None, None); several heads whose scores are
    added or averaged (a distilled model's class and distillation heads) are summed."""
    total, gamma = None, None
    for layer in s.output_layers:
        h, g = _one_head(s, layer, d_model)
        if h is None or (total is not None and h.shape != total.shape):
            return None, None
        total, gamma = (h, g) if total is None else (total + h, gamma)
    return total, gamma


def _one_head(s, layer, d_model: int):
    out = s.module(layer)
    if not isinstance(out, nn.Linear):
        return None, None
    h = _np(out.weight)
    node = layer.args[0]
    while True:
        norm, stop = _back_to_norm(s, node)
        if norm is not None or s.kind(stop) != "layer" or not isinstance(s.module(stop), nn.Linear):
            break
        h = h @ _np(s.module(stop).weight)  # a dense map between the stream and the head (pooler)
        node = stop.args[0]
    if h.shape[1] != d_model:
        return None, None
    return h, _gamma(norm, d_model)


def _norm_after(s, node: fx.Node, width: int):
    """The scale of a norm that ``node``'s output passes through alone (one user at every step, no
    join) before anything else reads it: a patch embedding's or a downsample's norm, a post-norm
    block's norm on its MLP output (Swin-V2); None when there is none."""
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return None
        node = users[0]
        if node.op == "call_module" and isinstance(s.module(node), _NORMS):
            return _gamma(s.module(node), width) if norm_width(s, node) == width else None
        if s.kind(node) not in _MOVES + ("unary",) or len(s.tensor_inputs(node)) != 1 or _is_activation(s, node):
            return None


def _stream_layers(s, start: fx.Node) -> set:
    """The layers that read ``start``'s output through the residual stream: a forward walk through
    everything but layers and attention products (joins, norms, reshapes, token permutations...)."""
    seen, todo, layers = {start}, [start], set()
    while todo:
        for u in _users(s, todo.pop()):
            if u in seen:
                continue
            seen.add(u)
            kind = s.kind(u)
            if kind == "layer":
                layers.add(u)
            elif kind not in ("attention", "token_mix", "output"):
                todo.append(u)
    return layers


def _transition(s, before: MLPNeurons, after: MLPNeurons, d_in: int, d_out: int) -> StageMap:
    """The map from the stream that ``before`` writes (width ``d_in``) into the stream that ``after``
    reads (width ``d_out``): one downsampling layer between them (docs/transformers.md)."""
    names = f"between the MLPs '{before.node.target}' (stream width {d_in}) and '{after.node.target}' ({d_out})"
    reached = _stream_layers(s, before.down)
    found = [l for l in reached if after.node in _stream_layers(s, l)]
    try:
        return _one_layer_transition(s, before, after, d_in, d_out, names, reached, found)
    except UnsupportedModelError:
        # a change of width between channels-first streams: the layer paths between them (a stream of one
        # width with conv mixers inside stays one stream, as below)
        if d_in == d_out or not (_channels_first(s, before.down) and _channels_first(s, after.node)):
            raise
    # several layers: every conv path between the streams
    kernel, stride = paths_map(s, before.down, after.node.args[0], d_in, names)
    return StageMap(kernel, stride)


def _one_layer_transition(s, before, after, d_in, d_out, names, reached, found) -> StageMap:
    if len(found) != 1:
        what = (f"{len(found)} layers that both reach it ({', '.join(sorted(str(l.target) for l in found))})" if found
                else f"no single layer (it reaches {', '.join(sorted(str(l.target) for l in reached)) or 'no layer'} "
                     f"first, and '{after.node.target}' only further on)")
        raise UnsupportedModelError(
            f"{names} the residual stream passes through {what}; modlens joins the stages of a hierarchical "
            "transformer through one downsampling layer (a patch merging Linear or a strided conv), with only "
            "reshapes, permutes, slices and norms around it"
        )
    (down,) = found
    mod = s.module(down)
    gamma_out = _norm_after(s, down, d_out)
    gamma_out = np.ones(d_out) if gamma_out is None else gamma_out
    # the data movements between the stream and the downsampling layer, and the norm among them
    region = _ancestors_until(s, down.args[0], before.down)
    norms = [n for n in region if n.op == "call_module" and isinstance(s.module(n), _NORMS)]
    pools = [n for n in region if _avg_pool(s, n) is not None]
    bad = [n for n in region if n not in norms + pools and (s.kind(n) not in _MOVES + ("split", "cat", "pad")
                                                             and not _passing(s, n))]
    if bad or len(norms) > 1 or len(pools) > 1:
        raise UnsupportedModelError(
            f"{names} the downsampling layer '{down.target}' reads the stream through "
            f"{s.describe((bad or norms[1:] or pools[1:])[0])}; modlens follows reshapes, permutes, slices, "
            "concatenations, padding, one norm and one non-overlapping average pool there"
        )
    pool = _avg_pool(s, pools[0]) if pools else None
    width_in = mod.in_features if isinstance(mod, nn.Linear) else getattr(mod, "in_channels", None)
    n_width = norm_width(s, norms[0]) if norms else None
    gamma_in = np.ones(width_in or 1) if not norms else _gamma(s.module(norms[0]), n_width)
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1 or mod.in_channels != d_in or mod.out_channels != d_out or n_width not in (None, d_in):
            raise UnsupportedModelError(
                f"{names} the downsampling conv '{down.target}' maps {mod.in_channels} to {mod.out_channels} channels "
                f"in {mod.groups} groups (norm width {n_width}); modlens needs a dense conv from {d_in} to {d_out}")
        kernel = _np(mod.weight) * gamma_in[None, :, None, None] * gamma_out[:, None, None, None]
        stride = tuple(int(v) for v in mod.stride)
        if pool is not None:  # pool(k) then a 1x1 conv (MaxViT's shortcut): one k x k kernel of stride k, taps / k^2
            if kernel.shape[2:] != (1, 1) or stride != (1, 1):
                raise UnsupportedModelError(f"{names} an average pool comes before the conv '{down.target}' "
                                            f"(kernel {kernel.shape[2:]}, stride {stride}); modlens follows a pool "
                                            "before a 1x1 conv of stride 1 only")
            kernel = np.tile(kernel, (1, 1, *pool)) / (pool[0] * pool[1])
            stride = pool
        return StageMap(kernel, stride)
    if pool is not None:
        raise UnsupportedModelError(f"{names} an average pool comes before '{down.target}' ({type(mod).__name__}); "
                                    "modlens follows a pool before a 1x1 conv only")
    if isinstance(mod, nn.Linear) and mod.out_features == d_out and mod.in_features % d_in == 0:
        n = mod.in_features // d_in
        _check_channel_blocks(s, region, before.down, d_in, names, down)
        if n_width == d_in:
            gamma_in = np.tile(gamma_in, n)
        elif n_width not in (None, mod.in_features):
            raise UnsupportedModelError(f"{names} the norm {s.describe(norms[0])} before '{down.target}' has width "
                                        f"{n_width}; expected {d_in} or {mod.in_features}")
        w = _np(mod.weight) * gamma_in[None, :] * gamma_out[:, None]
        # the column blocks are the taps: stream channel c of neighbour k reaches the Linear as column k * d_in + c
        kernel = w.reshape(d_out, n, d_in).transpose(0, 2, 1)[:, :, None, :]
        return StageMap(kernel, (1, n))
    raise UnsupportedModelError(
        f"{names} the stream passes through '{down.target}' ({type(mod).__name__}); modlens joins stages through a "
        f"Linear from {d_in} * k to {d_out} features (patch merging over k neighbours) or a Conv2d from {d_in} to "
        f"{d_out} channels"
    )


def _channels_first(s, layer: fx.Node) -> bool:
    """Whether a layer's output is a (B, C, H, W) map (a conv), not tokens."""
    return isinstance(s.module(layer), nn.Conv2d) and s.ndim(layer) == 4


def _passing(s, node: fx.Node) -> bool:
    """Identity in eval: dropout, copies, contiguous (registry's PASSING)."""
    from modlens.nn._registry import PASSING

    if node.op == "call_module":
        return isinstance(s.module(node), PASSING.modules)
    if node.op == "call_method":
        return node.target in PASSING.methods
    return node.target in PASSING.functions


def _avg_pool(s, node: fx.Node):
    """(kh, kw) of a non-overlapping, unpadded 2-D average pool, else None."""
    if node.op == "call_module" and isinstance(s.module(node), nn.AvgPool2d):
        m = s.module(node)
        k, st, pad = m.kernel_size, m.stride, m.padding
    elif node.op == "call_function" and node.target in (torch.ops.aten.avg_pool2d.default, nn.functional.avg_pool2d):
        args = list(node.args) + [None] * 4
        k = node.kwargs.get("kernel_size", args[1])
        st = node.kwargs.get("stride", args[2]) or k
        pad = node.kwargs.get("padding", args[3] if args[3] is not None else 0)
    else:
        return None
    pair = lambda v: (tuple(v) * 2)[:2] if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    k, st, pad = pair(k), pair(st), pair(pad)
    return tuple(int(v) for v in k) if k == st and pad == (0, 0) else None


def _ancestors_until(s, node: fx.Node, stop: fx.Node) -> list:
    """The nodes between ``stop`` (excluded) and ``node`` (included) on paths from one to the other,
    after the last join (the residual addition that ends the stage's stream)."""
    between = _closure(node, lambda n: n.all_input_nodes) & _closure(stop, lambda n: n.users)
    between.discard(stop)
    joins = [n for n in between if s.kind(n) == "join"]
    order = {n: i for i, n in enumerate(s.gm.graph.nodes)}
    if joins:
        last = max(joins, key=order.__getitem__)
        between = (_closure(last, lambda n: n.users) & between) - {last}
    return sorted(between, key=order.__getitem__)


def _closure(node: fx.Node, step) -> set:
    seen, todo = {node}, [node]
    while todo:
        for n in step(todo.pop()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def _check_channel_blocks(s, region, stop, d_in: int, names: str, down) -> None:
    """A patch merging Linear must read whole copies of the stream's channels, in their order, side by
    side on the last dimension: every value between the stream and the Linear keeps the channels
    innermost (its last dimension a multiple of ``d_in``, permutes keeping the last dimension last,
    concatenations along it)."""
    for n in region:
        shape = s.shapes.get(n)
        nd = s.ndim(n)
        ok = shape is not None and isinstance(shape[-1], int) and shape[-1] % d_in == 0
        name = str(n.target)
        if ok and "permute" in name:
            perm = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            ok = all(isinstance(p, int) for p in perm) and perm[-1] % nd == nd - 1
        elif ok and "transpose" in name:
            ok = all(isinstance(a, int) for a in n.args[1:3]) and nd - 1 not in {a % nd for a in n.args[1:3]}
        elif ok and s.kind(n) == "cat":
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            ok = isinstance(dim, int) and dim % nd == nd - 1
        elif ok and s.kind(n) == "split":
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            ok = isinstance(dim, int) and dim % nd != nd - 1
        if not ok:
            raise UnsupportedModelError(
                f"{names} {s.describe(n)} (shape {shape}) moves the stream's channels before the patch merging "
                f"Linear '{down.target}'; modlens needs the {d_in} channels kept innermost (x.reshape(B, H/2, 2, W/2, "
                "2, C).permute(0, 1, 3, 4, 2, 5).flatten(3), or a concatenation of strided slices on the last dim)"
            )


def residual_parts(s, mlps: list[MLPNeurons]) -> dict:
    """Keyword arguments of :func:`~modlens.core.residual_graph.residual_weight_graph`; a hierarchical
    model's blocks carry their stage and ``transitions`` the maps between stages."""
    blocks, transitions, stage = [], [], 0
    for k, m in enumerate(mlps):
        down = s.module(m.down)
        d_model = width_out(down)
        d_prev = blocks[-1].w_out.shape[0] if k else d_model
        if k and (d_model != d_prev or m.node not in _stream_layers(s, mlps[k - 1].down)):
            try:
                transitions.append(_transition(s, mlps[k - 1], m, d_prev, d_model))
                stage += 1
            except UnsupportedModelError:
                # streams of one width with no single downsampling layer between them (an encoder's and a
                # decoder's) stay one stream, as before stages existed; a change of width must be explained
                if d_model != d_prev:
                    raise
        norm, _ = _back_to_norm(s, m.node.args[0])
        first = s.module(m.node)
        w_out = matrix(down)
        post = _norm_after(s, m.down, d_model)   # a post-norm block (Swin-V2), a ConvNorm's BN: scales what it writes
        if post is not None:
            w_out = w_out * post[:, None]
        rows = np.ones(width_out(first))
        hidden_bn = bn_after(s, m.node)   # ConvNorm / LinearNorm: the batch norm on the units
        if hidden_bn is not None:
            rows = rows * hidden_bn
        if m.dwconv is not None:  # Mix-FFN, conv MLP: each unit reads its neighbourhood through its own filter
            rows = rows * depthwise_rows(s.module(m.dwconv), width_out(first), bn_after(s, m.dwconv))
        if m.up is None:
            blocks.append(MLPBlockWeights(matrix(first) * rows[:, None], w_out, _gamma(norm, d_model), stage=stage))
        else:
            up_bn = bn_after(s, m.up)
            w_up = matrix(s.module(m.up)) * (1.0 if up_bn is None else up_bn[:, None])
            blocks.append(MLPBlockWeights(w_up, w_out, _gamma(norm, d_model),
                                          w_gate=matrix(first) * rows[:, None], stage=stage))
    for m, b in zip(mlps, blocks):
        if b.w_in.shape[1] != b.w_out.shape[0]:
            raise UnsupportedModelError(
                f"the MLP '{m.node.target}' reads a stream of width {b.w_in.shape[1]} but its second map "
                f"'{m.down.target}' writes width {b.w_out.shape[0]}; modlens needs each block's MLP to read and write "
                "one residual stream (put a width change between blocks, as a downsampling layer)")
    d_first, d_last = blocks[0].w_out.shape[0], blocks[-1].w_out.shape[0]
    head, final_gamma = _head(s, d_last)
    return {"blocks": blocks, "embedding": _embedding(s, d_first), "head": head, "final_gamma": final_gamma,
            "transitions": transitions}
