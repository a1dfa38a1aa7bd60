"""The maps between the stages of a hierarchical transformer (docs/transformers.md, "Hierarchical
transformers: stages"): which layers join the residual stream that one MLP writes to the stream that
the next one reads, read as a :class:`~modlens.core.residual_graph.StageMap` (one downsampling layer,
a chain of layers, PiT's conv beside a class-token Linear), and the checks around them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from modlens.core.residual_graph import StageMap
from modlens.nn._ops import UnsupportedModelError
from modlens.nn._pointwise import norm_width
from modlens.nn._stage_paths import paths_map
from modlens.nn._stage_chain import compose, depthwise_stride1, find_chain, l1_gain, layer_map
from modlens.nn._stream import (_LAYER_NORMS, _MOVES, _NORMS, MLPNeurons, _closure, _gamma, _norm_after, _np, _passing,
                                _users)

def branch_conv(s, conv: fx.Node) -> bool:
    """Whether ``conv`` is a stride-1 depthwise conv on a block's branch: its input (through reshapes)
    is also read by something else, the shortcut (EdgeNeXt's ``x + mlp(norm(dwconv(x)))``), unlike a
    conv that the whole stream passes through (TinyViT's local conv)."""
    if conv.op != "call_module" or not depthwise_stride1(s.module(conv)):
        return False
    node = conv
    while True:
        ins = s.tensor_inputs(node)
        if len(ins) != 1:
            return False
        node = ins[0]
        if len(_users(s, node)) > 1:
            return True
        if s.kind(node) not in _MOVES and not _passing(s, node):
            return False


def _branch_gain(s, norm_node: fx.Node):
    """The per-channel gain of a branch depthwise conv that an MLP reads the stream through (before its
    norm), else None."""
    node = norm_node
    while True:
        ins = s.tensor_inputs(node)
        if len(ins) != 1:
            return None
        node = ins[0]
        if s.kind(node) == "layer":
            return l1_gain(s, node) if branch_conv(s, node) else None
        if s.kind(node) not in _MOVES + ("bn",) and not _passing(s, node):
            return None


def _width_change(s, start: fx.Node):
    """The first op on the stream after ``start`` (through no layer) whose output's last dimension differs from
    an input's, other than a reshape or permute (a reduction over the channels, a broadcast product), or None."""
    order = {n: i for i, n in enumerate(s.gm.graph.nodes)}
    walk = _closure(start, lambda n: [u for u in _users(s, n) if s.kind(u) not in ("layer", "attention")])

    def last(n):
        shape = s.shapes.get(n)
        return shape[-1] if shape else None

    hits = [n for n in walk - {start} if s.kind(n) not in _MOVES
            and any(a in walk and last(a) != last(n) for a in s.tensor_inputs(n))]
    return min(hits, key=order.__getitem__) if hits else None


def _stream_layers(s, start: fx.Node) -> set:
    """The layers that read ``start``'s output through the residual stream: a forward walk through
    everything but layers and attention products (joins, norms, reshapes, token permutations...);
    a depthwise conv on a block's branch is walked through (:func:`branch_conv`)."""
    seen, todo, layers = {start}, [start], set()
    while todo:
        for u in _users(s, todo.pop()):
            if u in seen:
                continue
            seen.add(u)
            kind = s.kind(u)
            if kind == "layer" and branch_conv(s, u):
                todo.append(u)   # a depthwise conv on a block's branch (EdgeNeXt): part of the block's read
            elif kind == "layer":
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
    if len(found) == 2:
        pair = _grid_and_token_maps(s, before, found, d_in, d_out, names)
        if pair is not None:
            return pair
    if len(found) != 1:   # no single layer: an attention block whose output has the next stage's width?
        ov = _attention_transition(s, before, after, list(reached), d_in, d_out, names)
        if ov is not None:
            return ov
    chain = [] if len(found) > 1 else find_chain(s, before.down, after.node, _stream_layers) or []
    try:
        if len(chain) > 1 or (len(chain) == 1 and getattr(s.module(chain[0]), "groups", 1) != 1):
            return _chain_transition(s, before, chain, d_in, d_out, names)
        return _one_layer_transition(s, before, after, d_in, d_out, names, reached, found)
    except UnsupportedModelError:
        # a change of width between channels-first streams: the layer paths between them (a stream of one
        # width with conv mixers inside stays one stream)
        if d_in == d_out or not (_channels_first(s, before.down) and _channels_first(s, after.node)):
            raise
    # several layers on several paths (conv stems with squeeze-excitation, residual depthwise convs)
    kernel, stride = paths_map(s, before.down, after.node.args[0], d_in, names)
    return StageMap(kernel, stride)


def _attention_transition(s, before, after, found, d_in: int, d_out: int, names: str) -> StageMap | None:
    """LeViT's attention downsampling: the stream reaches the next stage only through an attention block
    whose output projection writes the next stage's width (no shortcut around it). The map is the block's
    value path composed with its output projection, the OV circuit ``W_O diag(s_O) W_V diag(s_V)`` (batch
    norms folded, activations between taken as the identity, each head's values read by that head's
    columns of ``W_O``); the attention weights mix tokens and are left out, as attention is everywhere
    in the weight graph. One tap: an output token reads a convex combination of input tokens (softmax rows
    sum to 1), so a value constant over the tokens passes unchanged. None when the layers found are not
    such a block (the caller then refuses as before)."""
    products = set()
    for layer in found:   # the attention products that the found layers (values, queries, keys) feed
        walk = _closure(layer, lambda n: [u for u in _users(s, n) if s.kind(u) not in ("layer", "output")
                                          and s.kind(n) != "attention"])
        products |= {n for n in walk if s.kind(n) == "attention"}
    projs = {l for p in products for l in _stream_layers(s, p) | _after_product(s, p)
             if after.node in _stream_layers(s, l)}
    if len(projs) != 1:
        return None
    (proj,) = projs
    av = [p for p in products if proj in _after_product(s, p)]
    if len(av) != 1:
        return None
    # the value path: back from the projection, not past the other attention products (the scores)
    others = products - set(av)
    region = _closure(proj.args[0], lambda n: [] if n in others else n.all_input_nodes)
    values = [l for l in found if l in region]
    kernel = _ov_probe(s, before, values, proj, av[0], region, d_in, names)
    o = layer_map(s, proj, names)
    if o.kernel.shape[2:] != (1, 1) or tuple(o.stride) != (1, 1):
        raise UnsupportedModelError(f"{names} the attention output projection '{proj.target}' has kernel "
                                    f"{o.kernel.shape[2:]} and stride {o.stride}; modlens composes a pointwise one")
    m = o.kernel[:, :, 0, 0] @ kernel
    if m.shape != (d_out, d_in):
        raise UnsupportedModelError(f"{names} the attention block's value path and output projection "
                                    f"'{proj.target}' map {m.shape[1]} to {m.shape[0]} channels; modlens needs the "
                                    f"stream's {d_in} to the next stage's {d_out}")
    gamma_out = _norm_after(s, proj, d_out, _LAYER_NORMS)
    if gamma_out is not None:
        m = m * gamma_out[:, None]
    return StageMap(m[:, :, None, None], (1, 1))


def _after_product(s, product: fx.Node) -> set:
    """The layers that read an attention product's output through reshapes, permutes and element-wise ops."""
    walk = _closure(product, lambda n: [u for u in _users(s, n) if s.kind(u) not in ("layer", "attention", "output")])
    return {u for n in walk for u in _users(s, n) if s.kind(u) == "layer"}


def _ov_probe(s, before, values: list, proj: fx.Node, av: fx.Node, back: set, d_in: int, names: str) -> np.ndarray:
    """The linear map ``(width of proj's input, d_in)`` from the stream to the attention output projection's
    input through the value path, the attention product read as passing a token-constant value unchanged.

    The path is run on probes: the stream set to one basis vector at every token; layers without their
    bias, batch norms as their scale, activations, dropout and copies as the identity, reshapes,
    permutes, splits and slices as they are. Anything else on the value path is refused."""
    start = _stream_value(s, before, values, names)
    region = _closure(start, lambda n: _users(s, n)) & back
    order = [n for n in s.gm.graph.nodes if n in region]
    shape = s.shapes.get(start)
    if shape is None:
        raise UnsupportedModelError(f"{names} the stream value {s.describe(start)} before the attention block has "
                                    "no recorded shape")
    nd = len(shape) + 1
    channel = 1 if s.ndim(values[0].args[0]) == 4 and isinstance(s.module(values[0]), nn.Conv2d) else nd - 1

    def run(c):
        probe = torch.zeros((2,) + tuple(shape), dtype=torch.float64)
        index = [slice(None)] * nd
        index[channel] = c
        probe[tuple(index)] = 1.0
        env, tainted = {start: probe}, set()

        def val(a):
            if isinstance(a, fx.Node):
                if a in env:
                    return env[a]
                if a.op == "placeholder" and s.shapes.get(a) is not None:
                    return torch.zeros((2,) + tuple(s.shapes[a]))   # read for its sizes only (the batch)
                if a.op == "get_attr":
                    return getattr(s.gm, a.target) if "." not in a.target else s.gm.get_submodule(
                        a.target.rsplit(".", 1)[0]).__getattr__(a.target.rsplit(".", 1)[1])
                if s.is_shape(a):
                    env[a] = a.target(*fx.node.map_aggregate(a.args, val), **fx.node.map_aggregate(a.kwargs, val)) \
                        if a.op == "call_function" else getattr(val(a.args[0]), a.target)(
                            *fx.node.map_aggregate(a.args[1:], val), **fx.node.map_aggregate(a.kwargs, val))
                    return env[a]
                raise _Off(a)
            return a

        for n in order[1:]:
            ins = [a for a in n.all_input_nodes if a in region]
            if any(a in tainted for a in ins) and n is not av:
                tainted.add(n)
                continue
            kind = s.kind(n)
            if n is av:
                clean = [a for a in ins if a not in tainted]
                if len(clean) != 1 or n.op != "call_function":
                    raise UnsupportedModelError(f"{names} {s.describe(n)} reads the stream through {len(clean)} "
                                                "operands without another attention product between; modlens reads "
                                                "one as the values")
                v = env[clean[0]]
                pos = [i for i, a in enumerate(n.args) if a is clean[0]]
                axis = -1 if pos == [0] and len([a for a in n.args if isinstance(a, fx.Node)]) == 2 else -2
                out = s.shapes.get(n)
                if out is None or len(out) + 1 != v.dim():
                    raise UnsupportedModelError(f"{names} {s.describe(n)} has shape {out}; modlens needs one tensor "
                                                "of the values' rank")
                env[n] = v.narrow(axis, 0, 1).expand((v.shape[0],) + tuple(out))
                if tuple(v.shape[1:])[:axis] != tuple(out)[:axis] or (axis == -2 and v.shape[-1] != out[-1]):
                    raise UnsupportedModelError(f"{names} {s.describe(n)} maps values of shape {tuple(v.shape[1:])} "
                                                f"to {out}; modlens reads an attention product over the token axis")
                continue
            if kind == "attention":
                tainted.add(n)
                continue
            mod = s.module(n) if n.op == "call_module" else None
            x = val(ins[0]) if ins else None
            try:
                if kind == "layer" and isinstance(mod, nn.Linear):
                    env[n] = F.linear(x, mod.weight.double())
                elif kind == "layer" and isinstance(mod, nn.Conv2d):
                    env[n] = F.conv2d(x, mod.weight.double(), None, mod.stride, mod.padding, mod.dilation, mod.groups)
                elif kind == "bn" and mod is not None:
                    scale = torch.as_tensor(1.0 / np.sqrt(_np(mod.running_var) + mod.eps))
                    if mod.weight is not None:
                        scale = scale * mod.weight.detach().double()
                    env[n] = x * scale.reshape((1, -1) + (1,) * (x.dim() - 2))
                elif (kind == "unary" or _passing(s, n)) and len(ins) == 1 and s.shapes.get(n) == s.shapes.get(ins[0]):
                    env[n] = x   # activations, dropout, copies: the identity, as on every stream path
                elif kind in _MOVES + ("split", "shape") or (n.op == "call_function" and "getitem" in str(n.target)) \
                        or (n.op in ("call_function", "call_method") and _slices(n)):
                    args = fx.node.map_aggregate(n.args, val)
                    kwargs = fx.node.map_aggregate(n.kwargs, val)
                    env[n] = (n.target(*args, **kwargs) if n.op == "call_function"
                              else getattr(args[0], n.target)(*args[1:], **kwargs))
                else:
                    raise UnsupportedModelError(
                        f"{names} the value path of the attention block reaches {s.describe(n)} (a '{kind}' "
                        "operation); modlens follows layers, batch norms, activations, reshapes, permutes, splits "
                        "and slices between the stream and the attention's output projection")
            except _Off as off:
                raise UnsupportedModelError(f"{names} {s.describe(n)} on the attention block's value path reads "
                                            f"{s.describe(off.args[0])}, which is not on that path") from None
        if order[-1] is not proj.args[0] or proj.args[0] not in env:
            raise UnsupportedModelError(f"{names} no value path reaches the attention output projection "
                                        f"'{proj.target}' from the stream")
        out = env[proj.args[0]]
        lin = isinstance(s.module(proj), nn.Linear)
        cols = (out.movedim(-1 if lin else 1, 1)).reshape(out.shape[0], out.shape[-1 if lin else 1], -1)
        if not torch.allclose(cols, cols[:, :, :1].expand_as(cols), rtol=1e-9, atol=1e-12):
            raise UnsupportedModelError(f"{names} the value path of the attention block mixes token positions "
                                        f"before '{proj.target}'; modlens composes a pointwise value path only")
        return cols[0, :, 0].numpy()

    with torch.no_grad():
        return np.stack([run(c) for c in range(d_in)], axis=1)


class _Off(Exception):
    """A value path op reads a node that is not on the path."""


def _slices(n: fx.Node) -> bool:
    name = str(n.target)
    return any(k in name for k in ("slice", "select", "narrow", "contiguous", "unsqueeze", "squeeze", "view",
                                   "expand", "clone", "alias"))


def _stream_value(s, before, values: list, names: str) -> fx.Node:
    """The stream value that the attention block's value layer reads: the last residual join before it
    (only reshapes and copies between)."""
    (layer,) = values if len(values) == 1 else (None,)
    if layer is None:
        raise UnsupportedModelError(f"{names} {len(values)} layers of the attention block "
                                    f"({', '.join(str(l.target) for l in values)}) read the stream and reach its "
                                    "output projection; modlens reads one value layer")
    region = _ancestors_until(s, layer.args[0], before.down)
    bad = [n for n in region if s.kind(n) not in _MOVES + ("split",) and not _passing(s, n)]
    if bad:
        raise UnsupportedModelError(f"{names} the attention block's value layer '{layer.target}' reads the stream "
                                    f"through {s.describe(bad[0])}; modlens follows reshapes and copies there")
    first = region[0] if region else layer
    ins = s.tensor_inputs(first)
    return ins[0] if ins else layer.args[0]


def _channels_first(s, layer: fx.Node) -> bool:
    """Whether a layer's output is a (B, C, H, W) map (a conv), not tokens."""
    return isinstance(s.module(layer), nn.Conv2d) and s.ndim(layer) == 4


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
    norms = [n for n in region if n.op == "call_module" and isinstance(s.module(n), _LAYER_NORMS)]
    pools = [n for n in region if _avg_pool(s, n) is not None]
    bad = [n for n in region if n not in norms + pools and (s.kind(n) not in _MOVES + ("split", "cat", "pad")
                                                             and not _passing(s, n))]
    if bad or len(norms) > 1 or len(pools) > 1:
        raise UnsupportedModelError(
            f"{names} the downsampling layer '{down.target}' reads the stream through "
            f"{s.describe((bad or norms[1:] or pools[1:])[0])}; modlens follows reshapes, permutes, slices, "
            "concatenations, padding, one norm and one average pool there"
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
        if pool is not None:  # pool then a 1x1 conv (MaxViT's shortcut): one kernel of the pool's size and stride
            if kernel.shape[2:] != (1, 1) or stride != (1, 1):
                raise UnsupportedModelError(f"{names} an average pool comes before the conv '{down.target}' "
                                            f"(kernel {kernel.shape[2:]}, stride {stride}); modlens follows a pool "
                                            "before a 1x1 conv of stride 1 only")
            size, stride, divisor = pool
            kernel = np.tile(kernel, (1, 1, *size)) / divisor
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


def _grid_and_token_maps(s, before: MLPNeurons, found: list, d_in: int, d_out: int, names: str):
    """PiT's pooling: the grid's tokens through a (grouped) conv and the class token through a Linear, in
    parallel. One stage map: the conv's kernel, and the Linear as the class tokens' own map. None when the
    two layers are not such a pair."""
    convs = [l for l in found if isinstance(s.module(l), nn.Conv2d)]
    lins = [l for l in found if isinstance(s.module(l), nn.Linear)]
    if len(convs) != 1 or len(lins) != 1:
        return None
    conv, lin = s.module(convs[0]), s.module(lins[0])
    if (conv.in_channels, conv.out_channels) != (d_in, d_out) or (lin.in_features, lin.out_features) != (d_in, d_out):
        return None
    for layer in (convs[0], lins[0]):
        bad = [n for n in _ancestors_until(s, layer.args[0], before.down)
               if s.kind(n) not in _MOVES + ("split",) and not _passing(s, n)]
        if bad:
            raise UnsupportedModelError(
                f"{names} the stream reaches '{layer.target}' through {s.describe(bad[0])}; for a conv over the "
                "grid beside a Linear for the class token, modlens follows reshapes and slices only")
    grid = layer_map(s, convs[0], names)
    gamma_out = _norm_after(s, convs[0], d_out)
    if gamma_out is not None:
        raise UnsupportedModelError(f"{names} a norm follows the grid's conv '{convs[0].target}' alone; modlens needs "
                                    "the conv and the class token's Linear to write the stream directly")
    return StageMap(grid.kernel, grid.stride, token_map=_np(lin.weight))


def _resizes(s, node: fx.Node) -> bool:
    """Whether a one-input op changes the spatial size of a (B, C, H, W) value (pooling, upsampling): the
    chain's kernels would not compose through it."""
    ins = s.tensor_inputs(node)
    a, b = (s.shapes.get(ins[0]) if len(ins) == 1 else None), s.shapes.get(node)
    return s.kind(node) == "unary" and a is not None and b is not None and len(a) == len(b) == 3 and a[1:] != b[1:]


def _chain_transition(s, before: MLPNeurons, chain: list, d_in: int, d_out: int, names: str) -> StageMap:
    """The composed map of a chain of layers between two MLPs (:mod:`modlens.nn._stage_chain`): between
    the links only reshapes, element-wise ops, batch norms and a concatenation with other values (the
    link then reads the chain at the concatenation's offset); before the first link, also one norm over
    the stream (its scale folded into the first map's columns)."""
    maps, prev = [], before.down
    for k, link in enumerate(chain):
        region = _ancestors_until(s, link.args[0], prev)
        # batch norms between a chain's layers are folded into them; only a per-sample norm is a norm here
        norms = [n for n in region if n.op == "call_module" and isinstance(s.module(n), _LAYER_NORMS)]
        cats = [n for n in region if s.kind(n) == "cat"]
        bad = [n for n in region if n not in norms + cats
               and (s.kind(n) not in _MOVES + ("unary", "bn", "pad") and not _passing(s, n) or _resizes(s, n))]
        if bad or len(cats) > 1 or (norms and (k or len(norms) > 1)):
            raise UnsupportedModelError(
                f"{names} the stream reaches '{link.target}' through {s.describe((bad or cats[1:] or norms)[0])}; "
                "between the layers of a stage boundary modlens follows reshapes, element-wise activations, batch "
                "norms and one concatenation, and one norm before the first layer")
        m = layer_map(s, link, names)
        width = maps[-1].kernel.shape[0] if maps else d_in
        if cats:
            m = StageMap(m.kernel[:, _cat_offset(s, cats[0], prev, region, link, names):][:, :width], m.stride)
        if norms:
            gamma = _gamma(s.module(norms[0]), d_in)
            if s.shapes.get(norms[0], (None,))[-1] != d_in:
                raise UnsupportedModelError(f"{names} the norm {s.describe(norms[0])} before '{link.target}' is not "
                                            f"over the stream's {d_in} channels")
            m = StageMap(m.kernel * gamma[None, :, None, None], m.stride)
        maps.append(m)
        prev = link
    m = compose(maps)
    if m.kernel.shape[:2] != (d_out, d_in):
        raise UnsupportedModelError(
            f"{names} the stream passes through the layers {', '.join(str(l.target) for l in chain)} in a row, which "
            f"map {m.kernel.shape[1]} to {m.kernel.shape[0]} channels; modlens composes a chain of convs (or Linears "
            f"over the channels) from the stream's {d_in} to {d_out} channels, or takes one patch merging Linear")
    gamma_out = _norm_after(s, chain[-1], d_out, _LAYER_NORMS)   # a batch norm after the chain is in it
    return m if gamma_out is None else StageMap(m.kernel * gamma_out[:, None, None, None], m.stride)


def _cat_offset(s, cat: fx.Node, prev: fx.Node, region: list, link: fx.Node, names: str) -> int:
    """Where the chain's value starts among the channels that ``link`` reads from the concatenation ``cat``
    (MobileViT's fusion conv reads ``cat(block input, chain)``)."""
    parts = cat.args[0]
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    nd = s.ndim(cat) or 0
    channel = 1 if isinstance(s.module(link), nn.Conv2d) else nd - 1
    on_path = set(region) | {prev}
    hits = [i for i, p in enumerate(parts) if p in on_path]
    shapes = [s.shapes.get(p) for p in parts]
    if (not isinstance(dim, int) or dim % max(nd, 1) != channel or len(hits) != 1 or any(sh is None for sh in shapes)
            or len(shapes[0]) < channel):
        raise UnsupportedModelError(f"{names} '{link.target}' reads the stream through {s.describe(cat)}, which "
                                    "modlens follows only when it joins values along the channels")
    return int(sum(sh[channel - 1] for sh in shapes[:hits[0]]))


def _avg_pool(s, node: fx.Node):
    """((kh, kw), (sh, sw), divisor) of a 2-D average pool, else None. Overlapping and padded pools
    (torchvision's MaxViT: kernel 3, stride 2, padding 1) are one strided kernel whose taps are 1/divisor:
    the divisor is ``kh * kw`` (or ``divisor_override``), which is exact away from the padded border and,
    with ``count_include_pad`` (the default), at the border too."""
    if node.op == "call_module" and isinstance(s.module(node), nn.AvgPool2d):
        m = s.module(node)
        k, st, override = m.kernel_size, m.stride, m.divisor_override
    elif node.op == "call_function" and node.target in (torch.ops.aten.avg_pool2d.default, nn.functional.avg_pool2d):
        args = list(node.args) + [None] * 7
        k = node.kwargs.get("kernel_size", args[1])
        st = node.kwargs.get("stride", args[2]) or k
        override = node.kwargs.get("divisor_override", args[6])
    else:
        return None
    pair = lambda v: (tuple(v) * 2)[:2] if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    k, st = tuple(int(v) for v in pair(k)), tuple(int(v) for v in pair(st))
    return k, st, float(override or k[0] * k[1])


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


def _check_channel_blocks(s, region, stop, d_in: int, names: str, down) -> None:
    """A patch merging Linear must read whole copies of the stream's channels, in their order, side by
    side on the last dimension. The walk follows where the channels are: a permute or transpose may move
    them to another dimension and back (a stage run in the (B, C, H, W) layout between blocks that read
    (B, H, W, C), as in Swin-V2-CR), and while they are elsewhere only permutes, transposes and
    element-wise ops may touch the value. Every other op needs them innermost (the last dimension a
    multiple of ``d_in``), concatenations along it, splits along another dimension."""
    inside = set(region)
    axis: dict = {}   # the channel dimension of each value of the region (batch included)

    def refuse(n, shape):
        raise UnsupportedModelError(
            f"{names} {s.describe(n)} (shape {shape}) moves the stream's channels before the patch merging "
            f"Linear '{down.target}'; modlens needs the {d_in} channels kept innermost (x.reshape(B, H/2, 2, W/2, "
            "2, C).permute(0, 1, 3, 4, 2, 5).flatten(3), or a concatenation of strided slices on the last dim), "
            "or moved by permutes only"
        )

    for n in region:
        shape, nd = s.shapes.get(n), s.ndim(n)
        ins = s.tensor_inputs(n)
        src = next((a for a in ins if a in inside), ins[0] if ins else None)
        nd_in = s.ndim(src) if src is not None else None
        if shape is None or nd_in is None:
            refuse(n, shape)
        a_in = axis.get(src, nd_in - 1)   # a value from outside the region is the stream: channels last
        name = str(n.target)
        last_in = a_in == nd_in - 1
        if "permute" in name:
            perm = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            if not all(isinstance(p, int) for p in perm):
                refuse(n, shape)
            axis[n] = [p % nd for p in perm].index(a_in)
        elif "transpose" in name:
            if not all(isinstance(a, int) for a in n.args[1:3]):
                refuse(n, shape)
            i, j = (a % nd for a in n.args[1:3])
            axis[n] = {i: j, j: i}.get(a_in, a_in)
        elif not last_in:
            if s.kind(n) != "unary" and not _passing(s, n):
                refuse(n, shape)
            axis[n] = a_in
        else:
            ok = isinstance(shape[-1], int) and shape[-1] % d_in == 0
            if ok and s.kind(n) == "cat":
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                ok = isinstance(dim, int) and dim % nd == nd - 1
            elif ok and s.kind(n) == "split":
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                ok = isinstance(dim, int) and dim % nd != nd - 1
            if not ok:
                refuse(n, shape)
            axis[n] = nd - 1
    last = down.args[0]
    if last in axis and axis[last] != (s.ndim(last) or 1) - 1:
        refuse(last, s.shapes.get(last))
