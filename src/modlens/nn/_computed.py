"""Layers whose weight is computed from parameters (issue 20): a constant of the captured graph.

Some models compute a layer's weight in ``forward`` from parameters and buffers only, without the
input: weight standardization (timm's ``ScaledStdConv2d`` in NFNets: ``F.conv2d(x, standardize(W) *
gain)``), a parameter transposed or rescaled before ``F.linear``, a functional ``F.conv2d(x,
self.weight)`` that torch.fx traces through, or ``x @ W`` with a 2-D parameter ``W``. Such a weight
is the same for every input: :func:`computed_layers` evaluates it once, at capture, and turns the
operation into an ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` module holding that *effective*
weight (a buffer, not a parameter of the user's model):

* the weight graph reads the effective weight;
* a lesion of the layer's inputs zeroes the effective weight's columns (the plain oracle edits its
  copy of that buffer, never the user's parameters) and a lesion of its outputs zeroes its
  channels, exactly as for any other layer: the layer computes ``conv(x, W_eff)`` whatever ``W_eff``
  was computed from.

A weight that is a parameter itself (``F.conv2d(x, self.weight)``) is shared, not copied. A
computed weight is a snapshot: parameters changed after capture are not seen by the captured
graph (capture again after training). A product with a constant on the left (``W @ x``), or with
a weight of more than two dimensions, is left as it is (and refused by the structure when it is a
layer).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

_CONV = {F.conv1d: 1, F.conv2d: 2, torch.conv1d: 1, torch.conv2d: 2, aten.conv1d.default: 1,
         aten.conv2d.default: 2, aten.conv1d.padding: 1, aten.conv2d.padding: 2}
_LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default}
#: normalizations (export's aten ops) and the argument positions of their affine weight and bias
_NORMS = {aten.layer_norm.default: (2, 3), aten.group_norm.default: (2, 3), aten.rms_norm.default: (2,)}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return list(seen)


class _Constants:
    """Which values of ``gm`` depend on the input, and the value of those that do not."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.order = order
        self.dynamic: set[fx.Node] = set()
        for n in gm.graph.nodes:
            if n.op == "placeholder" or any(a in self.dynamic for a in n.all_input_nodes):
                self.dynamic.add(n)
        self.values: dict[fx.Node, object] = {}

    def constant(self, node) -> bool:
        return isinstance(node, fx.Node) and node not in self.dynamic and node.op != "output"

    @torch.no_grad()
    def value(self, node: fx.Node):
        for n in sorted(_ancestors(node), key=self.order.__getitem__):
            if n in self.values:
                continue
            args = fx.node.map_arg(n.args, self.values.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, self.values.__getitem__)
            if n.op == "get_attr":
                self.values[n] = _get_attr(self.gm, n.target)
            elif n.op == "call_function":
                self.values[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                self.values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "call_module":
                self.values[n] = self.gm.get_submodule(n.target)(*args, **kwargs)
            else:
                raise ValueError(f"not a constant: {n}")
        return self.values[node]

    def tensor(self, node) -> torch.Tensor | None:
        """The parameter or buffer itself (``get_attr``), or a computed value (detached), or None."""
        if node is None:
            return None
        v = self.value(node)
        if not isinstance(v, torch.Tensor):
            return None
        if node.op == "get_attr":
            return v
        return v.detach().clone().contiguous()


def _base_name(node: fx.Node, weight: fx.Node) -> str:
    """The module path of the parameter the weight is computed from (``stem.conv1`` for
    ``stem.conv1.weight``), else the path of its only parameter (``attn.w_g``), else the module the
    operation runs in, else the node's name."""
    attrs = sorted(a.target for a in _ancestors(weight) if a.op == "get_attr")
    for t in attrs:
        if t.endswith(".weight"):
            return t[: -len(".weight")]
    if len(attrs) == 1:
        return attrs[0]
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    path = path[len("model."):] if path.startswith("model.") else "" if path == "model" else path
    return path or node.name


def _place(m: nn.Module, name: str, t: torch.Tensor | None) -> None:
    m._parameters.pop(name, None)
    if t is None or isinstance(t, nn.Parameter):
        setattr(m, name, t)
    else:
        m.register_buffer(name, t)


def _module(node: fx.Node, c: _Constants) -> nn.Module | None:
    """The layer module equivalent to ``node``, or None when it is not a layer with a constant weight."""
    t = node.target
    x = _arg(node, 0, "input")
    if not isinstance(x, fx.Node) or x not in c.dynamic:
        return None
    if t in _CONV or t in _LINEAR:
        w_node, b_node = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not c.constant(w_node) or (b_node is not None and not c.constant(b_node)):
            return None
        w, b = c.tensor(w_node), c.tensor(b_node)
        if w is None or (b_node is not None and b is None):
            return None
        if t in _LINEAR:
            if w.dim() != 2:
                return None
            m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        else:
            d = _CONV[t]
            if w.dim() != d + 2:
                return None
            stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
            dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
            if any(isinstance(v, fx.Node) for v in (stride, padding, dilation, groups)):
                return None
            cls = nn.Conv2d if d == 2 else nn.Conv1d
            m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                    dilation=dilation, groups=groups, bias=b is not None, device="meta")
    elif t in _NORMS:
        return _norm_module(node, c)
    elif t in _MATMUL:
        w_node = node.args[1] if len(node.args) > 1 else None
        if not c.constant(w_node):
            return None
        w = c.value(w_node)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        # x @ W = linear(x, W.T): a view of a parameter (shared), a copy of a computed W
        w, b = (w.detach().t() if w_node.op == "get_attr" else w.detach().t().clone().contiguous()), None
        m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    else:
        return None
    _place(m, "weight", w)
    _place(m, "bias", b)
    return m.eval()


