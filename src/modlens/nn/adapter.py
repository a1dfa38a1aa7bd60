"""Find the neuron layers of a model and give the rest of modlens what it needs from them.

:class:`NetworkAdapter` captures the model once (:mod:`modlens.nn._capture`: ``torch.export``
at the data's shape, or without data at ``input_shape=`` or the shape the model gives
(:mod:`modlens.nn._example`); ``torch.fx`` as the last resort or by choice) and shares that one graph between the weight
graph, activation recording, lesions and feature visualization. Its layers are every
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` call (grouped and depthwise included); the last
one, producing the class scores, is the output layer and the others hold neurons, one per unit
or channel, named by their module paths (``layer3.1.conv2``, ``stages.0.layers.0.pwconv1``).

Which layers are analysed (paper section 3.1; row 4 of the notes): for an MLP every hidden
Linear, with the weight graph over input, hidden and output neurons; for a network with
convolutions the conv channels and the per-position (channels-last) Linear units, with no
input, output or dense nodes. ``include_dense`` adds the hidden dense Linear layers of a CNN.
Device and dtype are resolved once, from the model's parameters, at construction.

Values are read by layer name through one method, :meth:`NetworkAdapter.values` (a module that
runs only as far as the named layers), and :meth:`NetworkAdapter.record` streams it over batches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import fx, nn

from modlens.nn import _capture, _example, _fx, _memory
from modlens.nn._batch_fold import fold_order, per_sample
from modlens.nn.inputs import to_model
from modlens.nn._conv import ACT_REDUCTIONS, BN_FOLDS, REDUCERS, bn_row_scale, channels_first, edge_block
from modlens.nn._fx import ModelTraceError
from modlens.nn._plan import LesionPlan, batch_dim
from modlens.core.residual_graph import residual_edge_blocks, residual_layer_sizes
from modlens.nn._structure import CONV_TYPES, Structure, UnsupportedModelError
from modlens.nn._transformer import residual_parts


@dataclass(frozen=True)
class NeuronLayer:
    """One layer of neurons: the units (or channels) produced by ``module``."""

    index: int
    name: str
    module: nn.Module
    n_neurons: int


_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def _refuse_recurrent(model: nn.Module) -> None:
    """One line for a model with recurrent layers, a real limit rather than a missing handler."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, _RECURRENT)]
    if not found:
        return
    kinds = ", ".join(f"nn.{type(m).__name__} at '{name}'" for name, m in found[:3]) + \
        (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise UnsupportedModelError(
        f"{type(model).__name__}: recurrent layers ({kinds}) are not supported: their units carry a state across time "
        "steps through gates, which modlens's neurons (units of nn.Linear and channels of nn.Conv layers, lesioned by "
        "zeroing what they send on) do not cover; analyse a model without recurrent layers, e.g. a 1-D conv or "
        "attention model of the same sequences"
    )


def _no_shape(model: nn.Module, tried) -> str:
    """The one line asking for an input shape when capture has none."""
    what = f"the model does not run at the shapes from {'; '.join(tried)}" if tried else \
        "no Hugging Face config image_size or vocab_size, image_size/img_size attribute, timm pretrained_cfg " \
        "input_size or first nn.Linear/nn.Conv/nn.Embedding layer says what it takes"
    return (f"{type(model).__name__}: no input shape to export it at ({what}); pass input_shape= (one input "
            "without the batch dimension, e.g. (3, 224, 224), or (128,) for token ids) or data")


def _cause(exc: BaseException) -> str:
    """The model's own error, for one that is not about shapes (a dtype the model takes no other of)."""
    line = _capture._first_line(exc, 200)
    if re.search(r"shape|size|dimension|mat1|mat2|index", line, re.IGNORECASE):
        return ""
    return f" (running it raised {type(exc).__name__}: {line})"


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _input_block(structure, first: fx.Node, bn_fold: str) -> np.ndarray:
    """An MLP's block from its inputs into its first layer: ``|W|``, rows scaled by a batch norm after it
    when ``bn_fold="original"``."""
    a = structure.module(first).weight.detach().abs().cpu().double().numpy()
    rows = bn_row_scale(structure.bn_chain(first)) if bn_fold == "original" else None
    return a if rows is None else a * rows.numpy()[:, None]


class LazyWeightBlocks(Sequence):
    """Weight-graph blocks ``(i, j, A)`` computed when read (:meth:`NetworkAdapter.lazy_weight_blocks`).

    ``specs``: ``((i, j), compute)`` in block order. With ``merge`` (a model whose several heads' scores are
    added: one output layer), the blocks of a repeated pair are one block, the sum of their parts in order,
    at the pair's first place. ``pairs`` lists the ``(i, j)`` of the blocks without computing any; indexing or
    iterating computes them, one at a time, and keeps none."""

    def __init__(self, specs, *, merge: bool = False):
        groups: dict[tuple, list] = {}
        if merge:
            for pair, compute in specs:
                groups.setdefault(pair, []).append(compute)
            self._specs = list(groups.items())
        else:
            self._specs = [(pair, [compute]) for pair, compute in specs]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [pair for pair, _ in self._specs]

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[m] for m in range(*k.indices(len(self)))]
        (i, j), parts = self._specs[k]
        block = parts[0]()
        for compute in parts[1:]:
            block = block + compute()
        return i, j, block

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]


