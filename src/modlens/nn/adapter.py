"""Find the neuron layers of a model and give the rest of modlens what it needs from them.

An MLP-like model is a chain of ``nn.Linear`` layers joined by elementwise operations
(activations, dropout, identity), possibly preceded by reshapes of the input and followed
by a softmax. Its *hidden layers* are the outputs of every Linear but the last; each unit
is one neuron. The adapter reads the chain from a torch.fx trace of the forward, so a
``Sequential`` and a custom ``forward`` that calls ``F.relu`` are handled alike.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from modlens.nn import _fx
from modlens.nn._fx import ModelTraceError


class UnsupportedModelError(ValueError):
    """The model contains a layer or a connection modlens cannot analyse (yet)."""


# Operations that act on each unit separately, so a unit keeps its identity through them.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.PReLU, nn.Dropout, nn.AlphaDropout, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.hardtanh, F.hardswish, F.hardsigmoid,
    F.softplus, F.softsign, F.dropout, torch.dropout, torch.clamp, torch.clip,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "clamp", "clip", "contiguous", "float", "clone"}
# Allowed only after the last layer: they keep the arg-max of the class scores.
_OUTPUT_MODULES = (nn.Softmax, nn.LogSoftmax)
_OUTPUT_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_OUTPUT_METHODS = {"softmax", "log_softmax"}
# Parameter-free reshapes allowed between the input and the first layer.
_INPUT_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_INPUT_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem, getattr}
_INPUT_METHODS = {"view", "reshape", "flatten", "size", "contiguous", "float", "squeeze", "unsqueeze"}


@dataclass(frozen=True)
class NeuronLayer:
    """One layer of neurons: the units (or channels) produced by ``module``."""

    index: int
    name: str
    module: nn.Module
    n_neurons: int


def _is_op(node: fx.Node, gm: fx.GraphModule, modules, functions, methods) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


class MLPAdapter:
    """The hidden layers of an MLP-like model, read from its torch.fx graph."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.gm = _fx.trace(model)
        self._input = _fx.single_input(self.gm)
        self._output = _fx.single_output(self.gm)
        self._check_modules()
        self._linear_nodes = [
            n for n in self.gm.graph.nodes
            if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Linear)
        ]
        if len(self._linear_nodes) < 2:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {len(self._linear_nodes)} nn.Linear layer(s); modlens needs "
                "at least one hidden layer (two Linear layers) to find neurons to cluster"
            )
        self._consumer_inputs = [self._check_link(a, b) for a, b in zip(self._linear_nodes, self._linear_nodes[1:])]
        self._check_output()
        linears = [self.gm.get_submodule(n.target) for n in self._linear_nodes]
        self.layers = [
            NeuronLayer(i, n.target, m, m.out_features)
            for i, (n, m) in enumerate(zip(self._linear_nodes[:-1], linears[:-1]))
        ]
        self.output_module: nn.Linear = linears[-1]
        self.input_size = linears[0].in_features
        self.n_classes = linears[-1].out_features
        self._linears = linears
        self._check_parameters()
        self._probe: fx.GraphModule | None = None
        self._tails: dict[int, fx.GraphModule] = {}

    # ----- validation -------------------------------------------------------------------
    def _check_modules(self) -> None:
        allowed = (nn.Linear,) + _ELEMENTWISE_MODULES + _OUTPUT_MODULES + _INPUT_MODULES
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                mod = self.gm.get_submodule(node.target)
                if not isinstance(mod, allowed):
                    raise UnsupportedModelError(
                        f"unsupported layer '{node.target}' ({type(mod).__name__}): modlens analyses "
                        "MLPs made of nn.Linear layers joined by elementwise activations, dropout or "
                        "identity; remove the layer or wrap the MLP part in its own module"
                    )
            elif node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.bilinear):
                raise UnsupportedModelError(
                    f"unsupported functional layer '{node.name}' ({node.target.__name__}): use nn.Linear "
                    "modules so that modlens can find the layer's weights"
                )

    def _walk_back(self, node: fx.Node, stop: fx.Node, modules, functions, methods) -> list[fx.Node]:
        path = []
        while node is not stop:
            if not isinstance(node, fx.Node) or not _is_op(node, self.gm, modules, functions, methods):
                name = node.name if isinstance(node, fx.Node) else repr(node)
                raise UnsupportedModelError(
                    f"the value '{name}' between layers '{stop.target}' and the next is not an "
                    "elementwise operation of the previous layer's output; modlens supports chains of "
                    "nn.Linear layers joined by elementwise activations (skip connections and "
                    "concatenations are not supported for MLPs)"
                )
            tensor_args = [a for a in node.all_input_nodes]
            if len(tensor_args) != 1:
                raise UnsupportedModelError(
                    f"operation '{node.name}' after layer '{stop.target}' combines {len(tensor_args)} tensors; "
                    "modlens supports elementwise operations on one layer's output only"
                )
            path.append(node)
            node = tensor_args[0]
        return path

    def _check_link(self, a: fx.Node, b: fx.Node) -> fx.Node:
        """Check that Linear ``b`` reads ``a``'s output only through elementwise ops."""
        src = b.args[0]
        path = self._walk_back(src, a, _ELEMENTWISE_MODULES, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS)
        for node in [a] + path:
            if len(node.users) != 1:
                others = ", ".join(u.name for u in node.users)
                raise UnsupportedModelError(
                    f"the output of layer '{a.target}' is used by several operations ({others}); modlens "
                    "supports MLPs whose layers feed only the next layer"
                )
        ma, mb = self.gm.get_submodule(a.target), self.gm.get_submodule(b.target)
        if ma.out_features != mb.in_features:  # fx would have failed at run time anyway
            raise UnsupportedModelError(
                f"layer '{b.target}' expects {mb.in_features} inputs but layer '{a.target}' has {ma.out_features} units"
            )
        return src

    def _check_output(self) -> None:
        last = self._linear_nodes[-1]
        self._walk_back(
            self._output, last,
            _ELEMENTWISE_MODULES + _OUTPUT_MODULES,
            _ELEMENTWISE_FUNCTIONS | _OUTPUT_FUNCTIONS,
            _ELEMENTWISE_METHODS | _OUTPUT_METHODS,
        )

    def _check_parameters(self) -> None:
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"parameter '{name}' (shape {tuple(p.shape)}) contains NaN or inf values; "
                    "modlens cannot build a graph or lesion a network with non-finite weights"
                )

    # ----- structure --------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def layer_sizes(self) -> list[int]:
        return [l.n_neurons for l in self.layers]

    def node_layer_sizes(self) -> list[int]:
        """Node counts of the weight graph: input, hidden layers, output (paper, section 3.1)."""
        return [self.input_size] + self.layer_sizes + [self.n_classes]

    def weight_blocks(self) -> list[tuple[int, int, np.ndarray]]:
        """Edge blocks ``(i, i+1, |W|)`` between consecutive node layers of the weight graph."""
        return [
            (i, i + 1, lin.weight.detach().abs().cpu().double().numpy())
            for i, lin in enumerate(self._linears)
        ]

    def consumer(self, layer: int) -> nn.Linear:
        """The Linear layer that reads hidden layer ``layer``."""
        return self._linears[layer + 1]

    # ----- computation ------------------------------------------------------------------
    def probe(self) -> fx.GraphModule:
        """Module mapping an input batch to, per hidden layer l, (pre-activation z_l, consumer
        input u_l), followed by the output layer's pre-activation; values cloned on creation."""
        if self._probe is None:
            outs: list[fx.Node] = []
            for i, lin in enumerate(self._linear_nodes[:-1]):
                outs += [lin, self._consumer_inputs[i]]
            outs.append(self._linear_nodes[-1])
            self._probe = _fx.extract(self.gm, [self._input], outs, clone_outputs=True)
        return self._probe

    def preactivation_module(self, layer: int) -> fx.GraphModule:
        """Differentiable module mapping a model input to hidden layer ``layer``'s
        pre-activations (its Linear output), running only the layers up to it."""
        return _fx.extract(self.gm, [self._input], [self._linear_nodes[layer]], clone_outputs=True)

    def tail(self, layer: int) -> fx.GraphModule:
        """Module mapping the consumer of hidden layer ``layer``'s output to the model output."""
        if layer not in self._tails:
            self._tails[layer] = _fx.extract(self.gm, [self._linear_nodes[layer + 1]], [self._output])
        return self._tails[layer]

    def forward_records(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(pre-activations z_l, consumer inputs u_l, output pre-activation) for a batch."""
        vals = self.probe()(x)
        n = len(self.layers)
        return [vals[2 * i] for i in range(n)], [vals[2 * i + 1] for i in range(n)], vals[-1]

    def iter_records(self, batches: Iterator[torch.Tensor]):
        with torch.no_grad(), _fx.run_in_eval(self.model):
            for x in batches:
                yield self.forward_records(x)

    def preactivations(self, batches: Iterator[torch.Tensor]) -> list[np.ndarray]:
        """Pre-activations (Linear outputs, before any activation) of every hidden layer."""
        parts: list[list[np.ndarray]] = [[] for _ in self.layers]
        for zs, _, _ in self.iter_records(batches):
            for i, z in enumerate(zs):
                parts[i].append(z.detach().cpu().numpy())
        return [np.concatenate(p, axis=0) for p in parts]


__all__ = ["MLPAdapter", "NeuronLayer", "UnsupportedModelError", "ModelTraceError"]
