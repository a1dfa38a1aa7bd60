"""Attention as a mixing of positions inside a convolutional network (docs/transformers.md).

HaloNet, BoTNet and MobileNet-V5 are CNNs (bottleneck or inverted-residual blocks of convs, batch
norms and activations) in which some blocks replace a spatial conv by self-attention over the
positions of the feature map. They have no transformer MLP; their neurons are the CNN's: conv output
channels. The attention of such a block is read as a data-dependent mixing of positions:

* a *value layer* is a conv whose output reaches the values of an attention product (``p @ v``, the
  ``v`` of ``scaled_dot_product_attention``) through data movement only (reshapes, permutes,
  splits, spatial padding, sliding windows, copies). Each value channel passes through the mixing
  channel by channel, like a pooling: it comes out as one channel (one per head that reads it, for
  multi-query attention) of the value where the attention's output, moved back by reshapes and
  permutes, is read by something else. Its weight walk continues there, its lesions recompute from
  its own output;
* a *score layer* is a conv whose output only decides the mixing weights (queries, keys and their
  position terms: every path from it ends in a softmax or in the query/key side of a product before
  any layer or the output). Like attention scores in a transformer, it has no neurons and no edges.

A fused conv (``kv`` or ``qkv`` in one map) is a value layer: all its channels are neurons, and the
key or query channels among them have no outgoing edges. Where a value channel lands is found by
running the model once with the value layers' outputs replaced by their channel labels and each
mixing product replaced by the label of its contracted axis (``_channel_map``): exact for any
arrangement of reshapes and permutes, and it checks that every output channel carries exactly one
value channel across samples and positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from modlens.nn._ops import Route, UnsupportedModelError
from modlens.nn._scores import _SDPA, _mixes_tokens
from modlens.nn._stream import _MOVES, _passing, _users

_CARRY = _MOVES + ("split", "pad", "expand")   # kinds that move values without changing them
_WINDOWS = ("unfold", "getitem", "contiguous", "clone", "alias", "view", "unsqueeze", "squeeze", "transpose",
            "permute", "split", "select", "slice", "expand")


@dataclass
class ConvAttention:
    """The mixing layers of a CNN with attention: value layers with the routes of their channels past
    the mixing, and score layers (no neurons)."""

    routes: dict = field(default_factory=dict)   # value layer -> [(value after the mixing, Route), ...]
    scores: set = field(default_factory=set)     # score layers

    def walk(self, s, start: fx.Node, mode: str):
        """(sinks, stack entries) of a value or score layer's walk."""
        from modlens.nn._ops import Sink

        route = s.layer_route(start)
        if mode == "lesion":
            return [Sink("mask", start, u, route) for u in _users(s, start)], []
        return [], [(end, r, ()) for end, r in self.routes.get(start, [])]


def _name(node: fx.Node) -> str:
    t = node.target
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).split(".")[0]


def _carries(s, node: fx.Node) -> bool:
    """Whether ``node`` moves its one data input's values without changing them."""
    if len(s.tensor_inputs(node)) != 1:
        return False
    return s.kind(node) in _CARRY or _passing(s, node) or _name(node) in _WINDOWS


def _values_operand(s, product: fx.Node):
    """(values operand, contracted axis of it) of a mixing product, or None for a score product."""
    if product.target in _SDPA:
        v = product.args[2] if len(product.args) > 2 else product.kwargs.get("value")
        return (v, -2) if isinstance(v, fx.Node) else None
    if _name(product) not in ("matmul", "bmm") or len(product.args) < 2:
        return None
    a, b = product.args[:2]
    if _after_softmax(s, a):
        return b, -2
    if _after_softmax(s, b):
        return a, -1
    return None


def _after_softmax(s, node) -> bool:
    while isinstance(node, fx.Node):
        if "softmax" in _name(node):
            return True
        ins = s.tensor_inputs(node)
        if len(ins) != 1 or s.kind(node) == "layer":
            return False
        node = ins[0]
    return False


