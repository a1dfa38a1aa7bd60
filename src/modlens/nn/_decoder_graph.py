"""The graph the decoder rewrites work on (:mod:`modlens.nn._decoder_capture`): which nodes are
live, which depend on the input, where new modules go, and the operation sets the patterns use."""

from __future__ import annotations

import torch
from torch import fx, nn

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
NONLINEAR = _ops("tanh", "erf", "exp", "sigmoid", "rsqrt", "sqrt", "relu", "gelu", "silu", "log", "reciprocal",
                  "sin", "cos", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "abs", "maximum", "minimum", "mish",
                  "softplus", "leaky_relu", "elu", "hardtanh", "clamp")
_LINEAR_EW = _ops("neg", "mul.Scalar", "add.Scalar", "sub.Scalar", "div.Scalar", "dropout", "mul.Tensor",
                  "add.Tensor", "sub.Tensor", "div.Tensor") | CASTS
ELEMENTWISE = NONLINEAR | _LINEAR_EW
ASSERTS = _ops("_assert_tensor_metadata")


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


__all__ = ["CASTS", "RESHAPES", "ELEMENTWISE", "NONLINEAR", "ASSERTS"]
