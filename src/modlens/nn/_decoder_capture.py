"""Capture rewrites for decoder language models (issue 18; docs/language-models.md, section 1).

:func:`rewrite` runs on the graph :mod:`modlens.nn._capture` built from ``torch.export`` and
replaces operation patterns that decoder families write out by nodes the operation registry
follows (:mod:`modlens.nn._decoder_ops`). Each rewrite is exact: it reuses the model's
parameters (shared, never copied) and, where it replaces several operations by one module, that
module runs the captured operations themselves.

1. **Linear maps written as** ``addmm`` / ``mm`` with a parameter (GPT-2's ``Conv1D``,
   ``addmm(b, x, W)`` with ``W`` of shape ``(in, out)``) become ``nn.Linear`` calls whose weight
   is a view of ``W.T``.
2. **Written-out RMS normalizations** (Llama, Qwen2, Mistral, Gemma:
   ``x * rsqrt(mean(x^2, -1, keepdim) + eps) * w`` with casts; Gemma's scale ``1 + w``) become
   one :class:`~modlens.nn._decoder_ops.WrittenNorm` each.
3. **Element-wise closures**: a value whose users branch into element-wise operations that join
   again into one value, with no other data input (``gelu_new``, ``x * sigmoid(x)``), becomes one
   :class:`~modlens.nn._decoder_ops.Elementwise`. A product of two different values (a GLU's
   ``act(gate(x)) * up(x)``) is not a closure and stays a gate.
4. **Merged rows** (OPT's MLP, and the ``Conv1D`` of 1): a ``(B, T, d)`` value reshaped to
   ``(B*T, d)``, passed through row-wise operations only (Linear, layer/RMS norm over the last
   dimension, element-wise operations, sums of such rows) and reshaped back to ``(B, T, d')``:
   both reshapes are dropped and the section runs on the 3-D value (the same numbers: every
   operation in it acts on each row alone).
5. **Last-token reads**: ``v[arange(B), idx]`` (``index.Tensor``, Hugging Face sequence
   classifiers) becomes :func:`~modlens.nn._decoder_ops.take_tokens`.

Graphs without these patterns come out unchanged.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from modlens.nn._decoder_ops import Elementwise, WrittenNorm, take_tokens
from modlens.nn._fx import extract

aten = torch.ops.aten


def _ops(*names: str) -> set:
    out = set()
    for name in names:
        base, _, overload = name.partition(".")
        packet = getattr(aten, base, None)
        if packet is not None and hasattr(packet, overload or "default"):
            out.add(getattr(packet, overload or "default"))
    return out


CASTS = _ops("_to_copy", "to.dtype", "to.dtype_layout", "to.device", "clone", "alias", "contiguous")
RESHAPES = _ops("view", "reshape", "_unsafe_view")
_NONLINEAR = _ops("tanh", "erf", "exp", "sigmoid", "rsqrt", "sqrt", "relu", "gelu", "silu", "log", "reciprocal",
                  "sin", "cos", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "abs", "maximum", "minimum", "mish",
                  "softplus", "leaky_relu", "elu", "hardtanh", "clamp")
_LINEAR_EW = _ops("neg", "mul.Scalar", "add.Scalar", "sub.Scalar", "div.Scalar", "dropout", "mul.Tensor",
                  "add.Tensor", "sub.Tensor", "div.Tensor") | CASTS
ELEMENTWISE = _NONLINEAR | _LINEAR_EW
_ASSERTS = _ops("_assert_tensor_metadata")


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(node) -> tuple | None:
    v = _val(node)
    return None if v is None else tuple(str(s) for s in v.shape)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len("model."):] if path.startswith("model.") else path


class _Graph:
    """The graph being rewritten and what the rewrites need to know about it."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.new: dict[str, nn.Module] = {}
        self.refresh()

    def refresh(self) -> None:
        nodes = list(self.graph.nodes)
        self.input = next((n for n in nodes if n.op == "placeholder"), None)
        out = next(n for n in nodes if n.op == "output")
        self.live = set()
        todo = [out]
        while todo:
            n = todo.pop()
            if n not in self.live:
                self.live.add(n)
                todo.extend(n.all_input_nodes)
        self.dynamic = set()
        todo = [self.input] if self.input is not None else []
        while todo:
            n = todo.pop()
            if n not in self.dynamic:
                self.dynamic.add(n)
                todo.extend(n.users)
        self.order = {n: i for i, n in enumerate(nodes)}
        self.seq = [n for n in nodes if n in self.live]
        self.pos = {n: i for i, n in enumerate(self.seq)}

    def after(self, node: fx.Node):
        """The live nodes after ``node``, in graph order."""
        return self.seq[self.pos[node] + 1:] if node in self.pos else []

    def users(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if u in self.live]

    def tensor(self, node) -> torch.Tensor | None:
        """The value of a node computed from parameters and constants only (None otherwise)."""
        if not isinstance(node, fx.Node) or node in self.dynamic:
            return None
        if node.op == "get_attr":
            return _attr(self.gm, node.target)
        return None

    def name(self, base: str, fallback: str) -> str:
        base = base or fallback
        taken = {final for final, _ in self.new.values()} | {
            n.target for n in self.graph.nodes if n.op == "call_module" and n.target not in self.new}
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_call{i}"
        return name

    def add_module(self, name: str, module: nn.Module, inputs: tuple, replaces: fx.Node) -> fx.Node:
        """Insert a call of ``module`` after ``replaces`` and route its uses there. The module sits
        under a temporary name until :func:`rewrite` gives it ``name`` (a module path the model's
        own parameters may still use while the pass runs)."""
        tmp = f"_modlens_rewrite_{len(self.new)}"
        self.new[tmp] = (name, module)
        self.gm.add_submodule(tmp, module)
        with self.graph.inserting_after(replaces):
            node = self.graph.call_module(tmp, inputs)
        node.meta = dict(replaces.meta)
        replaces.replace_all_uses_with(node)
        return node


