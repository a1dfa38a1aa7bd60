"""Transformer MLP neurons (docs/transformers.md): which layers hold them and the residual weights.

In a model with attention (a product of two activations: ``scaled_dot_product_attention``,
``matmul``/``bmm`` of queries and keys), the neuron layers are the hidden units of each
block's MLP only, the units between its two linear maps:

* plain MLP: ``down(act(up(x)))``: the neurons are ``up``'s output units (pre-activation: the
  input of ``act``), read by ``down``;
* gated MLP (GLU, SwiGLU): ``down(act(gate(x)) * up(x))``: gate unit ``b`` and value unit ``b``
  are one neuron; the layer is named after the gate map (the branch through the activation
  function), its pre-activation is the gate's output, and a lesion zeroes the product;
* fused gated MLP (Phi-3, GLM, ModernBERT): one map computes both halves,
  ``g, v = fused(x).chunk(2, -1)``, then ``down(act(g) * v)``: unit ``b`` of the half that goes
  through the activation and unit ``b`` of the other half are one neuron, as in a GLU; the layer is
  named after the fused map and has half its output width.

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

from dataclasses import replace

import numpy as np
import torch
from torch import fx, nn

from modlens.core.residual_graph import MLPBlockWeights
from modlens.nn._ops import Sink, UnsupportedModelError
from modlens.nn._pointwise import depthwise_rows, is_map, matrix, norm_scale, norm_width, width_out
from modlens.nn._scores import _mixes_tokens
from modlens.nn._stage_chain import l1_gain
from modlens.nn._stage_maps import _branch_gain, _stream_layers, _transition, _width_change, branch_conv
from modlens.nn._stream import (_MOVES, _NORMS, MLPNeurons, _closure, _first_after, _gamma, _is_activation,
                                _norm_after, _np, _passing, _users)

aten = torch.ops.aten
_TOP_K = (aten.topk.default, torch.topk, "topk")   # a router's choice of experts


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


def _spatial_branch(s, product: fx.Node, other_than: fx.Node):
    """(layer, activation seen) feeding the other operand of a gate product through a gMLP spatial
    gating unit: element-wise operations, a norm over the half's channels, and a token-mixing map
    between transposes (``proj(norm(v)^T)^T``); None when there is no token-mixing map on the way."""
    ins = s.tensor_inputs(product)
    if len(ins) != 2:
        return None
    node = next((a for a in ins if a is not other_than), None)
    acted = mixed = False
    while node is not None and (s.kind(node) != "layer" or node in s.token_mixers):
        kind = s.kind(node)
        if kind not in ("unary", "norm", "permute", "token_mix") or len(s.tensor_inputs(node)) != 1 \
                or len(_users(s, node)) != 1:
            return None
        mixed = mixed or kind == "token_mix"
        acted = acted or (kind == "unary" and _is_activation(s, node))
        node = s.tensor_inputs(node)[0]
    return None if node is None or not mixed else (node, acted)


def _elementwise_source(s, node: fx.Node) -> fx.Node:
    """``node`` followed back through element-wise operations of one value (clamps, casts)."""
    while s.kind(node) == "unary" and len(s.tensor_inputs(node)) == 1:
        node = s.tensor_inputs(node)[0]
    return node


def _branch_input(s, product: fx.Node, layer: fx.Node) -> fx.Node:
    """The operand of ``product`` that comes from ``layer``."""
    return next(a for a in s.tensor_inputs(product) if layer in _chain_to(s, a))


def _chain_to(s, node: fx.Node) -> set:
    seen = {node}
    while s.kind(node) == "unary" and s.tensor_inputs(node):
        node = s.tensor_inputs(node)[0]
        seen.add(node)
    return seen


def _to_product(s, node: fx.Node):
    """(product, activation input or None) where ``node`` reaches a two-operand gate product through
    single-use one-input element-wise ops; None otherwise."""
    pre = None
    while True:
        users = _users(s, node)
        if len(users) != 1:
            return None
        u = users[0]
        if s.kind(u) == "gate" and len(s.tensor_inputs(u)) == 2:
            return u, pre
        if s.kind(u) != "unary" or s.tensor_inputs(u) != [node]:
            return None
        if _is_activation(s, u):
            if pre is not None:
                return None
            pre = node
        node = u


def _fused_glu(s, layer: fx.Node) -> MLPNeurons | None:
    """A fused gated MLP at ``layer``: its output split into two equal halves along the last dimension,
    one half through an activation, multiplied together and read by one Linear (``down``)."""
    users = _users(s, layer)
    width = s.module(layer).out_features
    if not users or any(s.kind(u) != "split" for u in users) or width % 2:
        return None
    parts = []
    try:
        for u in users:   # one chunk/split, or one slice per half
            parts += s._split_parts(layer, u, s.layer_route(layer)) or [(None, None)]
    except UnsupportedModelError:
        return None
    half = width // 2
    if len(parts) != 2 or any(r is None for _, r in parts) or {r.sources for _, r in parts} != {(0, half), (half, width)}:
        return None
    ends = [(_to_product(s, v), r.sources[0]) for v, r in parts]
    if any(e is None for e, _ in ends) or ends[0][0][0] is not ends[1][0][0]:
        return None
    acted = [(pre, lo) for (_, pre), lo in ends if pre is not None]
    if len(acted) != 1:
        return None                               # both or neither half through an activation: not a GLU
    (pre, gate_lo), value_lo = acted[0], next(lo for (_, p), lo in ends if p is None)
    node = ends[0][0][0]
    while True:                                   # the product through dropout and the like into ``down``
        users = _users(s, node)
        if len(users) != 1:
            return None
        u = users[0]
        if s.kind(u) == "layer":
            ok = isinstance(s.module(u), nn.Linear) and u not in s.output_layers and u.args[0] is node \
                and s.module(u).in_features == half
            return MLPNeurons(layer, None, u, node, None, pre, (gate_lo, value_lo), half) if ok else None
        if s.kind(u) != "unary" or s.tensor_inputs(u) != [node] or _is_activation(s, u):
            return None
        node = u


def _embedding_mlp(s, m: MLPNeurons) -> bool:
    """An MLP-shaped pair that changes the width and runs before any attention or token mixing: part of
    computing the input embedding (MarkupLM's XPath embedding), not a block on the residual stream."""
    first = s.module(m.node)
    width_in = getattr(first, "in_features", None) or getattr(first, "in_channels", None)
    if m.halves is not None or width_in == width_out(s.module(m.down)):
        return False
    upstream = _closure(m.node, lambda n: n.all_input_nodes)
    return not any(_mixes_tokens(s, n) or n in s.token_mixers for n in upstream)


def find_mlps(s) -> list[MLPNeurons]:
    """The MLP neuron layers of a captured model with attention, in forward order."""
    out = []
    for layer in s.all_nodes:
        if layer in s.output_layers or not is_map(s.module(layer)) or (s.ndim(layer) or 2) < 3:
            continue
        fused = _fused_glu(s, layer) if isinstance(s.module(layer), nn.Linear) else None
        if fused is not None:
            out.append(fused)
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
            if other is None:
                other = _spatial_branch(s, product, _branch_input(s, product, layer))
            if other is None or _elementwise_source(s, other[0].args[0]) is not _elementwise_source(s, layer.args[0]):
                continue   # gate and value read the same value (each through its own clamp: Gemma-4's clipped Linears)
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
    out = [m for m in out if not _embedding_mlp(s, m)]
    routers = [n for n in s.gm.graph.nodes if n in s.live and n.target in _TOP_K]
    experts = [n for n in s.gm.graph.nodes if n in s.live and "grouped_mm" in str(n.target)]
    if (routers or experts) and not out:
        how = "a top-k choice of experts per token" if routers else "a grouped matrix product over the experts' weights"
        raise UnsupportedModelError(
            f"the model routes tokens to experts ({s.describe((routers or experts)[0])}: {how}) and "
            "has no MLP over (batch, tokens, channels) beside them: mixture-of-experts MLPs are not supported; "
            "modlens analyses the units of dense transformer MLPs")
    if not out:
        mixing = "attention"
        if s.token_mixers:
            mixing = f"token-mixing layers ({', '.join(sorted(n.target for n in s.token_mixers)[:2])}, ...)"
        raise UnsupportedModelError(
            f"the model has {mixing} but no transformer MLP (Linear or 1x1 conv -> activation -> Linear or 1x1 "
            "conv, batch norms allowed after each map, a gated GLU/SwiGLU MLP, or one with a depthwise conv "
            "between its maps as in a Mix-FFN); modlens analyses the MLP neurons of transformer blocks"
        )
    return out


def _gates(s, down: fx.Node) -> bool:
    """Whether ``down``'s output, through element-wise ops, multiplies another value (a gate)."""
    return _first_after(s, down, lambda n: s.kind(n) == "gate",
                        lambda n: s.kind(n) in ("unary", "bn") + _MOVES) is not None


def bn_after(s, layer: fx.Node):
    """The weight-graph scale of a batch norm that directly follows ``layer`` (through reshapes: LeViT
    normalizes ``x.flatten(0, 1)``), else None."""
    bn = _first_after(s, layer, lambda n: s.kind(n) == "bn", lambda n: s.kind(n) in _MOVES or _passing(s, n))
    return None if bn is None else norm_scale(s.module(bn), norm_width(s, bn))


def mlp_sink(s, m: MLPNeurons) -> Sink:
    """The lesion sink of an MLP layer: its ``down`` map's input, at every token position (a fused gated
    MLP: half the fused map's width)."""
    route = s.layer_route(m.node)
    return Sink("layer", m.value, m.down, route if m.width is None else replace(route, channels=m.width))


# ----- residual-stream weights -------------------------------------------------------------------


def _back_to_norm(s, node: fx.Node):
    """(norm module or None, node where the backward walk stopped) through one-input ops."""
    while True:
        if node.op == "call_module" and isinstance(s.module(node), _NORMS):
            return s.module(node), node
        ins = s.tensor_inputs(node)
        if s.kind(node) in ("layer", "input") or len(ins) != 1:
            return None, node
        node = ins[0]


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
        if s.module(stop).out_features != h.shape[1]:   # something between them changes the width: no head map
            return None, None
        h = h @ _np(s.module(stop).weight)  # a dense map between the stream and the head (pooler)
        node = stop.args[0]
    if h.shape[1] != d_model:
        return None, None
    return h, _gamma(norm, d_model)


def _scaled_rows(w: np.ndarray, rows) -> np.ndarray:
    """``w`` with row ``i`` times ``rows[i]`` (float64 then), or ``w`` itself, in the model's dtype, when
    nothing scales it."""
    return w if rows is None else w * np.asarray(rows, dtype=np.float64)[:, None]


def residual_parts(s, mlps: list[MLPNeurons]) -> dict:
    """Keyword arguments of :func:`~modlens.core.residual_graph.residual_weight_graph`; a hierarchical
    model's blocks carry their stage and ``transitions`` the maps between stages."""
    blocks, transitions, stage = [], [], 0
    for k, m in enumerate(mlps):
        down = s.module(m.down)
        d_model = width_out(down)
        d_prev = blocks[-1].w_out.shape[0] if k else d_model
        if k and d_model != d_prev and m.node not in _closure(mlps[k - 1].down, lambda n: n.users):
            raise UnsupportedModelError(
                f"the MLP '{m.node.target}' (stream width {d_model}) runs beside '{mlps[k - 1].node.target}' "
                f"(width {d_prev}): nothing that the earlier one writes reaches it, so the model has parallel "
                "residual streams of different widths (TNT's inner and outer transformers, CrossViT's branches); "
                "modlens's weight graph follows one stream through stages in sequence and cannot join parallel "
                "streams: analyse one branch as a model of its own where the model allows it")
        if k and (d_model != d_prev or m.node not in _stream_layers(s, mlps[k - 1].down)):
            try:
                transitions.append(_transition(s, mlps[k - 1], m, d_prev, d_model))
                stage += 1
            except UnsupportedModelError as exc:
                # streams of one width with no single downsampling layer between them (an encoder's and a
                # decoder's) stay one stream, as before stages existed; a change of width must be explained
                if d_model != d_prev and m.node in _stream_layers(s, mlps[k - 1].down):
                    via = _width_change(s, mlps[k - 1].down)
                    raise UnsupportedModelError(
                        f"the MLP '{mlps[k - 1].node.target}' writes a stream of width {d_prev} that reaches the MLP "
                        f"'{m.node.target}' (width {d_model}) through no layer"
                        f"{f', by {s.describe(via)}' if via is not None else ''}: a reduction, broadcast or gate "
                        "between streams (a transformer inside a gate: CSATv2's spatial attention runs one on a "
                        "1-channel map); modlens reads the MLPs of the main residual stream and has no weight graph "
                        "for an MLP whose stream only gates another one yet") from exc
                if d_model != d_prev:
                    raise
        norm, at = _back_to_norm(s, m.node.args[0])
        gamma = _gamma(norm, d_model)
        gain = _branch_gain(s, at) if norm is not None else (l1_gain(s, at) if branch_conv(s, at) else None)
        if gain is not None:  # the MLP reads the stream through a depthwise conv on its branch (EdgeNeXt)
            gamma = (np.ones(d_model) if gamma is None else gamma) * gain
        first = s.module(m.node)
        w_out = matrix(down)
        post = _norm_after(s, m.down, d_model)   # a post-norm block (Swin-V2), a ConvNorm's BN: scales what it writes
        if post is not None:
            w_out = w_out * post[:, None]
        rows = bn_after(s, m.node)   # ConvNorm / LinearNorm: the batch norm on the units
        if m.dwconv is not None:  # Mix-FFN, conv MLP: each unit reads its neighbourhood through its own filter
            dw = depthwise_rows(s.module(m.dwconv), width_out(first), bn_after(s, m.dwconv))
            rows = dw if rows is None else rows * dw
        w_first = _scaled_rows(matrix(first), rows)
        if m.halves is not None:  # a fused gated MLP: the two halves of one weight
            g, v = m.halves
            blocks.append(MLPBlockWeights(w_first[v:v + m.width], w_out, gamma, w_gate=w_first[g:g + m.width],
                                          stage=stage))
        elif m.up is None:
            blocks.append(MLPBlockWeights(w_first, w_out, gamma, stage=stage))
        else:
            w_up = _scaled_rows(matrix(s.module(m.up)), bn_after(s, m.up))
            blocks.append(MLPBlockWeights(w_up, w_out, gamma, w_gate=w_first, stage=stage))
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
