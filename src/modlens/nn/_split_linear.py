"""A Linear whose output is cut in two halves that a spatial gating unit joins becomes two Linears (issue 20).

gMLP's channel MLP computes ``fc1`` (d -> 2h), an activation, then ``u, v = x.chunk(2, dim=-1)``:
the spatial gating unit multiplies ``u`` by ``proj(norm(v)^T)^T``, ``proj`` a Linear over tokens.
After the cut, each half is a map of its own from the same input, so :func:`split_linears` replaces
``fc1`` by ``fc1_part1`` (rows ``:h``) and ``fc1_part2`` (rows ``h:``), each followed by its own copy
of the element-wise operations between ``fc1`` and the cut, where the two halves meet again in a
product after one of them went through a Linear. A cut whose halves are used apart stays a channel
split of one layer, and a fused GLU (``x1 * act(x2)``) is left to the transformer MLP reading. The
two modules share views of ``fc1``'s weight and bias (never copies) and compute the same numbers;
the transformer MLP reading (:mod:`modlens.nn._transformer`) sees them as the two maps of one gated
MLP whose gate branch runs through the spatial gating unit.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from modlens.nn._computed import rebuild
from modlens.nn._registry import ACTIVATIONS, PASSING

aten = torch.ops.aten
_CHUNK = {torch.chunk, aten.chunk.default, "chunk"}
_SPLIT = {torch.split, aten.split.Tensor, "split"}
_SPLIT_SIZES = {aten.split_with_sizes.default, "split_with_sizes"}


def _elementwise(node: fx.Node, src: fx.Node, gm: fx.GraphModule) -> bool:
    """An activation or pass-through (dropout, copy) of ``src`` alone."""
    if [a for a in node.all_input_nodes] != [src] or not node.args or node.args[0] is not src:
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATIONS.modules + PASSING.modules)
    if node.op == "call_function":
        return node.target in ACTIVATIONS.functions or node.target in PASSING.functions
    return node.op == "call_method" and (node.target in ACTIVATIONS.methods or node.target in PASSING.methods)


def _last_dim(dim, node: fx.Node) -> bool:
    val = node.meta.get("val")
    return dim == -1 or (isinstance(val, torch.Tensor) and isinstance(dim, int) and dim == val.dim() - 1)


def _halves(cut: fx.Node, src: fx.Node, width: int) -> list[fx.Node] | None:
    """The two ``getitem`` users of ``cut`` when it cuts ``src`` into two equal halves along its last
    dimension, else None."""
    t = cut.target
    args = list(cut.args[1:])
    kwargs = dict(cut.kwargs)

    def arg(i, key, default):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if cut.args[0] is not src or len(cut.all_input_nodes) != 1:
        return None
    if t in _CHUNK:
        ok = arg(0, "chunks", None) == 2 and _last_dim(arg(1, "dim", 0), src)
    elif t in _SPLIT:
        ok = arg(0, "split_size_or_sections" if t is torch.split else "split_size", None) in (
            width // 2, [width // 2] * 2) and _last_dim(arg(1, "dim", 0), src)
    elif t in _SPLIT_SIZES:
        ok = list(arg(0, "split_sizes", [])) == [width // 2] * 2 and _last_dim(arg(1, "dim", 0), src)
    else:
        ok = False
    if not ok or width % 2:
        return None
    users = list(cut.users)
    if (len(users) != 2 or any(u.target is not operator.getitem for u in users)
            or sorted(u.args[1] for u in users) != [0, 1]):
        return None
    return sorted(users, key=lambda u: u.args[1])


_MUL = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}


def _path(node: fx.Node, steps: int = 16) -> list[fx.Node]:
    """The nodes after ``node`` while each value has one user (at most ``steps``)."""
    out = []
    while len(node.users) == 1 and len(out) < steps:
        node = next(iter(node.users))
        out.append(node)
    return out


def _spatially_gated(halves: list[fx.Node], gm: fx.GraphModule) -> bool:
    """Whether the two halves meet again in a product after one of them went through a Linear (gMLP's
    ``u * proj(norm(v)^T)^T``). Halves used apart stay parts of one layer (a channel split), and a
    fused GLU (``x1 * act(x2)``, no map between the cut and the product) is read by the transformer
    MLP reading as it is."""
    paths = [_path(h) for h in halves]
    meet = next((n for n in paths[1] if n in paths[0]), None)
    if meet is None or meet.target not in _MUL:
        return False
    before = [n for p in paths for n in p[:p.index(meet)]]
    return any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear) for n in before)


def _part(lin: nn.Linear, i: int) -> nn.Linear:
    h = lin.out_features // 2
    rows = slice(i * h, (i + 1) * h)
    m = nn.Linear(lin.in_features, h, bias=lin.bias is not None, device="meta")
    for name in ("weight", "bias"):
        t = getattr(lin, name)
        m._parameters.pop(name, None)
        if t is not None:
            m.register_buffer(name, t.detach()[rows])   # a view: the part shares the layer's parameter
        else:
            setattr(m, name, None)
    return m.eval()


def split_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every Linear whose output (after element-wise operations) is cut into two equal
    halves along the features replaced by one Linear per half; unchanged when there is none."""
    made = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Linear:
            continue
        lin = gm.get_submodule(node.target)
        chain, cur, halves = [], node, None
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            halves = _halves(u, cur, lin.out_features)
            if halves is not None or not _elementwise(u, cur, gm):
                break
            chain.append(u)
            cur = u
        if halves is None or not _spatially_gated(halves, gm):
            continue
        for i, item in enumerate(halves):
            tmp = f"_modlens_new_{id(node)}_{i}"
            gm.add_submodule(tmp, _part(lin, i))
            with gm.graph.inserting_before(item):
                new = gm.graph.call_module(tmp, node.args, dict(node.kwargs))
                new.meta = dict(node.meta)
                env = {node: new}
                for c in chain:
                    env[c] = gm.graph.node_copy(c, lambda a: env[a])
                    env[c].meta = dict(c.meta)
            for n in [new, *(env[c] for c in chain)]:
                if "val" in item.meta:
                    n.meta["val"] = item.meta["val"]
            item.replace_all_uses_with(env[cur])
            made.append((new, f"{node.target}_part{i + 1}", None))
    if not made:
        return gm
    return rebuild(gm, [(n, base, gm.get_submodule(n.target)) for n, base, _ in made])