# ----- 1. linear maps written as addmm / mm ------------------------------------------------------------
def _linear_maps(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
            continue
        if any(k in node.kwargs and node.kwargs[k] != 1 for k in ("beta", "alpha")):
            continue
        if node.target is aten.addmm.default:
            bias_node, x, w_node = node.args[:3]
        else:
            bias_node, (x, w_node) = None, node.args[:2]
        w = g.tensor(w_node)
        b = g.tensor(bias_node) if bias_node is not None else None
        if w is None or w.dim() != 2 or x not in g.dynamic or (bias_node is not None and (b is None or b.dim() != 1)):
            continue
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta")
        with torch.no_grad():
            weight = w.t()  # a view of the parameter (the layer shares it, never copies it)
        _share(lin, weight=weight, bias=b)
        base = w_node.target[: -len(".weight")] if w_node.target.endswith(".weight") else w_node.target
        g.add_module(g.name(base, node.name), lin, (x,), node)
    g.graph.eliminate_dead_code()
    g.refresh()


def _share(m: nn.Module, **tensors) -> None:
    for k, v in tensors.items():
        m._parameters.pop(k, None)
        if isinstance(v, nn.Parameter):
            setattr(m, k, v)
        else:
            setattr(m, k, v)


# ----- 2. written-out RMS normalizations -------------------------------------------------------------
def _through_casts_back(g: _Graph, node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in CASTS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _norm_at(g: _Graph, r: fx.Node):
    """(source, end, scale node or None, eps) of an RMS normalization whose rsqrt is ``r``, or None."""
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
    return _through_casts_back(g, xc), end, scale, float(eps[0])


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


def _written_norms(g: _Graph) -> None:
    for r in [n for n in g.graph.nodes if n.op == "call_function" and n.target is aten.rsqrt.default]:
        if r not in g.live or r not in g.dynamic:
            continue
        found = _norm_at(g, r)
        if found is None:
            continue
        source, end, scale, eps = found
        if _region(g, source, end) is None:
            continue
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
def _ew_operands(g: _Graph, node: fx.Node, members: set, width) -> bool | None:
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
        if not _ew_operands(g, node, members, width) or _shape(node) != shape:
            return None
        members.add(node)
        region.append(node)
        open_ = {m for m in members if any(u not in members for u in g.users(m))}
        if open_ == {node}:
            return region, node
    return None


def _closures(g: _Graph) -> None:
    for s in list(g.graph.nodes):
        if s not in g.live or s not in g.dynamic or s.op == "placeholder":
            continue
        found = _closure_from(g, s)
        if found is None:
            continue
        region, end = found
        names = tuple(str(getattr(n.target, "__name__", n.target)).split(".")[0] for n in region)
        joins = [n for n in region if sum(isinstance(a, fx.Node) and a in ({s} | set(region)) for a in n.args) >= 2]
        nonlinear = any(n.target in _NONLINEAR for n in region) or any(
            n.target in (aten.mul.Tensor, aten.div.Tensor) for n in joins)
        body = extract(g.gm, [s], [end])
        g.add_module(g.name(_module_path(end), end.name), Elementwise(body, names, nonlinear), (s,), end)
        g.graph.eliminate_dead_code()
        g.refresh()


# ----- 4. merged rows --------------------------------------------------------------------------------
_ROW_MODULES = (nn.Linear, Elementwise, WrittenNorm, nn.LayerNorm, nn.RMSNorm)


def _row_module(g: _Graph, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = g.gm.get_submodule(node.target)
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return len(m.normalized_shape) == 1
    return isinstance(m, _ROW_MODULES)


def _merged_rows(g: _Graph) -> None:
    for r in list(g.graph.nodes):
        if r.op != "call_function" or r.target not in RESHAPES or r not in g.live:
            continue
        src, out = _val(r.args[0]), _val(r)
        if src is None or out is None or src.dim() != 3 or out.dim() != 2 or str(out.shape[1]) != str(src.shape[2]):
            continue
        if str(out.shape[0]) != str(src.shape[0] * src.shape[1]):
            continue
        rows = (str(src.shape[0]), str(src.shape[1]))
        members, region, backs = {r}, [], []
        ok = True
        pending = len(g.users(r))  # uses of member values not yet met
        for node in g.after(r):
            if pending == 0:
                break
            if not (set(node.all_input_nodes) & members):
                continue
            pending -= sum(1 for a in node.all_input_nodes if a in members)
            val = _val(node)
            if node.op == "call_function" and node.target in RESHAPES and val is not None and val.dim() == 3 \
                    and (str(val.shape[0]), str(val.shape[1])) == rows:
                backs.append(node)
                continue
            dyn_outside = [a for a in node.all_input_nodes if a in g.dynamic and a not in members]
            if dyn_outside or val is None or val.dim() != 2 or not (_row_module(g, node) or _ew_operands(
                    g, node, members, str(val.shape[1]))):
                ok = False
                break
            members.add(node)
            region.append(node)
            pending += len(g.users(node))
        if not ok or not backs or not region:
            continue
        b_sym, t_sym = src.shape[0], src.shape[1]
        for node in region:
            v = _val(node)
            node.meta["val"] = v.view(b_sym, t_sym, *v.shape[1:])
        r.replace_all_uses_with(r.args[0])
        for back in backs:
            back.replace_all_uses_with(back.args[0])
        g.graph.eliminate_dead_code()
        g.refresh()


# ----- 5. last-token reads ---------------------------------------------------------------------------
def _token_reads(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        v, index = node.args[0], node.args[1]
        val = _val(v)
        if val is None or val.dim() < 2 or not isinstance(index, (list, tuple)) or len(index) != 2:
            continue
        rows, pos = index
        rows_val, pos_val = _val(rows), _val(pos)
        if rows_val is None or pos_val is None or pos_val.dim() != 1 or rows_val.dim() != 1:
            continue
        if not str(getattr(rows.target, "__name__", "")).startswith("arange"):
            continue
        if str(rows_val.shape[0]) != str(val.shape[0]) or str(pos_val.shape[0]) != str(val.shape[0]):
            continue
        with g.graph.inserting_after(node):
            new = g.graph.call_function(take_tokens, (v, pos))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
    g.graph.eliminate_dead_code()
    g.refresh()


# ----- the pass ----------------------------------------------------------------------------------------
def rewrite(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the patterns of the module docstring replaced (a new GraphModule sharing the
    model's parameters; ``gm`` itself unchanged only where nothing matched)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    g = _Graph(gm)
    if g.input is None:
        return gm
    _linear_maps(g)
    _written_norms(g)
    _closures(g)
    _merged_rows(g)
    _token_reads(g)
    graph = g.graph
    graph.eliminate_dead_code()
    used = [n for n in graph.nodes if n.op in ("get_attr", "call_module")]
    root = {}
    for node in used:
        if node.op == "call_module" and node.target in g.new:
            name, module = g.new[node.target]
            # a new module must not sit where a parameter still in use lives
            while any(o.target.startswith(name + ".") for o in used if o.target not in g.new):
                name = name + "_fn"
            node.target = name
            root[name] = module
        else:
            root[node.target] = gm.get_submodule(node.target) if node.op == "call_module" else _attr(gm, node.target)
    out = fx.GraphModule(root, graph, type(gm).__name__)
    out.graph.lint()
    return out


__all__ = ["rewrite", "CASTS", "RESHAPES", "ELEMENTWISE"]
