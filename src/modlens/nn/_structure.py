"""Neuron layers of a captured model and where each layer's channels go (paper section 3.1).

Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` call of the captured graph (grouped and
depthwise convolutions included; a Linear over the last dimension of a ``(B, H, W, C)`` or
``(B, T, C)`` value is a per-position layer) is a layer; the one producing the model output is
the *output layer*, the others are *neuron layers* with one neuron per unit or channel. From a
layer's output the walk follows the operations of :mod:`modlens.nn._registry` and ends at
*sinks*:

* ``layer`` sinks: the input of a Linear/Conv that reads the channel (its *consumer*);
* ``mask`` sinks (lesion walks): an operation that mixes the channel with other values per
  sample: a residual addition, a LayerNorm/GroupNorm/RMSNorm, a gate ``x * g(x)``. A lesioned
  channel is zeroed where it enters it, and everything after is recomputed.

A neuron is removed from every sink at once (footnote 1 of the paper). Weight walks (``mode="weights"``) continue through additions, normalizations and gates and
record the per-channel scales they pass (batch norms, normalization gammas, layer scales), so
a conv that reads the residual stream is joined to every layer that writes to it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Iterable

import torch
from torch import fx, nn

from modlens.nn._conv_attention import attention_inputs, find_conv_attention
from modlens.nn._ops import Route, Sink, UnsupportedModelError
from modlens.nn._patches import expand_route, fold_route, reshape_route, unfold_route
from modlens.nn._scores import outside_attention
from modlens.nn._transformer import find_mlps, mlp_sink
from modlens.nn._registry import (
    ATTENTION_MODULES, BATCH_NORMS, CONV_TYPES, LAYER_TYPES, OTHER_WEIGHT_LAYERS, PASSING, SHAPE_FUNCTIONS,
    SHAPE_METHODS, SHAPE_ONLY, SIZE_ARITHMETIC, handler_kind, is_bn, refine_arith,
)

_FOLLOW = ("unary", "bn", "scale", "flatten", "permute", "mean", "sum", "merge")
_MATRIX_PRODUCTS = {torch.ops.aten.addmm.default, torch.ops.aten.mm.default}
_MIXING = ("join", "gate", "norm")


class Structure:
    """What modlens needs to know about a captured model's layers and their connections."""

    def __init__(self, gm: fx.GraphModule, input_node: fx.Node, output: fx.Node, leaf_modules: Iterable = (),
                 shapes: dict | None = None):
        self.gm = gm
        self.input = input_node
        self.output = output
        self.leaf_names = {l for l in leaf_modules if isinstance(l, str)}
        self.leaf_types = tuple(l for l in leaf_modules if isinstance(l, type))
        self.shapes = shapes or _meta_shapes(gm)
        # not through a read of a value's shape only: MRA's attention without its CUDA kernel returns
        # zeros_like(query), and the query, key and value projections then do not reach the output
        self.live = _ancestors_of(output, self._constant, self._shape_only) | {output}
        self.dynamic = _descendants_of(input_node)   # values that depend on the input (not constants)
        self._kind: dict[fx.Node, str] = {}
        self._shape: dict[fx.Node, bool] = {}
        self.token_mixers = self._find_token_mixers()
        self._check_weight_layers()
        nodes = [n for n in gm.graph.nodes if n in self.live and self.kind(n) == "layer"]
        if not nodes:
            raise UnsupportedModelError(
                f"{type(gm).__name__} has no nn.Linear or nn.Conv1d/Conv2d layer whose output reaches the model "
                "output; modlens needs at least one hidden layer to find neurons to cluster"
            )
        self.output_layers, self.logits_node = self._find_output_layers()
        self.output_layer = self.output_layers[0]
        self.all_nodes = nodes
        self.mlps = []
        self._pre: dict[fx.Node, fx.Node] = {}
        self.mixing = None   # a CNN whose attention mixes positions (nn/_conv_attention.py)
        if self.transformer:
            self.mlps, self.mixing = self._mlps_or_mixing()
            self.transformer = self.mixing is None
        if self.transformer:  # attention: the neurons are the blocks' MLP units (nn/_transformer.py)
            # Mix-FFN and fused gated MLPs: the activation's input
            self._pre = {m.node: m.pre for m in self.mlps if m.pre is not None}
            self.layer_nodes = [m.node for m in self.mlps]
            self.sinks = {m.node: [mlp_sink(self, m)] for m in self.mlps}
            return
        self.layer_nodes = [n for n in nodes if n not in self.output_layers
                            and (self.mixing is None or n not in self.mixing.scores)]
        self.sinks = {n: self.walk(n) for n in self.layer_nodes}

    def _mlps_or_mixing(self):
        """(MLP neurons, None) of a model with attention; ([], mixing layers) when its attention mixes the
        positions of conv feature maps (HaloNet, BoTNet, MobileNet-V5) and it has no transformer MLP: none
        at all, or only conv -> activation -> conv pairs whose second conv is attention's projection (a
        bottleneck's 1x1 conv before BoTNet's qkv conv)."""
        try:
            mlps = find_mlps(self)
        except UnsupportedModelError:
            mixing = find_conv_attention(self)
            if mixing is None:
                raise
            return [], mixing
        if any(m.down not in attention_inputs(self) for m in mlps):
            return mlps, None
        mixing = find_conv_attention(self)   # its refusal names the attention (a lambda layer), not the "MLP"
        return (mlps, None) if mixing is None else ([], mixing)

    @property
    def data_dependent(self) -> set[fx.Node]:
        """Values computed from the input's data, not only from its sizes (``dynamic`` holds both)."""
        if getattr(self, "_data", None) is None:
            seen, todo = {self.input}, [self.input]
            while todo:
                node = todo.pop()
                for u in node.users:
                    if u not in seen and not self.is_shape(u) and not self._shape_only(u, node):
                        seen.add(u)
                        todo.append(u)
            self._data = seen
        return self._data

    # ----- classification ----------------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def ndim(self, node) -> int | None:
        s = self.shapes.get(node)
        return None if s is None else len(s) + 1

    def _is_leaf(self, node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        return node.target in self.leaf_names or bool(self.leaf_types and isinstance(self.module(node), self.leaf_types))

    def is_shape(self, node) -> bool:
        """Whether ``node`` computes sizes rather than tensors (x.size(0), x.shape[1] * 2, ...)."""
        if not isinstance(node, fx.Node):
            return False
        if node not in self._shape:
            self._shape[node] = False
            if node.op == "call_method":
                value = node.target in SHAPE_METHODS
            elif node.op == "call_function" and node.target in SHAPE_FUNCTIONS:
                value = True
            elif node.op == "call_function" and node.target in SIZE_ARITHMETIC:
                ins = node.all_input_nodes
                value = bool(ins) and all(self.is_shape(a) for a in ins)
            else:
                value = False
            self._shape[node] = value
        return self._shape[node]

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Inputs that carry data (not sizes, parameters, or values computed from parameters only)."""
        return [a for a in node.all_input_nodes if not self.is_shape(a) and a in self.dynamic]

    def kind(self, node: fx.Node) -> str:
        """What ``node`` is for a channel arriving at it (see :mod:`modlens.nn._registry`)."""
        if node not in self._kind:
            self._kind[node] = self._classify(node)
        return self._kind[node]

    def _classify(self, node: fx.Node) -> str:
        if self.is_shape(node):
            return "shape"
        if node.op == "output":
            return "output"
        if node.op in ("placeholder", "get_attr"):
            return "input"
        module = self.module(node) if node.op == "call_module" else None
        if self._is_leaf(node):
            return "unary"
        if node in self.token_mixers:
            return "token_mix"
        kind = handler_kind(node, module)
        if kind == "arith":
            kind = refine_arith(node, len(self.tensor_inputs(node)))
        if kind == "flatten" and not self._flattens(node, module):
            return "merge" if self._merged_dims(node, module) is not None else "reshape"
        return kind

    def _merged_dims(self, node: fx.Node, module) -> tuple[int, int] | None:
        """(start, end) of a flatten that merges dimensions after the batch but is not a full flatten
        (``x.flatten(2)``: the spatial maps of a patch embedding into tokens), or None."""
        nd = self.ndim(node.args[0]) if node.args else None
        if nd is None:
            return None
        if isinstance(module, nn.Flatten):
            start, end = module.start_dim, module.end_dim
        elif "flatten" in str(node.target):
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        else:
            return None
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        start, end = start % nd, end % nd
        return (start, end) if 1 <= start < end else None

    def _find_token_mixers(self) -> set[fx.Node]:
        """Linear layers applied along a dimension that is not the channel dimension of their input
        (MLP-Mixer's, ResMLP's and gMLP's token-mixing maps, over ``x.transpose(1, 2)``): they mix tokens,
        as attention does, and are not neuron layers (docs/transformers.md).

        The channel dimension is followed forward from every layer's output: dim 1 after a conv, the
        last after a Linear, moved by permutes and transposes, kept by channel-wise operations."""
        cd: dict[fx.Node, int | None] = {}
        moved: set[fx.Node] = set()     # values whose channel dimension a permute/transpose moved
        mixers: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            nd = self.ndim(node)
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            ins = [a for a in node.all_input_nodes if cd.get(a) is not None]
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            src = cd.get(first) if first is not None else None
            if nd is None:      # a tuple of parts (split, chunk): each part keeps the channel dimension
                cd[node] = src
                if first in moved:
                    moved.add(node)
                continue
            mod = self.module(node) if node.op == "call_module" else None
            name = str(node.target)
            if first in moved and ("permute" in name or "transpose" in name or not isinstance(mod, CONV_TYPES)):
                moved.add(node)
            if isinstance(mod, nn.Linear):
                if src is not None and nd == 3 and src == 1 and first in moved:
                    mixers.add(node)
                    cd[node] = src
                else:
                    cd[node] = nd - 1
            elif isinstance(mod, CONV_TYPES):
                cd[node] = 1
            elif src is None:
                cd[node] = next((cd[a] for a in ins if self.ndim(a) == nd), None)
            elif "permute" in name:
                perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
                cd[node] = [p % nd for p in perm].index(src) if all(isinstance(p, int) for p in perm) else None
                moved.add(node)
            elif "transpose" in name and len(node.args) >= 3 and all(isinstance(a, int) for a in node.args[1:3]):
                d0, d1 = (a % nd for a in node.args[1:3])
                cd[node] = d1 if src == d0 else d0 if src == d1 else src
                moved.add(node)
            elif "flatten" in name or isinstance(mod, nn.Flatten):
                merged = self._merged_dims(node, mod)
                cd[node] = (None if merged is None or merged[0] <= src <= merged[1] else
                            src if src < merged[0] else src - (merged[1] - merged[0]))
            elif self.ndim(first) in (nd, None) and not any(k in name for k in ("view", "reshape", "mean", "sum",
                                                                               "select")):
                cd[node] = src
            else:
                cd[node] = None
        return mixers

    def _flattens(self, node: fx.Node, module) -> bool:
        """Whether a flatten/view/reshape keeps the batch and flattens everything else."""
        if isinstance(module, nn.Flatten):
            return module.start_dim in (1, -3, -2) and module.end_dim == -1
        name = str(node.target)
        if "flatten" in name:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            nd = self.ndim(node.args[0])
            return start == 1 and (end == -1 or (nd is not None and end == nd - 1))
        shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return len(shape) == 2

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"'{node.target}' ({type(self.module(node)).__name__})"
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        path = path[len("model."):] if path.startswith("model.") else path
        return f"operation '{name}'" + (f" in module '{path}'" if path else f" ('{node.name}')")

    def _check_weight_layers(self) -> None:
        targets: dict[str, int] = {}
        self.transformer = False
        for node in self.gm.graph.nodes:
            if node not in self.live or node.op not in ("call_module", "call_function", "call_method"):
                continue
            mod = self.module(node) if node.op == "call_module" else None
            if isinstance(mod, ATTENTION_MODULES):
                raise UnsupportedModelError(
                    f"attention module {self.describe(node)} is opaque to modlens: write attention with nn.Linear "
                    "projections and scaled_dot_product_attention (or matmul), as Hugging Face models do"
                )
            if self.kind(node) == "token_mix":
                self.transformer = True  # token-mixing MLPs (Mixer): mixing across tokens, like attention
                continue
            if self.kind(node) == "attention" and len(self.tensor_inputs(node)) >= 2:
                self.transformer = True  # mixing across tokens: followed by recomputation, not a neuron layer
                continue
            if self.kind(node) == "attention" and node not in self.data_dependent:
                continue  # a product of parameters, buffers and values of the input's sizes only (MaxViT's relative
                # position tables, Gemma-4 ViT's one_hot(grid positions) @ table): no data flows through it
            if self.kind(node) == "attention":
                end = outside_attention(self, node)
                if end is None:
                    continue  # a position term or a projection of attention (nn/_scores.py): no layer, no weight edge
                raise UnsupportedModelError(
                    f"unsupported functional layer {self.describe(node)}: a matrix product with a weight tensor "
                    f"whose result reaches {self.describe(end)} outside attention; use nn.Linear so that "
                    "modlens can find the layer's weights"
                )
            if isinstance(mod, OTHER_WEIGHT_LAYERS):
                raise UnsupportedModelError(
                    f"unsupported layer '{node.target}' ({type(mod).__name__}): modlens finds neurons in nn.Linear, "
                    "nn.Conv1d and nn.Conv2d layers; replace it or analyse a submodule without it"
                )
            if isinstance(mod, LAYER_TYPES):
                targets[node.target] = targets.get(node.target, 0) + 1
                if targets[node.target] > 1:
                    raise UnsupportedModelError(
                        f"layer '{node.target}' is called more than once in forward (shared weights); "
                        "modlens needs every layer to be used once"
                    )
            elif node.op == "call_function" and node.target in _MATRIX_PRODUCTS and any(
                    a.op == "get_attr" for a in node.all_input_nodes):
                raise UnsupportedModelError(
                    f"{self.describe(node)} is a linear map written as a matrix product with a weight tensor "
                    f"that modlens could not turn into a layer (input of shape {self.shapes.get(node.args[1])}); "
                    "use nn.Linear, or a 2-D parameter W in addmm(bias, x, W) / mm(x, W)"
                )
            elif node.op == "call_function" and getattr(node.target, "__name__", "") in (
                    "linear", "conv1d", "conv2d", "conv3d", "bilinear", "linear.default", "conv2d.default"):
                raise UnsupportedModelError(
                    f"unsupported functional layer {self.describe(node)}: use nn.Linear / nn.Conv modules so "
                    "that modlens can find the layer's weights"
                )

    # ----- channel counts ------------------------------------------------------------------
    def channels(self, node, dim: int = 1) -> int | None:
        """Size of dimension ``dim`` of a value (from the captured shapes, else inferred for dim 1)."""
        if not isinstance(node, fx.Node):
            return None
        shape = self.shapes.get(node)
        if shape is not None and 0 < dim <= len(shape):
            return int(shape[dim - 1])
        if dim != 1:
            return None
        kind = self.kind(node)
        if kind == "layer":
            m = self.module(node)
            return m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if kind in ("unary", "bn", "scale", "final", "mean", "norm", "pad") and node.args:
            return self.channels(self.tensor_inputs(node)[0] if self.tensor_inputs(node) else node.args[0])
        if kind in ("join", "gate"):
            return next((c for c in map(self.channels, node.args) if c is not None), None)
        if kind == "cat" and _cat_dim(node) == 1:
            parts = [self.channels(a) for a in _cat_inputs(node)]
            return None if any(p is None for p in parts) else sum(parts)
        return None

    def layer_width(self, node: fx.Node) -> int:
        """The number of neurons of a neuron layer: its output width, half of it for a fused gated MLP."""
        m = next((m for m in self.mlps if m.node is node), None)
        if m is not None:
            return m.n_units(self)
        mod = self.module(node)
        return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels

    def layer_route(self, node: fx.Node) -> Route:
        """Route of a layer's own output: channels in dim 1, or last for a per-position Linear."""
        mod = self.module(node)
        nd = self.ndim(node)
        if isinstance(mod, nn.Linear):
            nd = nd or 2
            return Route(0, mod.out_features, False, nd, nd - 1)
        nd = nd or (4 if isinstance(mod, nn.Conv2d) else 3)
        return Route(0, mod.out_channels, False, nd, 1)

    # ----- walks -----------------------------------------------------------------------------
    def walk(self, start: fx.Node, mode: str = "lesion") -> list[Sink]:
        """Sinks of layer ``start`` (see the module docstring); ``mode`` is ``"lesion"`` or ``"weights"``."""
        sinks: list[Sink] = []
        seen: set = set()
        stack = [(start, self.layer_route(start), ())]
        if self.mixing is not None and (start in self.mixing.routes or start in self.mixing.scores):
            sinks, stack = self.mixing.walk(self, start, mode)   # through the attention's values only
        while stack:
            node, route, scales = stack.pop()
            if (node, route, scales) in seen:
                continue
            seen.add((node, route, scales))
            for user in list(node.users):
                if user not in self.live:
                    continue
                kind = self.kind(user)
                if kind == "shape" or self._shape_only(user, node):
                    continue
                if kind == "layer":
                    if user.args[0] is not node:
                        raise self._arg_error(start, user)
                    self._check_layout(start, user, route)
                    sinks.append(Sink("layer", node, user, route, scales))
                elif kind == "mean" and self._channel_statistic(user, route):
                    if mode == "lesion":   # mean(x ** 2, dim=1, keepdim=True) of an RMS norm: like "stat" below
                        sinks.append(Sink("mask", node, user, route))
                elif kind in _FOLLOW:
                    if self.tensor_inputs(user) != [node] or (kind != "unary" and kind != "scale" and user.args[0] is not node):
                        raise self._arg_error(start, user)
                    nxt = self._through(start, user, kind, route)
                    if mode == "weights" and kind in ("bn", "scale"):
                        scales = scales + ((user, route),)
                    stack.append((user, nxt, scales))
                elif kind == "cat":
                    stack.extend((user, r, scales) for r in self._cat_routes(start, node, user, route))
                elif kind == "pad":
                    if self.tensor_inputs(user) != [node] or user.args[0] is not node:
                        raise self._arg_error(start, user)
                    moved, nxt = self._pad_route(start, user, route)
                    if moved and mode == "lesion":
                        sinks.append(Sink("mask", node, user, route))   # channels move: recomputed from here
                    elif nxt is not None:
                        stack.append((user, nxt, scales))
                elif kind == "reshape":   # of other dimensions, or a channel shuffle (groups, transpose, back)
                    if self.tensor_inputs(user) != [node] or user.args[0] is not node:
                        raise self._arg_error(start, user)
                    kept = self._reshape_keeping_channels(user, route) or reshape_route(self, user, route)
                    if kept is not None:
                        stack.append((user, kept, scales))
                        continue
                    end, fn = self._shuffle(start, user, route)
                    n_source = self.layer_route(start).channels
                    if mode == "lesion":
                        sinks.append(Sink("mask", node, user, route))
                    elif end is None:      # (B, G * C', ...) -> (B, G, C', ...): channel p at (p // C', p % C')
                        grouped = route.explicit(n_source).moved(lambda p, c=fn: p % c)
                        stack.append((user, replace(grouped, dim=2, ndim=route.ndim + 1), scales))
                    else:
                        moved = route.explicit(n_source).moved(fn)
                        stack.append((end, replace(moved, ndim=self.ndim(end) or route.ndim), scales))
                elif kind == "expand":   # broadcast or repeated along positions: every copy is a value of the same channel
                    if user.args[0] is not node or node in user.args[1:]:
                        raise self._arg_error(start, user)
                    stack.append((user, expand_route(self, start, user, route), scales))
                elif kind in ("unfold", "fold"):   # non-overlapping patches (nn/_patches.py)
                    if self.tensor_inputs(user) != [node] or user.args[0] is not node:
                        raise self._arg_error(start, user)
                    nxt = unfold_route(self, start, user, route) if kind == "unfold" else \
                        fold_route(self, start, user, route, mode)
                    if nxt is None:
                        sinks.append(Sink("mask", node, user, route))
                    else:
                        stack.append((user, nxt, scales))
                elif kind == "stack":   # branches stacked into groups (selective kernels): (B, G, C, ...)
                    dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0) % (route.ndim + 1)
                    if route.flat or dim == 0 or dim > route.dim:
                        raise UnsupportedModelError(
                            f"{self.describe(user)} stacks the output of layer '{start.target}' along dimension "
                            f"{dim}; modlens follows stacks of branches in front of the channels (dim=1)")
                    if mode == "lesion":
                        sinks.append(Sink("mask", node, user, route))
                    else:
                        stack.append((user, replace(route, dim=route.dim + 1, ndim=route.ndim + 1), scales))
                elif kind == "final" and self._across_groups(user, route):   # softmax across groups: a gate
                    if mode == "lesion":
                        sinks.append(Sink("mask", node, user, route))
                    else:
                        stack.append((user, route, scales))
                elif kind == "final" and self._over_positions(user, route):   # per channel, across positions
                    if mode == "lesion":
                        sinks.append(Sink("mask", node, user, route))   # softmax(0) is not 0: recomputed
                    else:
                        stack.append((user, route, scales))
                elif kind == "stat":   # a per-sample norm: no weight edge; lesions recompute it
                    if mode == "lesion":
                        sinks.append(Sink("mask", node, user, route))
                elif kind == "split":
                    if self.tensor_inputs(user) != [node] or user.args[0] is not node:
                        raise self._arg_error(start, user)
                    parts = self._split_parts(start, user, route)
                    if mode == "lesion" and parts is not None:
                        sinks.append(Sink("mask", node, user, route))   # recomputed from the split on
                    else:
                        stack.extend((v, r, scales) for v, r in (parts or self._split_outputs(start, user, route))
                                     if r is not None)
                elif kind in _MIXING:
                    if route.flat:
                        raise UnsupportedModelError(
                            f"{self.describe(user)} mixes a flattened value after layer '{start.target}'; modlens "
                            "follows additions, normalizations and gates of unflattened values only"
                        )
                    if kind == "norm" and user.args[0] is not node:
                        raise self._arg_error(start, user)
                    if mode == "weights" and kind == "gate" and self._broadcasts_channels(node, user, route):
                        continue   # one channel scaling all of them (MobileViT-V2's context scores): no edge
                    if mode == "weights":
                        nxt = replace(route, flat=False, ndim=self.ndim(user) or route.ndim)
                        stack.append((user, nxt, scales + (((user, route),) if kind == "norm" else ())))
                    else:
                        sinks.append(Sink("mask", node, user, route))
                elif kind == "attention":
                    raise UnsupportedModelError(f"attention ({self.describe(user)}) after layer '{start.target}' is "
                                                "not supported yet; transformer blocks come in a later version")
                elif kind in ("output", "final"):
                    raise UnsupportedModelError(
                        f"hidden layer '{start.target}' reaches the model output through {self.describe(user)} "
                        "without passing through the output layer; modlens needs the class scores to come from "
                        "one final nn.Linear or nn.Conv layer"
                    )
                else:
                    raise UnsupportedModelError(
                        f"unsupported {self.describe(user)} after layer '{start.target}': modlens follows channels "
                        "through activations, normalizations, pooling, dropout, flatten/permute, residual additions, "
                        "gates and channel concatenations; wrap a custom channel-wise operation in a module and "
                        "pass its name in leaf_modules, or open an issue for this operation"
                    )
        if mode == "weights":
            sinks = [s for s in sinks if s.kind == "layer"]
        return _dedupe(sinks)

    def _constant(self, node: fx.Node) -> bool:
        """Whether ``node`` is a softmax (or log-softmax) over a dimension of size 1, which is 1 (0) whatever
        its input: the output does not depend on what it reads (SwiftFormer's additive attention scores, of
        shape (B, N, 1), normalized over the last dimension)."""
        if node.op not in ("call_function", "call_method", "call_module") or not node.args:
            return False
        module = self.module(node) if node.op == "call_module" else None
        if handler_kind(node, module) != "final" or not isinstance(node.args[0], fx.Node):
            return False
        dim = getattr(module, "dim", None) if module is not None else node.kwargs.get(
            "dim", node.args[1] if len(node.args) > 1 else None)
        shape = self.shapes.get(node.args[0])
        if not isinstance(dim, int) or shape is None:
            return False
        full = (None,) + tuple(shape)   # shapes are per sample: dimension d of the batch is d - 1 here
        return dim % len(full) != 0 and full[dim % len(full)] == 1

    @staticmethod
    def _channel_statistic(user: fx.Node, route: Route) -> bool:
        """Whether a mean keeps its dimensions and averages over the channels (and maybe positions), not
        the batch: a per-sample statistic that rescales its reader (the mean square of a written-out RMS
        norm over channels-first maps: timm's ``RmsNorm2d``)."""
        dims = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        keep = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
        norm = {d % route.ndim for d in dims if isinstance(d, int)}
        return bool(keep) and not route.flat and route.dim in norm and 0 not in norm and len(norm) == len(dims)

    @staticmethod
    def _across_groups(user: fx.Node, route: Route) -> bool:
        """Whether a softmax normalizes across a dimension in front of the channels (radix or kernel groups)."""
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        return isinstance(dim, int) and not route.flat and 0 < dim % route.ndim < route.dim

    @staticmethod
    def _over_positions(user: fx.Node, route: Route) -> bool:
        """Whether a softmax normalizes along a dimension after the channels (over positions, per channel)."""
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        return isinstance(dim, int) and not route.flat and dim % route.ndim > route.dim

    def _broadcasts_channels(self, node: fx.Node, user: fx.Node, route: Route) -> bool:
        """Whether ``node`` has one channel along the route's dimension that ``user`` broadcasts over many."""
        mine, out = self.channels(node, route.dim), self.channels(user, route.dim)
        return mine == 1 and out is not None and out > 1

    def _reshape_keeping_channels(self, user, route: Route) -> Route | None:
        """The route after a reshape of the other dimensions only (``x.view(B, C, -1)``, ``(B, H, W, C)`` to
        ``(B, H * W, C)``), or None when the reshape touches the channel dimension."""
        shape_in, shape_out = self.shapes.get(user.args[0]), self.shapes.get(user)
        if route.flat or shape_in is None or shape_out is None:
            return None
        shape_in, shape_out, d = tuple(shape_in), tuple(shape_out), route.dim   # per-sample shapes: dim d at d - 1
        if shape_in[:d] == shape_out[:d]:
            return replace(route, ndim=len(shape_out) + 1)
        tail = len(shape_in) - d + 1
        if shape_in[d - 1:] == shape_out[len(shape_out) - tail:]:
            return replace(route, ndim=len(shape_out) + 1, dim=len(shape_out) + 1 - tail)
        return None

    def _shuffle(self, start, user, route: Route):
        """(the view back, the channel map j -> new index) of a channel shuffle starting at the reshape
        ``user``: ``x.view(B, g, C // g, ...).transpose(1, 2).reshape(B, C, ...)`` (ShuffleNet); any other
        reshape of the channels is refused in one line."""
        def refuse():
            return UnsupportedModelError(
                f"unsupported {self.describe(user)} after layer '{start.target}': a reshape of the channel "
                "dimension; modlens follows channels split into groups ((B, G * C, ...) to (B, G, C, ...)), channel "
                "shuffles (into groups, transpose(1, 2), back), flattening and reshapes of the other dimensions")

        def next_user(n):
            users = [u for u in n.users if u in self.live and self.kind(u) != "shape"]
            while len(users) == 1 and self.kind(users[0]) == "unary" and len(self.tensor_inputs(users[0])) == 1:
                n = users[0]         # contiguous, clone
                users = [u for u in n.users if u in self.live and self.kind(u) != "shape"]
            return users[0] if len(users) == 1 else None

        shape_in, shape_mid = self.shapes.get(user.args[0]), self.shapes.get(user)
        if shape_in is None or shape_mid is None:
            raise UnsupportedModelError(
                f"cannot tell what {self.describe(user)} does to the channels of layer '{start.target}': the "
                "captured graph has no shapes (capture the model at an example input: pass data)")
        if route.flat or route.dim != 1:
            raise refuse()
        if len(shape_mid) != len(shape_in) + 1 or tuple(shape_mid[2:]) != tuple(shape_in[1:]) or \
                shape_mid[0] * shape_mid[1] != shape_in[0]:
            regrouped = self._regrouped_vector(user, shape_in, next_user)
            if regrouped is None:
                raise refuse()
            return regrouped
        g, cpg = int(shape_mid[0]), int(shape_mid[1])
        t = next_user(user)
        if t is None or self.kind(t) != "permute":
            return None, cpg      # channels in groups, not a shuffle (radix / selective-kernel groups)
        if "transpose" in str(t.target):
            swapped = {a % (len(shape_mid) + 1) for a in t.args[1:3]}
        else:
            perm = t.args[1] if len(t.args) == 2 and isinstance(t.args[1], (list, tuple)) else t.args[1:]
            swapped = {i for i, p in enumerate(perm) if i != p}
            if perm[1] != 2 or perm[2] != 1:
                raise refuse()
        back = next_user(t)
        if swapped != {1, 2} or back is None or self.kind(back) != "reshape" or \
                tuple(self.shapes.get(back) or ()) != tuple(shape_in):
            raise refuse()
        return back, lambda j: (j % cpg) * g + j // cpg

    def _regrouped_vector(self, user, shape_in, next_user):
        """A per-sample vector of channels (a 1x1 map, or no spatial dimensions) rearranged and put
        back: ResNeSt's radix softmax ``x.view(B, cardinality, radix, -1).transpose(1, 2)``, a softmax
        across the radix groups, ``reshape(B, -1)``. Follows the reshapes, transposes and element-wise
        operations from ``user`` on an index tensor until the channels stand alone in dimension 1 again;
        returns (that node, the channel map j -> new index), or None when the chain is something else."""
        if any(int(s) != 1 for s in shape_in[1:]):
            return None
        c = int(shape_in[0])
        idx = torch.arange(c).reshape(1, *(int(s) for s in shape_in))
        node = user
        for _ in range(16):
            shape = self.shapes.get(node)
            if shape is None or not node.args or self.tensor_inputs(node) != [node.args[0]]:
                return None
            shape, kind, name = tuple(int(s) for s in shape), self.kind(node), str(node.target)
            if kind in ("reshape", "flatten", "merge"):
                if math.prod(shape) != c:
                    return None
                idx = idx.reshape(1, *shape)
            elif kind == "permute" and "transpose" in name:
                idx = idx.transpose(*node.args[1:3])
            elif kind == "permute":
                perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
                idx = idx.permute(*perm)
            elif kind not in ("unary", "final"):   # element-wise, or the softmax across the radix groups
                return None
            if tuple(idx.shape[1:]) != shape:
                return None
            if node is not user and shape[0] == c and all(s == 1 for s in shape[1:]):
                where = {int(j): q for q, j in enumerate(idx.reshape(-1).tolist())}
                return node, where.__getitem__
            node = next_user(node)
            if node is None:
                return None
        return None

    @staticmethod
    def _shape_only(user: fx.Node, node: fx.Node) -> bool:
        """Whether ``user`` reads only the shape of ``node`` (zeros_like(x), y.expand_as(x))."""
        if user.op not in ("call_function", "call_method"):
            return False
        return any(i < len(user.args) and user.args[i] is node and node not in user.args[:i] + user.args[i + 1:]
                   for t, i in SHAPE_ONLY if t == user.target)

    def _arg_error(self, start: fx.Node, user: fx.Node) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"the output of layer '{start.target}' reaches {self.describe(user)} as an argument other than its "
            "input tensor; modlens follows channels only through the data input of channel-wise operations"
        )

    def _cat_routes(self, start, node, user, route: Route) -> list[Route]:
        nd = route.ndim
        dim = _cat_dim(user) % nd if nd else _cat_dim(user)
        if dim != route.dim or route.flat:
            raise UnsupportedModelError(
                f"concatenation {self.describe(user)} after layer '{start.target}' is not along the channel "
                "dimension of an unflattened value; modlens follows only channel concatenations"
            )
        out, offset = [], 0
        for a in _cat_inputs(user):
            if a is node:
                out.append(replace(route.shifted(offset), channels=None, flat=False, ndim=nd))
            c = self.channels(a, route.dim)
            if c is None:
                raise UnsupportedModelError(
                    f"cannot tell how many channels '{a.name}' has in concatenation '{user.name}' after layer "
                    f"'{start.target}'"
                )
            offset += c
        return out

    def _pad_route(self, start, user, route: Route) -> tuple[bool, Route | None]:
        """(whether the padding pads or crops the channel dimension, the route after it: None when no
        channel of the layer is left)."""
        if user.op == "call_module":
            pad = self.module(user).padding
            pad = list(pad) if isinstance(pad, (tuple, list)) else [pad] * 2
        else:
            pad = user.kwargs.get("pad", user.args[1] if len(user.args) > 1 else ())
            pad = list(pad)
        nd = route.ndim
        if any(isinstance(p, fx.Node) for p in pad):
            raise UnsupportedModelError(f"{self.describe(user)} pads the output of layer '{start.target}' by a "
                                        "computed amount; modlens follows paddings of fixed size")
        # pad[2i], pad[2i + 1]: before and after dimension nd - 1 - i
        before = {nd - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}
        if not any(before.get(route.dim, (0, 0))):
            return False, route
        if route.flat or route.dim == 0:
            raise UnsupportedModelError(f"{self.describe(user)} pads the channels of a flattened value after layer "
                                        f"'{start.target}'")
        front, back = before[route.dim]
        width = self.channels(user.args[0], route.dim)
        if width is None:
            raise UnsupportedModelError(f"cannot tell how many channels {self.describe(user)} pads after layer "
                                        f"'{start.target}'")
        return True, route.sliced(-front, width + back, self.layer_route(start).channels)

    def _split_outputs(self, start, user, route: Route) -> list[tuple]:
        """(value, route) of each output of a split node, the route unchanged (a split along another dimension)."""
        if "split" not in _name(user.target) and "chunk" not in _name(user.target):
            return [(user, route)]
        return [(g, route) for g in self._split_items(start, user)]

    def _split_items(self, start, user) -> list[fx.Node]:
        items = [u for u in user.users if u in self.live]
        if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                   for u in items):
            raise UnsupportedModelError(
                f"the parts of {self.describe(user)} after layer '{start.target}' are used other than one by one "
                "(x.split(...)[i]); modlens follows channel splits whose parts are taken by index")
        return items

    def _split_parts(self, start, user, route: Route) -> list[tuple] | None:
        """(value, route) per part of a split/chunk/narrow/slice of the channel dimension, the route
        None for a part without any of the layer's channels; None when the split is along another dimension."""
        args, kw, name = list(user.args), user.kwargs, _name(user.target)

        def arg(i, key, default):
            return kw.get(key, args[i] if len(args) > i else default)

        if user.target is operator.getitem:           # x[:, a:b] in an fx graph
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if index.count(Ellipsis) == 1:          # x[..., a:b]: the ellipsis stands for full slices
                at = index.index(Ellipsis)
                index = index[:at] + (slice(None),) * (route.ndim - len(index) + 1) + index[at + 1:]
            if not all(isinstance(sl, slice) for sl in index) or (index and index[0] != slice(None)):
                raise UnsupportedModelError(
                    f"{self.describe(user)} indexes the output of layer '{start.target}' with {args[1]!r}; modlens "
                    "follows slices (x[:, a:b], x[:, :, ::2]) of all samples; use narrow or split for anything else")
            sl = index[route.dim] if route.dim < len(index) else slice(None)
            if sl == slice(None):
                if route.flat and any(i != slice(None) for i in index):
                    raise UnsupportedModelError(f"{self.describe(user)} slices a flattened value after layer "
                                                f"'{start.target}'; modlens follows splits of unflattened channels")
                return None
            dim, bounds, step = route.dim, [(sl.start, sl.stop)], sl.step
        elif "narrow" in name:
            dim, begin, length = arg(1, "dim", 0), arg(2, "start", 0), arg(3, "length", 0)
            bounds, step = [(begin, None, length)], 1
        elif "slice" in name:
            dim = arg(1, "dim", 0)
            bounds, step = [(arg(2, "start", None), arg(3, "end", None))], arg(4, "step", 1)
        else:                                          # split, split_with_sizes, chunk
            dim = arg(2, "dim", 0)
            bounds, step = None, 1
        nd = route.ndim
        if not isinstance(dim, int):
            raise UnsupportedModelError(f"cannot tell along which dimension {self.describe(user)} splits the "
                                        f"output of layer '{start.target}'")
        dim %= nd
        width = self.channels(user.args[0], dim) if dim else None
        if dim != route.dim:
            whole_batch = dim == 0 and bounds is not None and len(bounds[0]) == 2 and bounds[0][0] in (None, 0)
            if dim == 0 and not whole_batch:
                raise UnsupportedModelError(f"{self.describe(user)} splits the batch after layer '{start.target}'")
            if route.flat and not whole_batch:
                raise UnsupportedModelError(f"{self.describe(user)} slices a flattened value after layer "
                                            f"'{start.target}'; modlens follows splits of unflattened channels")
            return None
        if route.flat:
            raise UnsupportedModelError(f"{self.describe(user)} slices a flattened value after layer '{start.target}'; "
                                        "modlens follows splits of unflattened channels")
        if width is None:
            raise UnsupportedModelError(f"cannot tell how many channels {self.describe(user)} splits after layer "
                                        f"'{start.target}'")
        if step not in (None, 1):
            raise UnsupportedModelError(f"{self.describe(user)} takes every {step}th channel of layer "
                                        f"'{start.target}'; modlens follows contiguous channel slices only")
        if bounds is not None:
            b = bounds[0]
            if any(isinstance(v, fx.Node) for v in b):
                raise UnsupportedModelError(f"{self.describe(user)} slices the channels of layer '{start.target}' at "
                                            "a computed position; modlens follows slices at fixed channel offsets")
            lo = 0 if b[0] is None else (b[0] + width if b[0] < 0 else b[0])
            hi = (lo + b[2]) if len(b) == 3 else width if b[1] is None else (b[1] + width if b[1] < 0 else b[1])
            return [(user, route.sliced(max(lo, 0), min(hi, width), self.layer_route(start).channels))]
        sizes = kw.get("split_size", kw.get("split_sizes", kw.get("split_size_or_sections", args[1] if len(args) > 1
                                                                  else None)))
        if "chunk" in name:
            n = arg(1, "chunks", 1)
            size = -(-width // n)
            sizes = [min(size, width - i) for i in range(0, width, size)]
        elif isinstance(sizes, int):
            sizes = [min(sizes, width - i) for i in range(0, width, sizes)]
        edges = [0]
        for sz in sizes:
            edges.append(edges[-1] + int(sz))
        n_source = self.layer_route(start).channels
        return [(g, route.sliced(edges[g.args[1]], edges[g.args[1] + 1], n_source))
                for g in self._split_items(start, user)]

    def _through(self, start, user, kind, route: Route) -> Route:
        nd_out = self.ndim(user)
        if kind == "flatten":
            if not route.spatial:
                return route
            if route.flat:   # unfolded patches (B, C * K, L), flattened: channel c still owns a block
                return replace(route, ndim=2, dim=1)
            if route.dim != 1:
                raise UnsupportedModelError(
                    f"{self.describe(user)} flattens a channels-last value after layer '{start.target}'; modlens "
                    "follows channel-major flattening only (permute to channels-first before flattening)"
                )
            return replace(route, channels=self.channels((self.tensor_inputs(user) or [user.args[0]])[0]), flat=True,
                           ndim=2, dim=1)
        if kind == "permute":
            if route.flat:
                raise UnsupportedModelError(f"{self.describe(user)} permutes a flattened value after layer "
                                            f"'{start.target}'")
            if "permute" in str(user.target):
                perm = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
                perm = [p % route.ndim for p in perm]
                return replace(route, dim=perm.index(route.dim))
            d0, d1 = (a % route.ndim for a in user.args[1:3])
            new = d1 if route.dim == d0 else d0 if route.dim == d1 else route.dim
            return replace(route, dim=new)
        if kind == "merge":
            start_dim, end_dim = self._merged_dims(user, self.module(user) if user.op == "call_module" else None)
            if route.flat or start_dim <= route.dim <= end_dim:
                raise UnsupportedModelError(
                    f"{self.describe(user)} flattens the channels of layer '{start.target}' together with other "
                    "dimensions; modlens follows channel-major flattening (torch.flatten(x, 1)) or flattening of the "
                    "dimensions after the channels (x.flatten(2))")
            shift = end_dim - start_dim if route.dim > end_dim else 0
            return replace(route, ndim=route.ndim - (end_dim - start_dim), dim=route.dim - shift)
        if kind in ("mean", "sum"):   # over space, or over the groups in front of the channels
            dims = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            keep = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
            norm = {d % route.ndim for d in dims if isinstance(d, int)}
            if not dims or len(norm) != len(dims) or norm & {0, route.dim} or not route.spatial or route.flat:
                raise UnsupportedModelError(
                    f"mean {self.describe(user)} after layer '{start.target}' must average over spatial "
                    "dimensions only (e.g. x.mean((2, 3)))"
                )
            if keep:
                return route
            return replace(route, ndim=route.ndim - len(norm), dim=route.dim - sum(d < route.dim for d in norm))
        if nd_out is not None and not route.flat and nd_out != route.ndim:
            return replace(route, ndim=nd_out)
        return route

    def _check_layout(self, start, user, route: Route) -> None:
        consumer = self.module(user)
        if isinstance(consumer, nn.Linear):
            if route.ndim == 2 or (route.channels_last and not route.flat):
                return
            raise UnsupportedModelError(
                f"linear layer '{user.target}' reads the spatial maps of layer '{start.target}' without a flatten "
                "(along a non-channel dimension); modlens needs channel-major flattening (torch.flatten(x, 1)) or a "
                "channels-last permute before a Linear"
            )
        want = 4 if isinstance(consumer, nn.Conv2d) else 3
        if route.ndim != want or route.flat or route.dim != 1:
            raise UnsupportedModelError(
                f"conv layer '{user.target}' reads a flattened, dense or channels-last value from layer '{start.target}'"
            )

    def _find_output_layers(self) -> tuple[list[fx.Node], fx.Node]:
        """The layers whose outputs are the class scores, and the node holding the scores.

        Usually one final Linear/Conv followed only by element-wise operations or a softmax; a model
        may also average or add several heads (a distilled model's class and distillation heads:
        ``(head(x) + head_dist(x)) / 2``, ``torch.stack(heads).sum(0)``). Then every head is an output
        layer (not a neuron layer), and the scores are the combined value."""
        heads: list[fx.Node] = []
        combined = None
        todo = [self.output]
        while todo:
            node = todo.pop()
            while self.kind(node) != "layer":
                kind = self.kind(node)
                if kind == "take_tokens" or self._one_position(node) or self._whole_slice(node):
                    node = node.args[0]   # one position per sequence, read after a per-position output layer
                    continue
                best = self._max_over_positions(node)
                if best is not None:
                    node = best
                    continue
                ins = self.tensor_inputs(node)
                parts = self._head_parts(node, kind, ins)
                if parts is not None:
                    combined = combined or node
                    todo.extend(parts)
                    break
                if kind not in ("unary", "final", "flatten", "bn", "scale", "pad") or len(ins) != 1:
                    raise UnsupportedModelError(
                        f"the model output is computed by {self.describe(node)}, not by a final nn.Linear or nn.Conv "
                        "layer (or a sum or mean of several) followed only by element-wise operations or a softmax; "
                        "modlens takes the last layer's outputs as the class scores (pass output= to select the logits)"
                    )
                node = ins[0]
            else:
                if node not in heads:
                    heads.append(node)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        heads.sort(key=order.__getitem__)
        if combined is None:
            return heads, heads[0]
        # the scores: the combination, after the element-wise operations that follow it but before a softmax
        logits = combined
        while logits is not self.output:
            users = [u for u in logits.users if u in self.live and self.kind(u) != "shape"]
            if len(users) != 1 or self.kind(users[0]) not in ("unary", "scale"):
                break
            logits = users[0]
        return heads, logits

    def _one_position(self, node: fx.Node) -> bool:
        """Whether ``node`` reads one fixed position of every sample, along a dimension between the batch
        and the last (class) one: ``h.select(1, 0)`` or ``h[:, 0]`` after a per-position output layer
        (Perceiver's decoder writes scores for one query and reads ``logits[:, 0, :]``), or averages
        (sums) the scores over such dimensions (EuroBERT's late pooling: ``logits.mean(dim=1)``)."""
        if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        nd = self.ndim(node.args[0])
        if nd is None or nd < 3:
            return False
        if _name(node.target) in ("mean", "mean.dim", "sum", "sum.dim_IntList"):   # late pooling: mean of scores
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = [dims] if isinstance(dims, int) else dims
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            return (isinstance(dims, (list, tuple)) and bool(dims) and not keep
                    and all(isinstance(d, int) and 1 <= d % nd < nd - 1 for d in dims))
        if _name(node.target) in ("select", "select.int"):
            dim, index = node.args[1:3] if len(node.args) >= 3 else (None, None)
        elif node.target is operator.getitem and isinstance(node.args[1], tuple):
            ints = [(d, i) for d, i in enumerate(node.args[1]) if isinstance(i, int)]
            rest = [i for i in node.args[1] if not isinstance(i, int)]
            if len(ints) != 1 or any(i != slice(None) for i in rest):
                return False
            dim, index = ints[0]
        else:
            return False
        return isinstance(dim, int) and isinstance(index, int) and 1 <= dim % nd < nd - 1

    def _whole_slice(self, node: fx.Node) -> bool:
        """Whether ``node`` is ``x[:]`` along one dimension (``slice.Tensor`` of all of it: what export writes
        for the ``:`` of ``h[:, 0, :]``)."""
        if node.op != "call_function" or _name(node.target) not in ("slice", "slice.Tensor") or not node.args:
            return False
        a = list(node.args) + [None] * (5 - len(node.args))
        dim, start, end, step = (a[1] or 0), a[2], a[3], (a[4] or 1)
        nd = self.ndim(node.args[0])
        if not isinstance(dim, int) or nd is None or step != 1 or start not in (None, 0):
            return False
        if end is None or (isinstance(end, int) and end >= 2 ** 62):   # export writes ``:`` as [0, INT64_MAX)
            return True
        size = self.channels(node.args[0], dim % nd) if dim % nd else None
        return size is not None and isinstance(end, int) and end >= size

    def _max_over_positions(self, node: fx.Node) -> fx.Node | None:
        """The input of ``h.max(dim)[0]`` or ``h.amax(dim)`` over a dimension before the last (the
        class scores of the best position: VOLO's token-labelling head), or None."""
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            node = node.args[0]
            names = ("max", "max.dim")
        else:
            names = ("amax", "amax.default")
        if node.op not in ("call_function", "call_method") or _name(node.target) not in names:
            return None
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        src = node.args[0] if node.args else None
        nd = self.ndim(src) if isinstance(src, fx.Node) else None
        if not isinstance(dim, int) or nd is None or dim % nd in (0, nd - 1) \
                or node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False):
            return None
        return src

    def _head_parts(self, node: fx.Node, kind: str, ins: list) -> list | None:
        """The heads a node adds (``a + b``) or sums/averages over a stack (``stack(hs).sum(0)``), or None."""
        if kind == "join" and "add" in _name(node.target) and len(ins) == 2:
            return ins
        if kind in ("sum", "mean") and len(ins) == 1 and self.kind(ins[0]) == "stack":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            stack = ins[0]
            stack_dim = stack.kwargs.get("dim", stack.args[1] if len(stack.args) > 1 else 0)
            if dims == (0,) and stack_dim == 0 and not keep:
                return list(stack.args[0])
        return None

    def bn_chain(self, node: fx.Node) -> list[nn.Module]:
        """Batch norms that normalize ``node``'s channels before any branch or join (row 3)."""
        bns = []
        while True:
            users = [u for u in node.users if u in self.live and self.kind(u) != "shape"]
            if len(users) != 1 or self.kind(users[0]) not in ("unary", "bn", "pad"):
                return bns
            node = users[0]
            if node.op == "call_module" and is_bn(self.module(node)):
                bns.append(self.module(node))

    def preactivation_node(self, node: fx.Node) -> fx.Node:
        """The value the layer's activation function receives: its output after any batch norm,
        dropout or identity that directly follows it (the paper's "pre-ReLU" activations); for a
        Mix-FFN's units the activation's input, after the depthwise conv (docs/transformers.md)."""
        if node in self._pre:
            return self._pre[node]
        while True:
            users = [u for u in node.users if u in self.live and self.kind(u) != "shape"]
            if len(users) != 1:
                return node
            u = users[0]
            if u.op == "call_module":
                passes = isinstance(self.module(u), BATCH_NORMS + PASSING.modules) and not self._is_leaf(u)
            else:
                passes = u.op == "call_function" and u.target in PASSING.functions
            if not passes:
                return node
            node = u

    def first_layers(self) -> list[fx.Node]:
        """Layers whose input does not depend on any other layer (they read the model input)."""
        layers = set(self.all_nodes)
        return [n for n in self.all_nodes if not (_ancestors_of(n.args[0]) & layers)]


def _meta_shapes(gm: fx.GraphModule) -> dict:
    out = {}
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            out[n] = tuple(int(s) if isinstance(s, int) else s for s in v.shape[1:])
    return out


def _descendants_of(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _ancestors_of(node, constant=lambda n: False, shape_read=lambda n, a: False) -> set[fx.Node]:
    """The nodes ``node`` depends on; not through a node that is ``constant`` whatever its input, nor
    through an input that a node reads for its shape only (``shape_read(node, input)``: ``zeros_like(x)``)."""
    seen: set[fx.Node] = set()
    todo = [node] if isinstance(node, fx.Node) else []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if not constant(n):
            todo.extend(a for a in n.all_input_nodes if not shape_read(n, a))
    return seen


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _cat_inputs(node: fx.Node) -> list:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return list(tensors)


def _cat_dim(node: fx.Node) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _dedupe(sinks: list[Sink]) -> list[Sink]:
    seen, out = set(), []
    for s in sinks:
        key = (s.kind, s.value, s.user, s.route, s.scales)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out