class NetworkAdapter:
    """The neuron layers of a model, read from its captured graph.

    Parameters
    ----------
    model:
        Any ``nn.Module`` that maps one input tensor to class scores from a final Linear (or
        conv) layer; its forward may return a tensor, a tuple, a dict or a ``ModelOutput``.
    example:
        A batch of inputs of the shape the model will see (the user's data). The model is
        captured by ``torch.export`` at that shape; inputs of another per-sample shape are
        refused at the boundary.
    input_shape:
        Without ``example``: the shape of one input (no batch dimension), e.g. ``(3, 224, 224)``
        or ``(128,)`` token ids; the model is exported at a random batch of it. Without either,
        the shape comes from the model itself (:mod:`modlens.nn._example`: a Hugging Face
        config, ``image_size``/``img_size``, timm's ``pretrained_cfg``, the first layer), and
        data of another shape is taken only where the captured graph computes the model's
        output exactly (checked on two inputs). When no shape is known, torch.fx is the last
        resort, and when it fails too the error asks for ``input_shape=``.
    input_name:
        Pass the input as this keyword argument (``"pixel_values"`` for Hugging Face models).
    output:
        Which output holds the logits: a key, an index or a function of the output (default:
        ``.logits``, or the single tensor).
    forward_kwargs:
        Further keyword arguments of every forward call.
    include_dense:
        Analyse hidden dense Linear layers of a network with convolutions too (default: MLPs
        get their Linear layers, CNNs their conv and per-position Linear layers, as in the paper).
    leaf_modules:
        Qualified names or classes of submodules to keep opaque (torch.fx capture only); they
        must act on each channel separately.
    capture:
        ``"auto"`` (torch.export, torch.fx only as the last resort), ``"export"`` or ``"fx"``
        (the explicit choice of torch.fx symbolic tracing, needing no input).

    After construction, ``capture_method`` is ``"export"`` or ``"fx"``, ``input_shape`` the
    shape the model was exported at (None after torch.fx), ``input_name`` the keyword the input is
    passed as and ``capture_input`` where the shape came from (``"data"``, ``"input_shape=..."``,
    ``"the config's image_size 224 and num_channels 3"``, ...).
    """

    def __init__(self, model: nn.Module, example=None, *, input_shape=None, input_name: str | None = None,
                 output=None, forward_kwargs: dict | None = None, include_dense: bool | None = None,
                 leaf_modules: Iterable = (), capture: str = "auto", example_name: str = "data"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if capture not in _capture.METHODS:
            raise ValueError(f"capture must be one of {', '.join(_capture.METHODS)}, got {capture!r}")
        if example is not None and input_shape is not None:
            raise ValueError("pass either example (a batch of inputs) or input_shape (the shape of one input), not both")
        self.model = model
        _refuse_recurrent(model)
        self._check_parameters()
        self.device, self.dtype = _fx.device_dtype(model)
        leaf_modules = tuple(leaf_modules)
        self.input_shape = None
        self.capture_input: str | None = None
        self._guessed = False      # exported at a shape the model gave, not the user
        self._accepted: set = set()
        self._fwd = (output, forward_kwargs)
        tried: list[str] = []
        if example is not None:
            example = torch.as_tensor(example)
            self._check_accepts(example, input_name, output, forward_kwargs, example_name)
            example = to_model(example[:2], self.device, self.dtype)
            if example.shape[0] == 1:
                example = torch.cat([example, example])
            self.capture_input = example_name
        elif input_shape is not None and capture != "fx":
            ex = _example.explicit_input(model, input_shape, device=self.device, dtype=self.dtype,
                                         input_name=input_name)
            input_name = ex.input_name
            self._check_accepts(ex.x, input_name, output, forward_kwargs, ex.source)
            example, self.capture_input = ex.x, ex.source
        elif capture != "fx" and not leaf_modules:
            ex, tried = _example.example_input(model, self._runs, device=self.device, dtype=self.dtype,
                                               input_name=input_name)
            if ex is not None:
                example, input_name, self.capture_input, self._guessed = ex.x, ex.input_name, ex.source, True
        if example is None and capture == "export":
            raise ModelTraceError(_no_shape(model, tried))
        self.input_name = input_name
        if example is not None and capture != "fx":
            self.input_shape = tuple(example.shape[1:])
        try:
            self.gm, self.capture_method = _capture.capture(model, example, input_name=input_name, output=output,
                                                            forward_kwargs=forward_kwargs, leaf_modules=leaf_modules,
                                                            method=capture)
        except ModelTraceError as exc:
            if example is None and capture == "auto" and not leaf_modules:
                raise ModelTraceError(f"{_no_shape(model, tried)} (torch.fx, the last resort, failed too: {exc})") from exc
            raise
        if self.capture_method == "fx":
            self.input_shape, self._guessed = None, False
        elif example is not None:
            self._check_any_batch(example)
        self._input = _fx.single_input(self.gm)
        self._output = _fx.single_output(self.gm)
        shapes = None
        if example is not None and self.capture_method == "fx":
            shapes = {k: v for k, v in _fx.node_shapes(self.gm, example[:2]).items() if v is not None}
        try:
            self.structure = s = Structure(self.gm, self._input, self._output, leaf_modules, shapes)
        except (UnsupportedModelError, ModelTraceError) as exc:
            why = self._why_fx(capture, example, tried)
            if why is None:
                raise
            raise type(exc)(f"{exc} ({why})") from exc
        self.is_transformer = s.transformer
        self.is_cnn = any(isinstance(s.module(n), CONV_TYPES) for n in s.all_nodes) and not s.transformer
        self.include_dense = (not self.is_cnn) if include_dense is None else bool(include_dense)
        nodes = [n for n in s.layer_nodes if self.include_dense or s.transformer or not self._dense(n)]
        if not nodes:
            kinds = "nn.Linear or nn.Conv" if self.include_dense else "nn.Conv"
            raise UnsupportedModelError(
                f"{type(model).__name__} has {len(s.all_nodes)} layer(s) and no hidden {kinds} layer; modlens "
                "needs at least one hidden layer (a layer whose output feeds another layer) to find neurons to cluster"
            )
        self._layer_nodes = nodes
        self.layers = [NeuronLayer(i, n.target, s.module(n), s.layer_width(n)) for i, n in enumerate(nodes)]
        self.output_module = s.module(s.output_layer)
        self.n_classes = _width(self.output_module)
        first = s.first_layers()
        self.input_size = s.module(first[0]).in_features if isinstance(s.module(first[0]), nn.Linear) else None
        self._residual: dict | None = None
        self._plans: dict[int, LesionPlan] = {}
        self._shapes: dict[tuple, dict] = {}

    def _dense(self, node: fx.Node) -> bool:
        """A Linear over (batch, features), as opposed to a conv or a per-position Linear."""
        return isinstance(self.structure.module(node), nn.Linear) and (self.structure.ndim(node) or 2) == 2

    def _check_parameters(self) -> None:
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"parameter '{name}' (shape {tuple(p.shape)}) contains NaN or inf values; "
                    "modlens cannot build a graph or lesion a network with non-finite weights"
                )

    def _expected(self) -> str:
        for m in self.model.modules():
            if isinstance(m, nn.Linear):
                return f"(batch, {m.in_features})"
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                return f"(batch, {m.in_channels}, {'L' if isinstance(m, nn.Conv1d) else 'H, W'})"
        return "another shape"

    def _runs(self, x: torch.Tensor, input_name) -> bool:
        """Whether the model runs on ``x`` (a candidate example input) and returns class scores."""
        output, forward_kwargs = self._fwd
        wrapper = _capture.CaptureWrapper(self.model, input_name, output, forward_kwargs)
        try:
            with torch.no_grad(), _fx.eval_mode(self.model):
                out = wrapper(x)
        except ModelTraceError:
            raise                      # the output= selector does not fit: no shape will help
        except Exception:              # noqa: BLE001 - any failure means: not this shape
            return False
        return isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == x.shape[0]

    def _why_fx(self, capture: str, example, tried) -> str | None:
        """Why the graph came from torch.fx, for an error found in it (None: the user chose fx)."""
        if self.capture_method != "fx" or capture == "fx":
            return None
        failed = self.gm.meta.get("export_error")
        if failed:
            return f"captured with torch.fx because torch.export failed at {self.capture_input}: {failed}"
        if example is None:
            return "captured with torch.fx, the last resort: " + _no_shape(self.model, tried)
        return None

    def _check_any_batch(self, example: torch.Tensor) -> None:
        """One line when the exported graph (captured at a batch of ``len(example)``) does not compute the
        model's output on a batch of another size: export kept the batch dimension symbolic, but the
        model's Python code unrolled a loop over the samples into the graph."""
        n = len(example)
        bigger = torch.cat([example, example[:1]])
        output, forward_kwargs = self._fwd
        wrapper = _capture.CaptureWrapper(self.model, self.input_name, output, forward_kwargs)
        try:
            with torch.no_grad(), _fx.eval_mode(self.model):
                want = wrapper(bigger)
        except Exception:              # noqa: BLE001 - the model itself takes no other batch: nothing to check
            return
        try:
            with torch.no_grad():
                got = self.gm(bigger)
            same = isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.allclose(
                got, want, rtol=1e-4, atol=1e-5 * max(float(want.abs().max()) if want.numel() else 0.0, 1.0)))
        except Exception:              # noqa: BLE001 - the graph fails at this batch size
            same = False
        if not same:
            raise ModelTraceError(
                f"{type(self.model).__name__}: torch.export built a graph that computes the model's output on "
                f"batches of {n} but not of {n + 1}: the model's forward unrolls the batch size into the graph "
                "(a Python loop over the samples, or a tensor made with the batch size as a number); modlens runs "
                "the graph on batches of every size (write the loop as a batched operation)")

    def _same_as_model(self, x: torch.Tensor) -> bool:
        """Whether the captured graph computes the model's own output on ``x`` (two inputs)."""
        output, forward_kwargs = self._fwd
        wrapper = _capture.CaptureWrapper(self.model, self.input_name, output, forward_kwargs)
        x = to_model(x[:2], self.device, self.dtype)
        try:
            with torch.no_grad(), _fx.eval_mode(self.model):
                want, got = wrapper(x), self.gm(x)
        except Exception:              # noqa: BLE001 - the graph (or the model) does not run at this shape
            return False
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False
        scale = float(want.abs().max()) if want.numel() else 0.0
        return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))

    def _check_accepts(self, example: torch.Tensor, input_name, output, forward_kwargs, name: str) -> None:
        wrapper = _capture.CaptureWrapper(self.model, input_name, output, forward_kwargs)
        try:
            with torch.no_grad(), _fx.eval_mode(self.model):
                wrapper(to_model(example[:2], self.device, self.dtype))
        except (RuntimeError, ValueError, IndexError) as exc:
            if isinstance(exc, ModelTraceError):
                raise
            raise ValueError(
                f"{name}: the model does not accept inputs of shape {tuple(example.shape)}; it expects {self._expected()}"
                + _cause(exc)
            ) from exc

    def check_input(self, x: torch.Tensor, name: str = "data") -> None:
        """One-line error when ``x`` has a per-sample shape the captured model does not take."""
        given = tuple(x.shape[1:])
        if self.input_shape is not None:
            if given == self.input_shape or given in self._accepted:
                return
            captured = f"(batch, {', '.join(map(str, self.input_shape))})"
            if not self._guessed:
                raise ValueError(
                    f"{name}: inputs of shape {tuple(x.shape)} do not match the shape the model was captured for, "
                    f"{captured}"
                )
            if not self._same_as_model(x):
                raise ValueError(
                    f"{name}: inputs of shape {tuple(x.shape)}: the model was captured without data at {captured} "
                    f"(from {self.capture_input}), and that graph does not compute the model's output at this shape; "
                    "build the adapter with this data (NetworkAdapter(model, x)) or pass input_shape="
                    f"{tuple(given)}"
                )
            self._accepted.add(given)
            return
        if given in self._accepted:
            return
        try:
            with torch.no_grad(), _fx.eval_mode(self.model):
                self.gm(to_model(x[:1], self.device, self.dtype))
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"{name}: the model does not accept inputs of shape {tuple(x.shape)}; it expects {self._expected()}"
                + _cause(exc)
            ) from exc
        self._accepted.add(given)

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
        return not self.is_cnn and not self.is_transformer

    def residual_parts(self) -> dict:
        """Transformers: the keyword arguments of
        :func:`~modlens.core.residual_graph.residual_weight_graph` (MLP blocks, embedding as
        input nodes, head as output nodes; docs/transformers.md)."""
        if not self.is_transformer:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no attention; its weight graph is "
                                        "built from weight_blocks, not from the residual stream")
        if self._residual is None:
            self._residual = residual_parts(self.structure, self.structure.mlps)
        return self._residual

    def node_layer_sizes(self) -> list[int]:
        """Node counts of the weight graph: MLPs input, hidden layers, output; CNNs the
        analysed (conv) layers only (paper section 3.1; row 4); transformers the embedding's
        inputs (if found), each block's MLP and the classes (if the head reads the stream)."""
        if self.is_transformer:
            p = self.residual_parts()
            return residual_layer_sizes(p["blocks"], embedding=p["embedding"], head=p["head"])
        if self._mlp_graph:
            return [self.input_size] + self.layer_sizes + [self.n_classes]
        return list(self.layer_sizes)

    def hidden_node_layers(self) -> list[int]:
        """Indices of the analysed layers among the weight graph's node layers."""
        offset = 1 if self._mlp_graph else 0
        if self.is_transformer:
            offset = 0 if self.residual_parts()["embedding"] is None else 1
        return [offset + i for i in range(len(self.layers))]

    def weight_blocks(self, *, conv_edge: str = "l1", bn_fold: str = "paper") -> list[tuple[int, int, np.ndarray]]:
        """Edge blocks ``(i, j, A)`` of the weight graph, ``A`` of shape (size_j, size_i).

        A dense layer gives ``|W|``; a conv gives the L1 norm of each kernel slice within its
        group (``conv_edge="matrix_1_norm"`` for the original code's norm, row 1); per-channel
        scales are folded as ``bn_fold`` says (:mod:`modlens.nn._conv`). Blocks join every pair of
        layers connected through channel-wise operations, normalizations, gates, residual additions and
        concatenations, so residual networks get blocks between non-consecutive layers.
        All of them at once: :meth:`lazy_weight_blocks` gives the same blocks one at a time.
        """
        if self.is_transformer:  # residual-stream paths between all pairs of MLP blocks (dense)
            return list(residual_edge_blocks(**self.residual_parts()))
        return list(self.lazy_weight_blocks(conv_edge=conv_edge, bn_fold=bn_fold))

    def lazy_weight_blocks(self, *, conv_edge: str = "l1", bn_fold: str = "paper") -> "LazyWeightBlocks":
        """The blocks of :meth:`weight_blocks` (same order, same values) as a sequence that computes each block
        when it is read and keeps none: its ``pairs`` are known at once, and every pass over it computes the
        blocks again. For a CNN whose blocks do not fit in memory together (a deep residual network joins every
        writer of a stream to every later reader: torchvision's RegNetY-128GF has 21 GB of them in float64)."""
        if self.is_transformer:
            raise ValueError("lazy_weight_blocks: a transformer's weight graph is built from its residual stream "
                             "(residual_parts), not from per-layer blocks; use weight_blocks")
        if bn_fold not in BN_FOLDS:
            raise ValueError(f"bn_fold must be one of {BN_FOLDS}, got {bn_fold!r}")
        s = self.structure
        index = {n: i + (1 if self._mlp_graph else 0) for i, n in enumerate(self._layer_nodes)}
        if self._mlp_graph:
            index.update({head: len(self.layers) + 1 for head in s.output_layers})
        specs = []   # ((i, j), a function computing the block)
        if self._mlp_graph:
            first = [n for n in s.first_layers() if n in index]
            if len(first) != 1 or s.module(first[0]).in_features != self.input_size:
                raise UnsupportedModelError(
                    "the weight graph of an MLP needs exactly one layer reading the model input; found "
                    f"{', '.join(n.target for n in first) or 'none'}"
                )
            specs.append(((0, index[first[0]]), partial(_input_block, s, first[0], bn_fold)))
        for src in self._layer_nodes:
            by_consumer: dict[fx.Node, list] = {}
            for sink in s.walk(src, "weights"):
                if sink.user in index:
                    by_consumer.setdefault(sink.user, []).append(sink)
            for consumer, sinks in by_consumer.items():
                specs.append(((index[src], index[consumer]),
                              partial(edge_block, consumer, sinks, _width(s.module(src)), s, norm=conv_edge,
                                      bn_fold=bn_fold)))
        return LazyWeightBlocks(specs, merge=len(s.output_layers) > 1)

    def layer_node(self, layer: int) -> fx.Node:
        return self._layer_nodes[layer]

    def lesion_plan(self, layer: int) -> LesionPlan:
        """Probe, corrections, masks and tail for lesions of ``layer`` (built once)."""
        if layer not in self._plans:
            self._plans[layer] = LesionPlan(self.gm, self.structure, self._layer_nodes[layer])
        return self._plans[layer]

    def node_shapes(self, example: torch.Tensor) -> dict:
        """Per-sample shape of every value of the forward pass, from one sample of ``example``."""
        key = tuple(example.shape[1:])
        if key not in self._shapes:
            self.check_input(example, "data")
            # two samples where there are: an exported graph may assert what export assumed of its batch
            # dimension (at least 2), e.g. on a count of end tokens that grows with the batch (BART's head)
            self._shapes[key] = _fx.node_shapes(self.gm, to_model(example[:2], self.device, self.dtype))
        return self._shapes[key]

    # ----- computation ------------------------------------------------------------------
    def _channels_last(self, layer: int) -> bool:
        return self.structure.layer_route(self._layer_nodes[layer]).channels_last

    def _post(self, layer: int, reduce: str | None):
        """What is applied to layer ``layer``'s pre-activation as it is computed (or None): a time-major
        value (``(T, B, C)``: XLNet) is moved batch first, a channels-last one channels first."""
        last = self._channels_last(layer)
        batch = batch_dim(self.structure, self.structure.preactivation_node(self._layer_nodes[layer])) or 0
        steps = ([lambda t: t.movedim(batch, 0)] if batch else []) + ([channels_first] if last else [])
        if reduce is not None:
            steps.append(REDUCERS[reduce])
        if not steps:
            return None
        if len(steps) == 1:
            return steps[0]

        def post(t):
            for step in steps:
                t = step(t)
            return t
        return post

    def layer_index(self, layer: int | str) -> int:
        """The index of an analysed layer given by index or by name (its module path)."""
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            if not 0 <= int(layer) < len(self.layers):
                raise IndexError(f"layer index {layer} out of range: the model has {len(self.layers)} analysed layers")
            return int(layer)
        names = self.layer_names
        if layer not in names:
            raise KeyError(f"no analysed layer named {layer!r}; the layers are {', '.join(names)}")
        return names.index(layer)

    def values(self, layers: Iterable[int | str] | None = None, *, reduce: str | None = None,
               logits: bool = False) -> fx.GraphModule:
        """A module mapping an input batch to values of the named layers (names or indices;
        default: every analysed layer), in that order, running only as far as they need:

        * each layer's pre-activation: what its activation function receives (the layer's output
          after a batch norm directly following it), (B, C) for a Linear, (B, C, H, W) for a conv,
          channels-last layers moved to channels first; differentiable;
        * with ``reduce`` (``"l1"``, or ``"matrix_1_norm"``: row 2 of the notes), one (B, C)
          summary per layer instead: dense units as they are, each conv channel's (or each
          token's) map reduced the moment it is computed;
        * with ``logits=True``, the output layer's class scores last (the combined scores where the model
          adds or averages several heads).

        A single output is returned as a tensor, several as a tuple."""
        if reduce is not None and reduce not in ACT_REDUCTIONS:
            raise ValueError(f"reduce must be one of {ACT_REDUCTIONS}, got {reduce!r}")
        idx = list(range(len(self.layers))) if layers is None else [self.layer_index(l) for l in layers]
        nodes = [self.structure.preactivation_node(self._layer_nodes[i]) for i in idx]
        posts = [self._post(i, reduce) for i in idx]
        if logits:
            nodes.append(self.structure.logits_node)
            posts.append(None)
        if not nodes:
            raise ValueError("values: name at least one layer, or pass logits=True")
        post = posts if any(p is not None for p in posts) else None
        return _fx.extract(self.gm, [self._input], nodes, clone_outputs=reduce is None, post=post)

    def record(self, batches: Iterator[torch.Tensor], layers: Iterable[int | str] | None = None, *,
               reduce: str | None = "l1", as_numpy: bool = True, name: str = "activation data") -> list:
        """:meth:`values` streamed over ``batches`` (in eval mode, without gradients),
        concatenated per layer. With the default ``reduce="l1"`` memory grows with samples x
        neurons only, never with the size of the maps. ``as_numpy=False`` keeps tensors on the
        model's device."""
        idx = list(range(len(self.layers))) if layers is None else [self.layer_index(l) for l in layers]
        module = self.values(idx, reduce=reduce)
        parts: list[list] = []
        orders: dict[int, str] = {}
        with torch.no_grad(), _fx.eval_mode(self.model):
            for x in batches:
                self.check_input(x, name)
                out = module(x)
                out = out if isinstance(out, tuple) else (out,)
                parts = parts or [[] for _ in out]
                for i, z in enumerate(out):
                    if z.shape[0] != x.shape[0] and z.shape[0] % x.shape[0] == 0:   # positions folded into the batch
                        if idx[i] not in orders:
                            orders[idx[i]] = "sample" if len(x) < 2 else fold_order(
                                self.values([idx[i]], reduce=reduce), x)
                        z = per_sample(z, x.shape[0], orders[idx[i]], self.layer_names[idx[i]], reduce)
                    parts[i].append(z.cpu().numpy() if as_numpy else z)
        cat = np.concatenate if as_numpy else torch.cat
        return [cat(p, 0) for p in parts]

    def batch_size_for(self, example: torch.Tensor, batch_size: int, budget: int | None = None) -> int:
        """``batch_size``, lowered so that one forward pass fits in ``budget`` bytes."""
        budget = _memory.default_budget(self.device) if budget is None else budget
        return _memory.batch_for(self.node_shapes(example), self.dtype, batch_size, budget)


__all__ = ["NetworkAdapter", "NeuronLayer", "UnsupportedModelError", "ModelTraceError"]
