"""Decoder rewrites that replace several operations by one module (:mod:`modlens.nn._decoder_capture`):
written-out RMS normalizations (:class:`~modlens.nn._decoder_ops.WrittenNorm`) and element-wise
closures (:class:`~modlens.nn._decoder_ops.Elementwise`). Each module runs the captured operations
themselves."""

from __future__ import annotations

import torch
from torch import fx

from modlens.nn._decoder_graph import CASTS, ELEMENTWISE, NONLINEAR, _Graph, _module_path, _shape, _val
from modlens.nn._decoder_ops import Elementwise, WrittenNorm
from modlens.nn._fx import extract

aten = torch.ops.aten


# ----- 2. written-out RMS normalizations -------------------------------------------------------------
def _through_casts_back(g: _Graph, node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in CASTS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _norm_at(g: _Graph, r: fx.Node):
    """(source, end, scale node or None, eps, read) of an RMS normalization whose rsqrt is ``r``, or
    None; ``read`` is the node the squares are taken of (``source`` or a cast of it)."""
    a = r.args[0]
    if not (isinstance(a, fx.Node) and a.target in (aten.add.Tensor, aten.add.Scalar)):
        return None
    ops = [x for x in a.args if isinstance(x, fx.Node)]
    eps = [x for x in a.args if _scalar(x)]
    if len(ops) != 1 or len(eps) != 1:
        return None
    m = ops[0]
    if m.target is not aten.mean.dim or len(m.args) < 3 or not m.args[2]:
        return None
    dims = list(m.args[1]) if isinstance(m.args[1], (list, tuple)) else [m.args[1]]
    val = _val(m.args[0])
    if val is None or len(dims) != 1 or dims[0] not in (-1, val.dim() - 1):
        return None
    p = m.args[0]
    if p.target is aten.pow.Tensor_Scalar and p.args[1] == 2:
        xc = p.args[0]
    elif p.target is aten.mul.Tensor and p.args[0] is p.args[1]:
        xc = p.args[0]
    else:
        return None
    prod = [u for u in g.users(r) if u.target is aten.mul.Tensor and set(u.args[:2]) == {xc, r}]
    if len(g.users(r)) != 1 or len(prod) != 1:
        return None
    end, scale = prod[0], None
    while True:  # casts and at most one multiplication by a per-channel scale computed from parameters
        users = g.users(end)
        if len(users) != 1:
            break
        u = users[0]
        if u.target in CASTS or (u.target is aten.type_as.default and u.args[0] is end):
            end = u
            continue
        if scale is None and u.target is aten.mul.Tensor:
            other = [x for x in u.args[:2] if x is not end]
            if len(other) == 1 and isinstance(other[0], fx.Node) and other[0] not in g.dynamic:
                val = _val(other[0])
                if val is not None and val.dim() == 1:
                    end, scale = u, other[0]
                    continue
        break
    return _through_casts_back(g, xc), end, scale, float(eps[0]), xc


def _region(g: _Graph, source: fx.Node, end: fx.Node) -> list[fx.Node] | None:
    """The nodes that depend on ``source`` and that ``end`` depends on (``end`` included), in order,
    when no other data enters them and nothing outside uses their values; else None."""
    ancestors, todo = set(), [end]
    while todo:
        n = todo.pop()
        if n in ancestors or n is source:
            continue
        ancestors.add(n)
        todo.extend(a for a in n.all_input_nodes if a in g.dynamic)
    region = sorted(ancestors, key=g.order.__getitem__)
    inside = set(region) | {source}
    for n in region:
        if any(a in g.dynamic and a not in inside for a in n.all_input_nodes):
            return None
        if n is not end and any(u not in inside for u in g.users(n)):
            return None
    return region


def written_norms(g: _Graph) -> None:
    for r in [n for n in g.graph.nodes if n.op == "call_function" and n.target is aten.rsqrt.default]:
        if r not in g.live or r not in g.dynamic:
            continue
        found = _norm_at(g, r)
        if found is None:
            continue
        source, end, scale, eps, read = found
        if _region(g, source, end) is None:
            # a cast to the dtype a value already has (``x.to(torch.float32)`` in a float32 model)
            # returns the value itself, and the trace routes the residual stream on through the
            # cast node; the normalization then starts at that node (the same value)
            if read is source or _region(g, read, end) is None:
                continue
            source = read
        body = extract(g.gm, [source], [end])
        scale_body = None if scale is None else extract(g.gm, [], [scale])
        weight = next((a.target for a in _param_ancestors(scale)), "") if scale is not None else ""
        base = weight[: -len(".weight")] if weight.endswith(".weight") else _module_path(end)
        g.add_module(g.name(base, end.name), WrittenNorm(body, scale_body, eps), (source,), end)
    g.graph.eliminate_dead_code()
    g.refresh()


def _param_ancestors(node: fx.Node) -> list[fx.Node]:
    out, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            out.append(n)
        todo.extend(n.all_input_nodes)
    return out


# ----- 3. element-wise closures ----------------------------------------------------------------------
def ew_operands(g: _Graph, node: fx.Node, members: set, width) -> bool | None:
    """Whether ``node`` is an element-wise op of member values and constants (None: it is not
    element-wise at all)."""
    if node.op != "call_function" or node.target not in ELEMENTWISE:
        return None
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            if a in members:
                continue
            if a in g.dynamic:
                return False
            val = _val(a)
            if val is not None and not (val.numel() == 1 or (val.dim() == 1 and str(val.shape[0]) == width)):
                return False
        elif isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            return False
    return True


def _closure_from(g: _Graph, s: fx.Node):
    """(region, end) of an element-wise closure starting at ``s``, or None."""
    shape = _shape(s)
    if shape is None or len(g.users(s)) < 2:
        return None
    width = shape[-1]
    members, region = {s}, []
    for node in g.after(s):
        if not (set(node.all_input_nodes) & members):
            continue
        if not ew_operands(g, node, members, width) or _shape(node) != shape:
            return None
        members.add(node)
        region.append(node)
        open_ = {m for m in members if any(u not in members for u in g.users(m))}
        if open_ == {node}:
            return region, node
    return None


def closures(g: _Graph) -> None:
    for s in list(g.graph.nodes):
        if s not in g.live or s not in g.dynamic or s.op == "placeholder":
            continue
        found = _closure_from(g, s)
        if found is None:
            continue
        region, end = found
        names = tuple(str(getattr(n.target, "__name__", n.target)).split(".")[0] for n in region)
        joins = [n for n in region if sum(isinstance(a, fx.Node) and a in ({s} | set(region)) for a in n.args) >= 2]
        nonlinear = any(n.target in NONLINEAR for n in region) or any(
            n.target in (aten.mul.Tensor, aten.div.Tensor) for n in joins)
        body = extract(g.gm, [s], [end])
        g.add_module(g.name(_module_path(end), end.name), Elementwise(body, names, nonlinear), (s,), end)
        g.graph.eliminate_dead_code()
        g.refresh()


__all__ = ["written_norms", "closures", "ew_operands"]