def _layers_behind(s, node: fx.Node, passes, *, strict: bool):
    """The layers whose outputs reach ``node`` through nodes that ``passes``; ``(layers, None)``. With
    ``strict``, the first node on the way that does not pass ends the search: ``(None, that node)``;
    otherwise such a node is only not walked through."""
    out, todo, seen = set(), [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if s.kind(n) == "layer":
            out.add(n)
        elif passes(n):
            todo.extend(s.tensor_inputs(n))
        elif strict:
            return None, n
    return out, None


def _back_to_layers(s, node: fx.Node):
    """(the layers whose outputs reach ``node`` through data movement only, None), or (None, the first
    operation on the way that changes the values: a norm, an activation, a sum)."""
    return _layers_behind(s, node, lambda n: _carries(s, n), strict=True)


def _reaches_softmax(s, node: fx.Node) -> bool:
    """Whether ``node``'s values reach a softmax before any layer or product (the scores ``q k^T``)."""
    todo, seen = [node], {node}
    while todo:
        for u in _users(s, todo.pop()):
            if "softmax" in _name(u):
                return True
            if u not in seen and s.kind(u) != "layer" and not _mixes_tokens(s, u):
                seen.add(u)
                todo.append(u)
    return False


def _refuse(s, product: fx.Node, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"attention in a conv network: {s.describe(product)} {what}; modlens follows such attention as softmax "
        "weights times values that one conv's output reaches by reshapes, permutes and splits only (HaloNet, "
        "BoTNet, MobileNet-V5): analyse a model without these blocks")


def _only_mixing(s, layer: fx.Node, values: set) -> bool:
    """Whether every path from ``layer`` ends in a mixing product or a softmax before reaching the model
    output or a layer other than a score layer (a position term ``q @ table`` written as a layer)."""
    todo, seen = [layer], {layer}
    while todo:
        for u in _users(s, todo.pop()):
            if u in seen:
                continue
            seen.add(u)
            if _mixes_tokens(s, u) or "softmax" in _name(u):
                continue
            if s.kind(u) == "layer" and u not in values and _only_mixing(s, u, values):
                continue
            if s.kind(u) in ("layer", "output", "final", "token_mix"):
                return False
            todo.append(u)
    return True


def find_conv_attention(s) -> ConvAttention | None:
    """The mixing layers of a model whose attention mixes the positions of conv feature maps, or None
    when its attention is not that (a transformer's, or values computed by more than data movement)."""
    products = [n for n in s.gm.graph.nodes if n in s.live and _mixes_tokens(s, n)]
    mixes = {}
    for p in products:
        hit = _values_operand(s, p)
        if hit is not None:
            mixes[p] = hit
    if not mixes or s.token_mixers or not any(
            isinstance(s.module(n), nn.Conv2d) and s.layer_route(n).dim == 1 for n in attention_inputs(s)):
        return None
    for p in products:
        if p not in mixes and not _reaches_softmax(s, p):
            raise _refuse(s, p, "multiplies two activations of which neither holds softmax weights and whose "
                                "product is no attention score (a lambda layer's queries times its lambda)")
    value_layers: set = set()
    for p, (v, _) in mixes.items():
        layers, blocker = _back_to_layers(s, v)
        if blocker is not None:
            raise _refuse(s, p, f"reads values computed by {s.describe(blocker)}, not only moved from a conv's "
                                "output")
        if any(s.layer_route(n).dim != 1 or (s.ndim(n) or 0) < 3 for n in layers):
            return None
        value_layers |= layers
    feeding = attention_inputs(s)
    scores = {n for n in feeding - value_layers if _only_mixing(s, n, value_layers)}
    if not all(_only_mixing(s, n, value_layers) for n in value_layers):
        return None
    ends = {p: _end(s, p) for p in mixes}
    if any(e is None for e in ends.values()):
        return None
    return ConvAttention(_channel_map(s, sorted(value_layers, key=s.all_nodes.index), mixes, ends), scores)


def attention_inputs(s) -> set:
    """The layers whose outputs reach a product of two activations (queries, keys, values) through anything
    but another layer or product."""
    products = [n for n in s.gm.graph.nodes if n in s.live and _mixes_tokens(s, n)]
    return {n for p in products for a in s.tensor_inputs(p) for n in _back_to_layers_any(s, a)}


def _back_to_layers_any(s, node: fx.Node) -> set:
    """The layers feeding ``node`` through anything but another layer or product (queries, keys)."""
    return _layers_behind(s, node, lambda n: not _mixes_tokens(s, n) and s.kind(n) != "input", strict=False)[0]


def _end(s, product: fx.Node):
    """The last value of the data movement after a mixing product (reshapes, permutes, copies back to
    a feature map), where something else reads it."""
    node = product
    while True:
        users = _users(s, node)
        if len(users) != 1 or not _carries(s, users[0]) or users[0].op == "output":
            return node if (s.ndim(node) or 0) >= 3 else None
        node = users[0]


def _channel_map(s, layers: list, mixes: dict, ends: dict) -> dict:
    """Value layer -> [(end, Route)]: where each value channel sits after the mixing."""
    labels: dict[fx.Node, tuple[int, int]] = {}   # layer -> (first label, width)
    first = 1
    for n in layers:
        width = s.layer_route(n).channels
        labels[n] = (first, width)
        first += width
    if first >= 2 ** 24:
        raise UnsupportedModelError(f"{first - 1} value channels of attention in a conv network: too many to "
                                    "label exactly; modlens follows up to 2**24 value channels")
    seen = _run_labelled(s, labels, mixes, set(ends.values()))
    out: dict = {n: [] for n in layers}
    for p, end in ends.items():
        value = seen[end]
        per = value.transpose(0, 1).reshape(value.shape[1], -1)
        lo, hi = per.min(1).values, per.max(1).values
        if not torch.equal(lo, hi) or bool((lo < 1).any()):
            raise UnsupportedModelError(
                f"the attention output {s.describe(end)} mixes value channels (or carries none) in some output "
                "channel; modlens follows attention in a conv network when each output channel is one value "
                "channel mixed over positions")
        source = lo.long().tolist()
        for n, (f, w) in labels.items():
            pairs = [(j, c - f) for j, c in enumerate(source) if f <= c < f + w]
            copies: list[dict] = []
            for j, c in pairs:    # one injective map per copy (multi-query attention: one per head)
                slot = next((m for m in copies if c not in m), None)
                if slot is None:
                    slot = {}
                    copies.append(slot)
                slot[c] = j
            for m in copies:
                pos = tuple(m.get(c, -1) for c in range(w))
                out[n].append((end, Route(0, None, False, s.ndim(end), 1, None, pos)))
    return out


def _run_labelled(s, labels: dict, mixes: dict, ends: set) -> dict:
    """Run the model once with each value layer's output replaced by its channel labels and each
    mixing product by the labels of its values along the contracted axis; the labels at ``ends``."""
    shape = s.shapes.get(s.input)
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise UnsupportedModelError(
            "cannot follow attention in a conv network without the feature maps' shapes: capture the model "
            "at an example input (pass data)")
    gm = s.gm
    param = next(gm.parameters(), None)
    if param is not None and param.dtype in (torch.float16, torch.bfloat16):   # labels up to 2**24 need float32
        gm = copy.deepcopy(gm).float()
        param = next(gm.parameters())
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    # keyed by name: the nodes of a copy are other objects with the same names
    labels_at = {n.name: fw for n, fw in labels.items()}
    mixes_at = {n.name: (n, v.name, axis) for n, (v, axis) in mixes.items()}
    ends_at = {n.name: n for n in ends}
    seen: dict = {}

    class Labelled(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in labels_at:
                f, w = labels_at[n.name]
                lab = torch.arange(f, f + w, **kw).reshape((1, w) + (1,) * (out.dim() - 2))
                out = lab.expand_as(out).clone()
            elif n.name in mixes_at:
                product, v, axis = mixes_at[n.name]
                vals = next(val for node, val in self.env.items() if node.name == v)
                top = vals.amax(axis, keepdim=True)
                if bool(((vals != top) & (vals != 0)).any()):
                    raise UnsupportedModelError(
                        f"the values of {s.describe(product)} mix several channels along the attention's positions; "
                        "modlens follows attention in a conv network when each value channel is mixed over "
                        "positions on its own")
                out = torch.broadcast_to(top, out.shape).clone()
            if n.name in ends_at:
                seen[ends_at[n.name]] = out
            return out

    gen = torch.Generator(kw.get("device", "cpu")).manual_seed(0)   # the global RNG is left alone
    with torch.no_grad():   # the modules keep their mode: only the labels matter, and they do not depend on x
        Labelled(gm).run(torch.randn((2,) + tuple(shape), generator=gen, **kw))
    return seen
