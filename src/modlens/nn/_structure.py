"""Neuron layers of a traced model and where each layer's channels go (paper section 3.1).

Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` call in the torch.fx graph is a layer;
the one producing the model output is the *output layer*, the others are *neuron layers*
with one neuron per unit or channel. From a layer's output the walk follows operations that
keep each channel separate (activations, batch norm, pooling, dropout, identity, flatten,
reshape, scalar arithmetic) and concatenations along the channel dimension, and ends at
*sinks*:

* ``layer`` sinks: the input of a Linear/Conv that reads the channel (its *consumer*);
* ``join`` sinks: an input of a residual addition (``a + b``, ``a - b``).

Footnote 1 of the paper treats the inputs a unit gives to several layers as separate
neurons; modlens keeps one neuron per output channel of a layer and removes it from every
sink at once (all consumers, all joins). A residual addition is not a layer: its output
mixes channel ``c`` of every addend, so the identity path of ``x + f(x)`` carries no neuron
of its own, and lesioning channel ``c`` of ``f``'s last conv zeroes only that addend.
For the weight graph the walk also passes through additions, so a conv that reads the
residual stream is joined to every layer that writes to it.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from modlens.nn._ops import (
    ACTIVATION_MODULES, BATCH_NORMS, CAT_FUNCTIONS, FINAL_FUNCTIONS, FINAL_METHODS, FINAL_MODULES,
    FLATTEN_FUNCTIONS, FLATTEN_METHODS, JOIN_FUNCTIONS, JOIN_METHODS, OTHER_WEIGHT_LAYERS, PASS_MODULES,
    POOL_MODULES, SCALAR_FUNCTIONS, SCALAR_METHODS, SHAPE_METHODS, SIZE_ARITHMETIC, UNARY_FUNCTIONS,
    UNARY_METHODS, CONV_TYPES, LAYER_TYPES, Route, Sink, UnsupportedModelError, is_bn,
)


class Structure:
    """What modlens needs to know about a traced model's layers and their connections."""

    def __init__(self, gm: fx.GraphModule, input_node: fx.Node, output: fx.Node, leaf_modules: Iterable = ()):
        self.gm = gm
        self.input = input_node
        self.output = output
        self.leaf_names = {l for l in leaf_modules if isinstance(l, str)}
        self.leaf_types = tuple(l for l in leaf_modules if isinstance(l, type))
        self.live = _live(output)
        self._chan: dict[fx.Node, int | None] = {}
        self._shape: dict[fx.Node, bool] = {}
        self._check_weight_layers()
        nodes = [n for n in gm.graph.nodes if n in self.live and self._is_layer(n)]
        if not nodes:
            raise UnsupportedModelError(
                f"{type(gm).__name__} has no nn.Linear or nn.Conv1d/Conv2d layer whose output reaches the model "
                "output; modlens needs at least one hidden layer to find neurons to cluster"
            )
        self.output_layer = self._find_output_layer()
        self.layer_nodes = [n for n in nodes if n is not self.output_layer]
        self.all_nodes = nodes
        self.sinks = {n: self.walk(n, through_joins=False) for n in self.layer_nodes}

    # ----- classification ----------------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def _is_layer(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.module(node), LAYER_TYPES)

    def _is_leaf(self, node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        return node.target in self.leaf_names or bool(self.leaf_types and isinstance(self.module(node), self.leaf_types))

    def _check_weight_layers(self) -> None:
        targets: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node not in self.live:
                continue
            if node.op == "call_module":
                mod = self.module(node)
                if isinstance(mod, OTHER_WEIGHT_LAYERS):
                    raise UnsupportedModelError(
                        f"unsupported layer '{node.target}' ({type(mod).__name__}): modlens finds neurons in "
                        "nn.Linear, nn.Conv1d and nn.Conv2d layers joined by channel-wise operations"
                    )
                if isinstance(mod, LAYER_TYPES):
                    targets[node.target] = targets.get(node.target, 0) + 1
                    if targets[node.target] > 1:
                        raise UnsupportedModelError(
                            f"layer '{node.target}' is called more than once in forward (shared weights); "
                            "modlens needs every layer to be used once"
                        )
                    if isinstance(mod, CONV_TYPES) and mod.groups != 1:
                        raise UnsupportedModelError(
                            f"grouped convolution '{node.target}' ({type(mod).__name__}, groups={mod.groups}) is "
                            "not supported: its channels do not all read the same inputs; use groups=1"
                        )
            elif node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d, F.bilinear):
                raise UnsupportedModelError(
                    f"unsupported functional layer '{node.name}' ({node.target.__name__}): use nn.Linear / "
                    "nn.Conv modules so that modlens can find the layer's weights"
                )

    def is_shape(self, node) -> bool:
        """Whether ``node`` computes sizes rather than tensors (x.size(0), x.shape[1] * 2, ...)."""
        if not isinstance(node, fx.Node):
            return False
        if node in self._shape:
            return self._shape[node]
        self._shape[node] = False
        if node.op == "call_method" and node.target in SHAPE_METHODS:
            value = True
        elif node.op == "call_function" and node.target is getattr:
            value = True
        elif node.op == "call_function" and node.target in SIZE_ARITHMETIC:
            ins = node.all_input_nodes
            value = bool(ins) and all(self.is_shape(a) for a in ins)
        else:
            value = False
        self._shape[node] = value
        return value

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if not self.is_shape(a) and a.op != "get_attr"]

    def _op(self, node: fx.Node) -> str:
        """Kind of ``node`` as seen by a channel arriving at its first argument."""
        if self.is_shape(node):
            return "shape"
        if node.op == "output":
            return "output"
        if self._is_layer(node):
            return "layer"
        if node.op == "call_module":
            mod = self.module(node)
            if self._is_leaf(node) or isinstance(mod, ACTIVATION_MODULES + PASS_MODULES + POOL_MODULES):
                return "unary"
            if is_bn(mod) or isinstance(mod, BATCH_NORMS):
                return "unary"
            if isinstance(mod, nn.Flatten):
                return "flatten" if mod.start_dim in (1, -3, -2) and mod.end_dim == -1 else "?"
            if isinstance(mod, FINAL_MODULES):
                return "final"
            return "?"
        if node.op == "call_function":
            t = node.target
            if t in CAT_FUNCTIONS:
                return "cat"
            if t in FINAL_FUNCTIONS:
                return "final"
            if t in FLATTEN_FUNCTIONS:
                return "flatten"
            if t is torch.mean:
                return "mean"
            if t in UNARY_FUNCTIONS:
                return "unary"
            if t in JOIN_FUNCTIONS or t in SCALAR_FUNCTIONS:
                tensors = self._tensor_inputs(node)
                if len(tensors) <= 1:
                    return "unary" if t in SCALAR_FUNCTIONS else "?"
                if t in JOIN_FUNCTIONS and "alpha" not in node.kwargs and len(tensors) == 2:
                    return "join"
            return "?"
        if node.op == "call_method":
            t = node.target
            if t in UNARY_METHODS:
                return "unary"
            if t in FLATTEN_METHODS:
                return "flatten"
            if t == "mean":
                return "mean"
            if t in FINAL_METHODS:
                return "final"
            if t in JOIN_METHODS or t in SCALAR_METHODS:
                tensors = self._tensor_inputs(node)
                if len(tensors) <= 1:
                    return "unary"
                return "join" if t in JOIN_METHODS and len(tensors) == 2 and "alpha" not in node.kwargs else "?"
            return "?"
        return "?"

    @staticmethod
    def describe(node: fx.Node, gm: fx.GraphModule) -> str:
        if node.op == "call_module":
            return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
        return f"'{node.name}' ({name})"

    # ----- channel counts ------------------------------------------------------------------
    def channels(self, node) -> int | None:
        """Static size of dimension 1 (channels) of a value, where it can be known without data."""
        if not isinstance(node, fx.Node):
            return None
        if node in self._chan:
            return self._chan[node]
        self._chan[node] = None
        kind = self._op(node) if node.op != "placeholder" else "input"
        value = None
        if kind == "layer":
            m = self.module(node)
            value = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        elif kind in ("unary", "final", "mean") and node.args:
            value = self.channels(node.args[0])
        elif kind == "join":
            value = next((c for c in map(self.channels, node.args) if c is not None), None)
        elif kind == "cat" and _cat_dim(node) == 1:
            parts = [self.channels(a) for a in _cat_inputs(node)]
            value = None if any(p is None for p in parts) else sum(parts)
        self._chan[node] = value
        return value

    # ----- walks -----------------------------------------------------------------------------
    def _main_arg_error(self, start: fx.Node, node: fx.Node, user: fx.Node) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"the output of layer '{start.target}' reaches {self.describe(user, self.gm)} as an argument other than "
            "its input tensor; modlens follows channels only through the data input of channel-wise operations"
        )

    def walk(self, start: fx.Node, *, through_joins: bool) -> list[Sink]:
        """Sinks of layer ``start`` (see the module docstring). With ``through_joins`` the walk
        continues through additions and returns only layer sinks (for the weight graph)."""
        mod = self.module(start)
        ndim = 4 if isinstance(mod, nn.Conv2d) else 3 if isinstance(mod, nn.Conv1d) else 2
        route0 = Route(0, self.channels(start), False, ndim)
        sinks: list[Sink] = []
        seen: set = set()
        stack = [(start, route0)]
        while stack:
            node, route = stack.pop()
            if (node, route) in seen:
                continue
            seen.add((node, route))
            for user in list(node.users):
                if user not in self.live:
                    continue
                kind = self._op(user)
                if kind == "shape":
                    continue
                if kind == "layer":
                    if user.args[0] is not node:
                        raise self._main_arg_error(start, node, user)
                    self._check_layout(start, user, route)
                    sinks.append(Sink("layer", node, user, route))
                elif kind in ("unary", "flatten", "mean"):
                    if user.args[0] is not node and kind != "unary":
                        raise self._main_arg_error(start, node, user)
                    if kind == "unary" and self._tensor_inputs(user) != [node]:
                        raise self._main_arg_error(start, node, user)
                    stack.append((user, self._through(start, node, user, kind, route)))
                elif kind == "cat":
                    if _cat_dim(user) != 1 or route.flat:
                        raise UnsupportedModelError(
                            f"concatenation {self.describe(user, self.gm)} after layer '{start.target}' is not along "
                            "the channel dimension 1 of an unflattened value; modlens follows only channel "
                            "concatenations"
                        )
                    offset = 0
                    for a in _cat_inputs(user):
                        if a is node:
                            stack.append((user, Route(route.offset + offset, None, False, route.ndim)))
                        c = self.channels(a)
                        if c is None:
                            raise UnsupportedModelError(
                                f"cannot tell how many channels '{a.name}' has in concatenation '{user.name}' after "
                                f"layer '{start.target}'"
                            )
                        offset += c
                elif kind == "join":
                    if route.flat:
                        raise UnsupportedModelError(
                            f"addition {self.describe(user, self.gm)} of a flattened value after layer "
                            f"'{start.target}' is not supported; add before flattening"
                        )
                    if through_joins:
                        stack.append((user, route))
                    else:
                        sinks.append(Sink("join", node, user, route))
                elif kind in ("output", "final"):
                    raise UnsupportedModelError(
                        f"hidden layer '{start.target}' reaches the model output through {self.describe(user, self.gm)} "
                        "without passing through the output layer; modlens needs the class scores to come from "
                        "one final nn.Linear or nn.Conv layer"
                    )
                else:
                    raise UnsupportedModelError(
                        f"unsupported operation {self.describe(user, self.gm)} after layer '{start.target}': modlens "
                        "follows a layer's channels only through channel-wise operations (activations, batch norm, "
                        "pooling, dropout, flatten), residual additions and channel concatenations. Wrap a custom "
                        "channel-wise operation in a module and pass its name in leaf_modules"
                    )
        if through_joins:
            sinks = [s for s in sinks if s.kind == "layer"]
        return _dedupe(sinks)

    def _through(self, start, node, user, kind, route: Route) -> Route:
        if kind == "flatten":
            if not route.spatial:
                return route
            return Route(route.offset, self.channels(node), True, 2)
        if kind == "mean":
            dims = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            keep = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
            norm = {d % route.ndim for d in dims if isinstance(d, int)}
            if not dims or len(norm) != len(dims) or norm & {0, 1} or not route.spatial:
                raise UnsupportedModelError(
                    f"mean {self.describe(user, self.gm)} after layer '{start.target}' must average over spatial "
                    "dimensions only (e.g. x.mean((2, 3)))"
                )
            return route if keep else Route(route.offset, route.channels, False, route.ndim - len(norm))
        return route

    def _check_layout(self, start, user, route: Route) -> None:
        consumer = self.module(user)
        if isinstance(consumer, nn.Linear) and route.ndim != 2:
            raise UnsupportedModelError(
                f"linear layer '{user.target}' reads the spatial maps of conv layer '{start.target}' without a "
                "flatten or pooling to one value per channel; modlens needs channel-major flattening "
                "(torch.flatten(x, 1)) before a Linear"
            )
        want = 4 if isinstance(consumer, nn.Conv2d) else 3
        if isinstance(consumer, CONV_TYPES) and (route.ndim != want or route.flat):
            raise UnsupportedModelError(
                f"conv layer '{user.target}' reads a flattened or dense value from layer '{start.target}'"
            )

    def _find_output_layer(self) -> fx.Node:
        node = self.output
        while not self._is_layer(node):
            kind = self._op(node)
            ins = self._tensor_inputs(node)
            if kind not in ("unary", "final", "flatten") or len(ins) != 1:
                raise UnsupportedModelError(
                    f"the model output is computed by {self.describe(node, self.gm)}, not by a final nn.Linear or "
                    "nn.Conv layer followed only by element-wise operations or a softmax; modlens takes the "
                    "last layer's outputs as the class scores"
                )
            node = ins[0]
        return node

    def bn_chain(self, node: fx.Node) -> list[nn.Module]:
        """Batch norms that normalize ``node``'s channels before any branch or join (row 3)."""
        bns = []
        while True:
            users = [u for u in node.users if u in self.live and self._op(u) != "shape"]
            if len(users) != 1 or self._op(users[0]) != "unary":
                return bns
            node = users[0]
            if node.op == "call_module" and is_bn(self.module(node)):
                bns.append(self.module(node))

    def preactivation_node(self, node: fx.Node) -> fx.Node:
        """The value the layer's activation function receives: its output after any batch norm,
        dropout or identity that directly follows it (the paper's "pre-ReLU" activations)."""
        while True:
            users = [u for u in node.users if u in self.live and self._op(u) != "shape"]
            if len(users) != 1:
                return node
            u = users[0]
            passes = (u.op == "call_module" and isinstance(self.module(u), BATCH_NORMS + PASS_MODULES)
                      and not self._is_leaf(u)) or (u.op == "call_function" and u.target in (F.dropout, torch.dropout))
            if not passes:
                return node
            node = u

    def first_layers(self) -> list[fx.Node]:
        """Layers whose input does not depend on any other layer (they read the model input)."""
        layers = set(self.all_nodes)
        return [n for n in self.all_nodes
                if not (_ancestors_of(n.args[0]) & layers)]


def _live(output: fx.Node) -> set[fx.Node]:
    return _ancestors_of(output) | {output}


def _ancestors_of(node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node] if isinstance(node, fx.Node) else []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _cat_inputs(node: fx.Node) -> list:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return list(tensors)


def _cat_dim(node: fx.Node) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _dedupe(sinks: list[Sink]) -> list[Sink]:
    seen, out = set(), []
    for s in sinks:
        key = (s.kind, s.value, s.user, s.route)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out
