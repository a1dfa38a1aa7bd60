"""torch.fx utilities: trace a model once, then cut its graph into probes and tails.

A *probe* computes chosen intermediate values from the model input (cloned, or reduced,
the moment they are produced, so a later in-place op cannot overwrite them). A *tail*
computes the model output from chosen intermediate values (several cut inputs: corrected
consumer outputs, masked join inputs and cached unaffected values such as a residual skip),
so a lesion restarts the forward pass where it first changes something.
"""

from __future__ import annotations

import operator
import traceback
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import fx, nn


class ModelTraceError(ValueError):
    """The model's forward could not be followed symbolically."""


_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class _Tracer(fx.Tracer):
    """fx tracer that remembers which submodule it was in when tracing failed, and treats
    the modules named in ``leaves`` (qualified names or classes) as opaque leaves."""

    def __init__(self, leaves: Iterable = ()):
        super().__init__()
        self.leaf_names = {l for l in leaves if isinstance(l, str)}
        self.leaf_types = tuple(l for l in leaves if isinstance(l, type))
        self.stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            name = self.path_of_module(m)
        except NameError:
            name = "?"
        self.stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _user_frame(exc: BaseException) -> str:
    """'file:line: source' of the innermost traceback frame outside torch (the user's code)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_TORCH_DIR) and f.name != "call_module"
              and not f.filename.endswith("_capture.py")]
    if not frames:
        return ""
    f = frames[-1]
    line = (f.line or "").strip()
    return f", at {Path(f.filename).name}:{f.lineno} in {f.name}()" + (f": `{line}`" if line else "")


def trace(model: nn.Module, leaf_modules: Iterable = (), name: str | None = None, prefix: str = "model.") -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx; on failure raise :class:`ModelTraceError`
    naming the submodule and source line that could not be traced and how to wrap it."""
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = ""
        inner = [(s[0][len(prefix):] if s[0].startswith(prefix) else s[0], s[1])
                 for s in (tracer.failed_in or []) if s[0] not in ("", "?", prefix.rstrip("."))]
        if inner:
            name, kind = inner[-1]
            where = f" inside submodule '{name}' ({kind})"
        hint = (f"pass leaf_modules=['{inner[-1][0]}'] to the adapter to keep it opaque (allowed when it acts "
                "on each channel separately, like an activation), or " if inner else "")
        raise ModelTraceError(
            f"modlens could not trace {name or type(model).__name__}.forward with torch.fx{where}: {msg}"
            f"{_user_frame(exc)}. Data-dependent Python control flow cannot be traced: {hint}move it into a "
            "submodule and mark that submodule as a leaf, or pass modlens a module whose forward is a plain "
            "sequence of layers."
        ) from exc
    for node in graph.nodes:   # aliases read as the operation they name (torchvision's MaxViT swaps axes)
        if node.op == "call_function" and node.target in (torch.swapaxes, torch.swapdims):
            node.target = torch.transpose
        elif node.op == "call_method" and node.target in ("swapaxes", "swapdims"):
            node.target = "transpose"
    return fx.GraphModule(tracer.root, graph, name or type(model).__name__)