def _norm_module(node: fx.Node, c: _Constants) -> nn.Module | None:
    """The norm module equivalent to a LayerNorm, GroupNorm or RMSNorm whose scale or shift is
    computed from parameters (timm's ``RmsNormFp32``: ``weight.float()``; Nemotron's ``1 + weight``)."""
    t, args = node.target, list(node.args) + [None] * 6
    affine = [args[i] for i in _NORMS[t]]
    if any(a is not None and not c.constant(a) for a in affine):
        return None
    w, b = (c.tensor(a) for a in (affine + [None])[:2])
    if any(a is not None and v is None for a, v in zip(affine, (w, b))):
        return None
    if t is aten.layer_norm.default:
        m = nn.LayerNorm(list(args[1]), eps=float(args[4] if args[4] is not None else 1e-5),
                         elementwise_affine=w is not None, bias=b is not None, device="meta")
    elif t is aten.rms_norm.default:
        m = nn.RMSNorm(list(args[1]), eps=args[3], elementwise_affine=w is not None, device="meta")
    else:
        channels = _arg(node, 0, "input").meta["val"].shape[1]
        m = nn.GroupNorm(int(args[1]), int(channels), eps=float(args[4] if args[4] is not None else 1e-5),
                         affine=w is not None, device="meta")
    _place(m, "weight", w)
    if t is not aten.rms_norm.default:
        _place(m, "bias", b)
    return m.eval()


def computed_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every functional linear map whose weight is a constant (a parameter, or a value
    computed from parameters and buffers only) replaced by a layer module; see the module docstring.
    Unchanged (the same object) when there is none."""
    c = _Constants(gm)
    made: list[tuple[fx.Node, str, nn.Module]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not (node.target in _CONV or node.target in _LINEAR or node.target in _MATMUL
                                               or node.target in _NORMS):
            continue
        m = _module(node, c)
        if m is None:
            continue
        base = _base_name(node, node.args[2] if node.target in _NORMS else _arg(node, 1, "weight"))
        tmp = f"_modlens_new_{len(made)}"
        gm.add_submodule(tmp, m)   # the user's model is not touched: gm is the captured graph's own root
        with gm.graph.inserting_before(node):
            layer = gm.graph.call_module(tmp, (node.args[0],))
        layer.meta = dict(node.meta)
        node.replace_all_uses_with(layer)
        gm.graph.erase_node(node)
        made.append((layer, base, m))
    if not made:
        return gm
    return rebuild(gm, [(layer, base, m) for layer, base, m in made])


def rebuild(gm: fx.GraphModule, made: list[tuple[fx.Node, str, nn.Module]]) -> fx.GraphModule:
    """A new graph module for ``gm``'s graph, dead code removed, in which each ``(node, base, module)``
    of ``made`` (a ``call_module`` node registered under a temporary name) gets ``module`` under
    ``base`` (or ``base_call2``, ... where another attribute is there). The modules of ``gm`` are
    shared, never changed: the user's model is not touched."""
    gm.graph.eliminate_dead_code()
    temps = {layer.target for layer, _, _ in made}
    root: dict[str, object] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target not in temps:
            root[n.target] = gm.get_submodule(n.target)
        elif n.op == "get_attr":
            root[n.target] = _get_attr(gm, n.target)
    for layer, base, m in made:   # named by the parameters' module where no other attribute is there
        name, i = base, 1
        while any(t == name or t.startswith(name + ".") or name.startswith(t + ".") for t in root):
            i += 1
            name = f"{base}_call{i}"
        root[name] = m
        layer.target = name
    out = fx.GraphModule(root, gm.graph, type(gm).__name__)
    out.meta.update(gm.meta)
    return out
