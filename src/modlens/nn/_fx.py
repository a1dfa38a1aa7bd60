"""torch.fx utilities: trace a model once, then cut its graph into probes and tails.

A *probe* computes chosen intermediate values from the model input (cloned the moment
they are produced, so a later in-place op cannot overwrite them). A *tail* computes the
model output from chosen intermediate values, so a lesion can restart the forward pass
from the first value it changes instead of from the input.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import fx, nn


class ModelTraceError(ValueError):
    """The model's forward could not be followed symbolically."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx, with an actionable error on failure."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelTraceError(
            f"modlens could not trace {type(model).__name__}.forward with torch.fx ({msg}). "
            "Data-dependent Python control flow cannot be traced: move it into a submodule and "
            "mark that submodule as a leaf, or pass modlens a module whose forward is a plain "
            "sequence of layers."
        ) from exc


def ancestors(outputs: Iterable[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """All nodes that ``outputs`` depend on, walking back but not past nodes in ``stop``."""
    seen: set[fx.Node] = set()
    todo = [n for n in outputs if n not in stop]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(a for a in node.all_input_nodes if a not in stop and a not in seen)
    return seen


def extract(
    gm: fx.GraphModule,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    *,
    clone_outputs: bool = False,
) -> fx.GraphModule:
    """A module computing ``outputs`` of ``gm``'s graph from the values of ``inputs``.

    Nodes are copied in the original order, so the result runs the same operations as the
    full model. With ``clone_outputs`` every output is cloned right after it is computed,
    before any later (possibly in-place) operation can modify it. The new module returns a
    tuple when several outputs are asked for.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"cut_{i}_{node.name}")
    needed = ancestors(outputs, set(inputs))
    clones: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in env or node not in needed:
            continue
        if node.op == "placeholder":
            raise ModelTraceError(
                f"the value '{outputs[0].name}' depends on the model input through '{node.name}' "
                "without passing through the cut; this architecture needs more cached inputs"
            )
        env[node] = graph.node_copy(node, lambda a: env[a])
        if clone_outputs and node in outputs:
            clones[node] = graph.call_method("clone", (env[node],))
    result = [clones.get(o, env[o]) for o in outputs]
    graph.output(result[0] if len(result) == 1 else tuple(result))
    return fx.GraphModule(gm, graph)


def single_input(gm: fx.GraphModule) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ModelTraceError(
            f"modlens analyses models with exactly one input tensor; this forward takes "
            f"{len(placeholders)} ({', '.join(p.name for p in placeholders)}). Wrap the model in a "
            "module whose forward takes one tensor."
        )
    return placeholders[0]


def single_output(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        raise ModelTraceError(
            "modlens needs a model that returns one tensor of class scores; this forward returns "
            f"{type(value).__name__}. Wrap it in a module that returns the logits tensor."
        )
    return value


def run_in_eval(module: nn.Module):
    """Context manager: put ``module`` in eval mode and restore its training flags after."""
    return _EvalMode(module)


class _EvalMode:
    def __init__(self, module: nn.Module):
        self.module = module
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def module_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32
