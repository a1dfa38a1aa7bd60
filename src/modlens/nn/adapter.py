"""Find the neuron layers of a model and give the rest of modlens what it needs from them.

:class:`NetworkAdapter` traces any ``nn.Module`` with torch.fx (never matching class names in
a Sequential) and finds its layers: every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``; the
last one, producing the class scores, is the output layer and the others hold neurons, one
per unit or channel (see :mod:`modlens.nn._structure` for how channels are followed through
activations, batch norm, pooling, flatten, residual additions and concatenations).

Which layers are analysed (paper section 3.1; row 4 of the notes): for an MLP every hidden
Linear, with the weight graph over input, hidden and output neurons; for a network with
convolutions the conv channels only, with no input, output or dense nodes. ``include_dense``
adds the hidden Linear layers of a CNN. ``MLPAdapter`` is the historical name of the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import fx, nn

from modlens.nn import _fx, _memory
from modlens.nn._conv import ACT_REDUCTIONS, REDUCERS, bn_row_scale, edge_block
from modlens.nn._fx import ModelTraceError
from modlens.nn._plan import LesionPlan
from modlens.nn._structure import CONV_TYPES, Structure, UnsupportedModelError


@dataclass(frozen=True)
class NeuronLayer:
    """One layer of neurons: the units (or channels) produced by ``module``."""

    index: int
    name: str
    module: nn.Module
    n_neurons: int


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


class NetworkAdapter:
    """The neuron layers of a model, read from its torch.fx graph.

    Parameters
    ----------
    model:
        Any ``nn.Module`` with one input tensor that returns class scores from a final
        Linear (or conv) layer.
    include_dense:
        Analyse hidden Linear layers of a network with convolutions too (default: MLPs get
        their Linear layers, CNNs their conv layers only, as in the paper).
    leaf_modules:
        Qualified names or classes of submodules to keep opaque when tracing (e.g. ones with
        data-dependent control flow); they must act on each channel separately.
    """

    def __init__(self, model: nn.Module, *, include_dense: bool | None = None, leaf_modules: Iterable = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        leaf_modules = tuple(leaf_modules)
        self.gm = _fx.trace(model, leaf_modules)
        self._input = _fx.single_input(self.gm)
        self._output = _fx.single_output(self.gm)
        self.structure = s = Structure(self.gm, self._input, self._output, leaf_modules)
        self.is_cnn = any(isinstance(s.module(n), CONV_TYPES) for n in s.all_nodes)
        self.include_dense = (not self.is_cnn) if include_dense is None else bool(include_dense)
        nodes = [n for n in s.layer_nodes if self.include_dense or isinstance(s.module(n), CONV_TYPES)]
        if not nodes:
            kinds = "nn.Linear or nn.Conv" if self.include_dense else "nn.Conv"
            raise UnsupportedModelError(
                f"{type(model).__name__} has {len(s.all_nodes)} layer(s) and no hidden {kinds} layer; modlens "
                "needs at least one hidden layer (a layer whose output feeds another layer) to find neurons to cluster"
            )
        self._layer_nodes = nodes
        self.layers = [NeuronLayer(i, n.target, s.module(n), _width(s.module(n))) for i, n in enumerate(nodes)]
        self.output_module = s.module(s.output_layer)
        self.n_classes = _width(self.output_module)
        self._linear_nodes = [n for n in s.all_nodes if isinstance(s.module(n), nn.Linear)]
        self._linears = [s.module(n) for n in self._linear_nodes]
        first = s.first_layers()
        self.input_size = s.module(first[0]).in_features if isinstance(s.module(first[0]), nn.Linear) else None
        self._check_parameters()
        self._probe: fx.GraphModule | None = None
        self._plans: dict[int, LesionPlan] = {}
        self._shapes: dict[tuple, dict] = {}

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

    @property
    def _mlp_graph(self) -> bool:
        """MLPs: the weight graph has input and output nodes (row 4 of the notes)."""
        return not self.is_cnn

    def node_layer_sizes(self) -> list[int]:
        """Node counts of the weight graph: MLPs input, hidden layers, output; CNNs the
        analysed (conv) layers only (paper section 3.1; row 4)."""
        if self._mlp_graph:
            return [self.input_size] + self.layer_sizes + [self.n_classes]
        return list(self.layer_sizes)

    def hidden_node_layers(self) -> list[int]:
        """Indices of the analysed layers among the weight graph's node layers."""
        offset = 1 if self._mlp_graph else 0
        return [offset + i for i in range(len(self.layers))]

    def weight_blocks(self, *, conv_edge: str = "l1", fold_bn: bool = True) -> list[tuple[int, int, np.ndarray]]:
        """Edge blocks ``(i, j, A)`` of the weight graph, ``A`` of shape (size_j, size_i).

        A dense layer gives ``|W|``; a conv gives the L1 norm of each kernel slice
        (``conv_edge="matrix_1_norm"`` for the original code's norm, row 1); with ``fold_bn``
        edges into a channel normalized by batch norm are scaled by ``|gamma|/sqrt(var+eps)``
        (row 3; the original CIFAR VGG code effectively used ``fold_bn=False``). Blocks join
        every pair of layers connected through channel-wise operations, residual additions
        and concatenations, so residual networks get blocks between non-consecutive layers.
        """
        s = self.structure
        index = {n: i + (1 if self._mlp_graph else 0) for i, n in enumerate(self._layer_nodes)}
        if self._mlp_graph:
            index[s.output_layer] = len(self.layers) + 1

        def block(consumer: fx.Node, routes, n_source: int) -> np.ndarray:
            scale = bn_row_scale(s.bn_chain(consumer)) if fold_bn else None
            return edge_block(s.module(consumer), routes, n_source, norm=conv_edge, row_scale=scale,
                              name=consumer.target)

        blocks = []
        if self._mlp_graph:
            first = [n for n in s.first_layers() if n in index]
            if len(first) != 1 or s.module(first[0]).in_features != self.input_size:
                raise UnsupportedModelError(
                    "the weight graph of an MLP needs exactly one layer reading the model input; found "
                    f"{', '.join(n.target for n in first) or 'none'}"
                )
            m = s.module(first[0])
            scale = bn_row_scale(s.bn_chain(first[0])) if fold_bn else None
            a = m.weight.detach().abs().cpu().double().numpy()
            blocks.append((0, index[first[0]], a if scale is None else a * scale.numpy()[:, None]))
        for src in self._layer_nodes:
            by_consumer: dict[fx.Node, list] = {}
            for sink in s.walk(src, through_joins=True):
                if sink.user in index:
                    routes = by_consumer.setdefault(sink.user, [])
                    if sink.route not in routes:
                        routes.append(sink.route)
            for consumer, routes in by_consumer.items():
                blocks.append((index[src], index[consumer], block(consumer, routes, _width(s.module(src)))))
        return blocks

    def consumer(self, layer: int) -> nn.Module:
        """The first layer that reads hidden layer ``layer`` (for an MLP, the next Linear)."""
        sink = next(sk for sk in self.structure.sinks[self._layer_nodes[layer]] if sk.kind == "layer")
        return self.structure.module(sink.user)

    def lesion_plan(self, layer: int) -> LesionPlan:
        """Probe, corrections, masks and tail for lesions of ``layer`` (built once)."""
        if layer not in self._plans:
            self._plans[layer] = LesionPlan(self.gm, self.structure, self._layer_nodes[layer])
        return self._plans[layer]

    def node_shapes(self, example: torch.Tensor) -> dict:
        """Per-sample shape of every value of the forward pass, from one sample of ``example``."""
        key = tuple(example.shape[1:])
        if key not in self._shapes:
            device, dtype = _fx.module_device_dtype(self.model)
            shapes = _fx.node_shapes(self.gm, example[:1].to(device=device, dtype=dtype))
            for node in self.structure.all_nodes:
                if isinstance(self.structure.module(node), nn.Linear) and len(shapes[node] or ()) != 1:
                    raise UnsupportedModelError(
                        f"linear layer '{node.target}' gets inputs of shape (batch, {', '.join(map(str, shapes[node.args[0]]))}); "
                        "modlens needs (batch, features): flatten before a Linear"
                    )
            self._shapes[key] = shapes
        return self._shapes[key]

    # ----- computation ------------------------------------------------------------------
    def _preact_nodes(self) -> list[fx.Node]:
        return [self.structure.preactivation_node(n) for n in self._layer_nodes]

    def probe(self) -> fx.GraphModule:
        """Module mapping an input batch to, per layer l, (pre-activation z_l, input u_l of its
        first consumer), followed by the output layer's output; values cloned on creation."""
        if self._probe is None:
            outs: list[fx.Node] = []
            for node, pre in zip(self._layer_nodes, self._preact_nodes()):
                sink = next(sk for sk in self.structure.sinks[node] if sk.kind in ("layer", "join"))
                outs += [pre, sink.value]
            outs.append(self.structure.output_layer)
            self._probe = _fx.extract(self.gm, [self._input], outs, clone_outputs=True)
        return self._probe

    def preactivation_module(self, layer: int) -> fx.GraphModule:
        """Differentiable module mapping a model input to layer ``layer``'s pre-activations:
        (B, C) for a Linear, (B, C, H, W) for a conv; the layer's output after any batch norm
        directly following it, i.e. what its activation function receives. Runs only the
        layers up to it."""
        node = self.structure.preactivation_node(self._layer_nodes[layer])
        return _fx.extract(self.gm, [self._input], [node], clone_outputs=True)

    def forward_records(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(pre-activations z_l, first-consumer inputs u_l, output-layer output) for a batch."""
        vals = self.probe()(x)
        n = len(self.layers)
        return [vals[2 * i] for i in range(n)], [vals[2 * i + 1] for i in range(n)], vals[-1]

    def summary_module(self, reduce: str = "l1") -> fx.GraphModule:
        """Module mapping an input batch to one (B, n_neurons) tensor per analysed layer: the
        pre-activations of dense units, and per conv channel the L1 norm over spatial
        positions of its pre-activation map (``reduce="matrix_1_norm"``: row 2 of the notes).
        Each map is reduced the moment it is computed."""
        if reduce not in ACT_REDUCTIONS:
            raise ValueError(f"reduce must be one of {ACT_REDUCTIONS}, got {reduce!r}")
        return _fx.extract(self.gm, [self._input], self._preact_nodes(), post=REDUCERS[reduce])

    def activation_summaries(self, batches: Iterator[torch.Tensor], *, reduce: str = "l1",
                             as_numpy: bool = True) -> list:
        """Streamed :meth:`summary_module` outputs over ``batches``, concatenated per layer.

        Memory grows with samples x neurons only, never with the size of the maps. With
        ``as_numpy=False`` the result stays on the model's device as tensors.
        """
        module = self.summary_module(reduce)
        parts: list[list] = [[] for _ in self.layers]
        with torch.no_grad(), _fx.run_in_eval(self.model):
            for x in batches:
                out = module(x)
                out = out if isinstance(out, tuple) else (out,)
                for i, z in enumerate(out):
                    parts[i].append(z.cpu().numpy() if as_numpy else z)
        cat = np.concatenate if as_numpy else torch.cat
        return [cat(p, 0) for p in parts]

    def preactivations(self, batches: Iterator[torch.Tensor]) -> list[np.ndarray]:
        """Pre-activations of every analysed layer, (n_samples, n_neurons) each; conv channels
        are summarized by the L1 norm of their map (see :meth:`activation_summaries`)."""
        return self.activation_summaries(batches)

    def batch_size_for(self, example: torch.Tensor, batch_size: int, budget: int | None = None) -> int:
        """``batch_size``, lowered so that one forward pass fits in ``budget`` bytes."""
        device, dtype = _fx.module_device_dtype(self.model)
        budget = _memory.default_budget(device) if budget is None else budget
        return _memory.batch_for(self.node_shapes(example), dtype, batch_size, budget)


#: Historical name: the adapter handles MLPs, CNNs and residual networks alike.
MLPAdapter = NetworkAdapter

__all__ = ["NetworkAdapter", "MLPAdapter", "NeuronLayer", "UnsupportedModelError", "ModelTraceError"]