def mutates(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` writes into the value of ``node`` in place (``copy_``, ``masked_fill_``,
    ``x[i] = v``): an exported graph keeps such writes (BART's ``shift_tokens_right``), and a later
    reader of ``node`` sees them although it does not depend on ``user`` in the graph."""
    if user.op == "call_method":
        return isinstance(user.target, str) and user.target.endswith("_") and bool(user.args) and user.args[0] is node
    if user.op != "call_function":
        return False
    if user.target is operator.setitem:
        return bool(user.args) and user.args[0] is node
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
            if value is node:
                return True
    return False


def ancestors(outputs: Iterable[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """All nodes that ``outputs`` depend on, walking back but not past nodes in ``stop``; with every
    in-place write into one of them (and what that write depends on)."""
    seen: set[fx.Node] = set()
    todo = [n for n in outputs if n not in stop]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(a for a in node.all_input_nodes if a not in stop and a not in seen)
        todo.extend(u for u in _writes_into(node) if u not in stop and u not in seen)
    return seen


def _is_view(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` returns a view of ``node`` (``slice``, ``select``, ``view``: writes into it write into ``node``)."""
    schema = getattr(user.target, "_schema", None) if user.op == "call_function" else None
    if schema is None or not user.args or user.args[0] is not node or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _writes_into(node: fx.Node) -> list[fx.Node]:
    """In-place writes into ``node``'s value, directly or through views of it (``x[:, 1:] = y`` is
    ``copy_(slice(x), y)``), with the views they write through."""
    out = []
    for user in node.users:
        if mutates(user, node):
            out.append(user)
        elif _is_view(user, node):
            inner = _writes_into(user)
            if inner:
                out.extend([user, *inner])
    return out


def descendants(sources: Iterable[fx.Node], within: set[fx.Node] | None = None) -> set[fx.Node]:
    """All nodes that depend on ``sources`` (excluding the sources), optionally only within ``within``."""
    seen: set[fx.Node] = set()
    todo = [u for s in sources for u in s.users]
    while todo:
        node = todo.pop()
        if node in seen or (within is not None and node not in within):
            continue
        seen.add(node)
        todo.extend(node.users)
    return seen


def extract(
    gm: fx.GraphModule,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    *,
    clone_outputs: bool = False,
    post: Callable | None = None,
    edges: Sequence[tuple[fx.Node, Sequence[fx.Node], Callable, tuple]] = (),
) -> fx.GraphModule:
    """A module computing ``outputs`` of ``gm``'s graph from the values of ``inputs``.

    ``inputs`` may hold several cut nodes; every value the outputs need must come from them
    (otherwise :class:`ModelTraceError` names the value and the missing path). Nodes are
    copied in the original order, so the result runs the same operations as the full model.
    With ``clone_outputs`` (or a ``post`` function, e.g. a spatial reduction) every output is
    cloned (or reduced) right after it is computed, before any later, possibly in-place,
    operation can modify it. Returns a tuple when several outputs are asked for.

    ``edges`` are ``(value, users, fn, args)``: the module gets one more input per edge, after
    those of ``inputs``, and each of ``users`` reads ``fn(value, that input, *args)`` in place
    of ``value`` (a mask on the edges from a recomputed value into the operations that read it).
    """
    posts = list(post) if isinstance(post, (list, tuple)) else [post] * len(outputs)
    post_of = {o: p for o, p in zip(outputs, posts)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"cut_{i}_{node.name}")
    edge_inputs = [graph.placeholder(f"edge_{i}_{value.name}") for i, (value, *_) in enumerate(edges)]
    edge_of: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
    for i, (value, users, *_) in enumerate(edges):
        for user in users:
            edge_of.setdefault(user, []).append((value, i))
    edited: dict[int, fx.Node] = {}
    needed = ancestors(outputs, set(inputs))
    finals: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in env or node not in needed:
            continue
        if node.op == "placeholder":
            users = [u.name for u in node.users if u in needed]
            raise ModelTraceError(
                f"the value '{outputs[0].name}' depends on the model input '{node.name}' through "
                f"{', '.join(users)} without passing through the cut inputs "
                f"({', '.join(n.name for n in inputs)}); this cut needs more cached inputs"
            )
        swap = {}
        for value, i in edge_of.get(node, ()):
            if i not in edited:
                edited[i] = graph.call_function(edges[i][2], (env[value], edge_inputs[i], *edges[i][3]))
            swap[value] = edited[i]
        env[node] = graph.node_copy(node, lambda a: swap.get(a, env[a]))
        if node in outputs:
            if post_of.get(node) is not None:
                finals[node] = graph.call_function(post_of[node], (env[node],))
                if clone_outputs:
                    finals[node] = graph.call_method("clone", (finals[node],))
            elif clone_outputs or post is not None:
                finals[node] = graph.call_method("clone", (env[node],))
    result = [finals.get(o, env[o]) for o in outputs]
    # outputs that are also inputs still get reduced
    result = [graph.call_function(p, (r,)) if p is not None and o in inputs else r
              for o, r, p in zip(outputs, result, posts)]
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


def node_shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, tuple | None]:
    """Per-sample shape (batch dim dropped) of every node's value for ``example`` (a batch),
    or ``None`` for values that are not tensors (sizes, shapes). Runs under no_grad."""
    shapes: dict[fx.Node, tuple | None] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            shapes[n] = tuple(value.shape[1:]) if isinstance(value, torch.Tensor) and value.dim() >= 1 else None
            return value

    with torch.no_grad(), eval_mode(gm):
        _Rec(gm).run(example)
    return shapes


def eval_mode(module: nn.Module):
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


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32
