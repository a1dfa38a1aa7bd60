"""Lesion evaluation: class-wise correct counts of a network with sets of neurons removed.

A lesioned neuron (a unit, or a conv channel) contributes nothing downstream (paper,
section 4.1: the weights out of it are zero). Its value is zeroed at the input of every
consumer, after any batch norm, activation or pooling, so a batch norm that follows cannot
turn the removed channel into a constant (unlike the original code, row 8 of the notes).
Two engines compute the same numbers behind one interface (:class:`LesionEngine`:
``correct_counts(layer, sets)``, ``baseline``, ``class_sizes``); :func:`lesion_engine` makes
either by name:

* :class:`PlainLesions` (:func:`correct_counts_plain`), the oracle: in a deep copy of the captured model, zero the
  slices of the consumers' weights that read the neurons (for a Linear after a flatten, the
  columns the channel owns; in a grouped conv, the in-group slices) and, where the neurons
  enter an operation without weights (residual addition, normalization, gate), multiply that
  input by a channel mask; then run the whole test set through the forward pass, one lesion
  at a time. It uses the structure's sinks (what a lesion means), never the fast path's plan.
* :class:`IncrementalLesions`, the fast path (see :mod:`modlens.nn._plan`): it caches what the
  lesioned layer's consumers read and produce, subtracts the low-rank term of the removed
  channels for many lesion sets at once (sets stacked in the batch), and re-runs only the
  part of the network after the consumers. Told the layers it will lesion next (``prepare``, as
  ``lesion_test`` does), it fills their caches together, one forward pass for as many layers as
  the cache budget holds, instead of one per layer.

Memory is bounded by ``memory_budget_bytes`` (default 2 GiB on the CPU, half the free memory
of a GPU): half for cached values, half for the working block. A layer whose cache fits is
cached whole and kept for later calls; otherwise its cache is filled and used one chunk of
samples at a time, so the ImageNet-sized case runs on one GPU.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import fx, nn

from modlens.nn import _fx, _layout, _memory
from modlens.nn._skip import LinearSkip
from modlens.nn._ops import UnsupportedModelError
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.inputs import check_labels, to_model


def _class_counts(pred: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Correct predictions per class: ``pred`` (..., n) against labels ``y`` (n)."""
    correct = (pred == y).to(onehot.dtype)
    return correct @ onehot


def _as_index_sets(neuron_sets: Sequence[Sequence[int]], width: int, layer_name: str) -> list[np.ndarray]:
    out = []
    for s in neuron_sets:
        arr = np.asarray(s, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= width):
            raise ValueError(
                f"lesion set for layer '{layer_name}' has neuron indices outside [0, {width - 1}]: "
                f"range [{arr.min()}, {arr.max()}]"
            )
        if np.unique(arr).size != arr.size:
            raise ValueError(f"lesion set for layer '{layer_name}' repeats a neuron index")
        out.append(arr)
    return out


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


class LesionEngine(Protocol):
    """What :func:`~modlens.experiments.lesion_test.lesion_test` needs of a lesion engine: the
    adapter, the test set's intact per-class correct counts and class sizes, and the per-class
    correct counts with each of several neuron sets of one layer lesioned."""

    adapter: NetworkAdapter
    baseline: np.ndarray
    class_sizes: np.ndarray

    def correct_counts(self, layer: int, neuron_sets: Sequence[Sequence[int]], *,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        ...


class IncrementalLesions:
    """Fast, batched lesion evaluation on a fixed test set (the ``"incremental"`` engine).

    Parameters
    ----------
    adapter:
        The model's :class:`~modlens.nn.adapter.NetworkAdapter`.
    x, y:
        Test inputs and integer labels (kept where they are; moved to the model's device one
        chunk at a time).
    batch_size:
        Largest number of samples per forward pass when filling caches (lowered to fit the budget).
    memory_budget_bytes:
        Bound on the memory the evaluator holds (cached values plus one working block).
    skip:
        Skip, exactly, the (set, sample) pairs whose prediction is known without running the
        tail (silent lesions, certified margins; :mod:`modlens.nn._skip`). ``False`` runs every pair.
    channels_last:
        Run the forward passes and the tails with 2-D conv weights and 4-D values in the
        channels-last layout (the weights are converted for the duration of each call and restored).
        ``None``: on the CPU, for models with a 2-D convolution, where oneDNN's convolutions and
        max-pooling are several times faster in this layout (``benchmarks/README.md``). Same
        values; float rounding may differ in the last bits.
    """

    def __init__(self, adapter: NetworkAdapter, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048,
                 memory_budget_bytes: int | None = None, skip: bool = True, channels_last: bool | None = None):
        self.adapter = adapter
        self.skip = skip  # exact work-skipping for Linear consumers (see modlens.nn._skip)
        if channels_last is None:
            channels_last = _layout.prefer_channels_last(adapter.model, adapter.device)
        self.channels_last = bool(channels_last)
        self.device, self.dtype = adapter.device, adapter.dtype
        check_labels(y, adapter.n_classes, name="test data")
        adapter.check_input(x, "test data")
        if len(x) != len(y):
            raise ValueError(f"test data: {len(x)} inputs but {len(y)} labels")
        self.n_classes = adapter.n_classes
        self.x = x
        self.y = y.to(self.device)
        # counts are sums of ones: exact in float32/float64, not in half precision
        self.count_dtype = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        self.onehot = torch.nn.functional.one_hot(self.y, self.n_classes).to(self.count_dtype)
        self.class_sizes = np.bincount(y.cpu().numpy(), minlength=self.n_classes)
        self.budget = int(memory_budget_bytes or _memory.default_budget(self.device))
        self.itemsize = _memory.itemsize(self.dtype)
        self.shapes = adapter.node_shapes(x[:2])
        self.batch_size = _memory.batch_for(self.shapes, self.dtype, batch_size,
                                            _memory.block_bytes(self.device, self.budget // 4))
        self._init_caches()
        self.baseline = self._baseline()

    @contextlib.contextmanager
    def _mode(self):
        """Eval mode and, with ``channels_last``, the 2-D conv weights in that layout (restored after)."""
        with _fx.eval_mode(self.adapter.model), _layout.conv_weights_channels_last(self.adapter.gm, self.channels_last):
            yield

    def _batches(self, start: int, stop: int):
        for s0, s1 in _chunks(stop - start, self.batch_size):
            xb = to_model(self.x[start + s0:start + s1], self.device, self.dtype)
            yield _layout.to_channels_last(xb) if self.channels_last else xb

    @torch.inference_mode()
    def _baseline(self) -> np.ndarray:
        total = torch.zeros(self.n_classes, dtype=self.count_dtype, device=self.device)
        start = 0
        with self._mode():
            for xb in self._batches(0, len(self.x)):
                n = xb.shape[0]
                total += _class_counts(self.adapter.gm(xb).argmax(-1), self.y[start:start + n],
                                       self.onehot[start:start + n])
                start += n
        return total.round().to(torch.int64).cpu().numpy()

    def correct_counts(
        self, layer: int, neuron_sets: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Correct predictions per class, shape (len(neuron_sets), n_classes), with each set of
        neurons of layer ``layer`` lesioned in turn."""
        info = self.adapter.layers[layer]
        sets = _as_index_sets(neuron_sets, info.n_neurons, info.name)
        result = np.zeros((len(sets), self.n_classes), dtype=np.int64)
        self.last_stats = {"layer": layer, "cache_chunks": 0, "blocks": 0}
        by_size: dict[int, list[int]] = {}
        for i, s in enumerate(sets):
            by_size.setdefault(s.size, []).append(i)
        if 0 in by_size:
            result[by_size.pop(0)] = self.baseline
        if by_size:
            groups = [(members, np.stack([sets[i] for i in members])) for members in by_size.values()]
            for members, counts in zip(by_size.values(), self._counts(layer, groups, progress)):
                result[members] = counts
        return result

    # ----- caching ---------------------------------------------------------------------------------
    def _init_caches(self) -> None:
        self._caches: OrderedDict[int, dict] = OrderedDict()
        self._cached_bytes: dict[int, int] = {}
        self._order: list[int] = []   # layers announced by prepare()
        self._probe_key, self._probe = None, None
        self.last_stats: dict = {}

    def prepare(self, layers: Sequence[int]) -> None:
        """Announce the layers that will be lesioned next, in order. A layer whose cache is filled then fills
        the caches of the announced layers after it in the same probe pass, as many as fit in the cache
        budget (one forward pass for a group of layers instead of one per layer; the values are the same)."""
        self._order = [int(l) for l in layers]

    def _joint_probe(self, plans: list):
        """A probe computing every value that ``plans`` cache, in one pass (built once per group)."""
        key = tuple(id(p) for p in plans)
        if self._probe_key != key:
            outputs = []
            for plan in plans:
                outputs.extend(n for n in plan.probe_outputs if n not in outputs)
            probe = _fx.extract(self.adapter.gm, [plans[0].structure.input], outputs, clone_outputs=True)
            self._probe_key, self._probe = key, (probe, outputs)
        return self._probe

    @torch.inference_mode()
    def _fill(self, plan, start: int, stop: int) -> dict:
        """Probe outputs for samples ``start:stop``, written into preallocated tensors. A value whose
        first dimension holds ``m`` rows per sample (windows or heads folded into the batch: GCViT's
        global query repeated per window) keeps them: ``cached.rows[node] = m``."""
        return self._fill_many([plan], start, stop)[0]

    @torch.inference_mode()
    def _fill_many(self, plans: list, start: int, stop: int) -> list:
        """:meth:`_fill` for several plans (layers) in one probe pass: one cache per plan."""
        probe, outputs = (plans[0].probe, plans[0].probe_outputs) if len(plans) == 1 else self._joint_probe(plans)
        caches = [_Cache() for _ in plans]
        pos = 0
        with self._mode():
            for xb in self._batches(start, stop):
                out = probe(xb)
                values = dict(zip(outputs, out if isinstance(out, tuple) else (out,)))
                for plan, cached in zip(plans, caches):
                    for node in plan.probe_outputs:
                        v = values[node]
                        if node in plan.batch_dims:   # time-major: cached batch first (the tail moves it back)
                            v = v.movedim(plan.batch_dims[node], 0)
                        m = v.shape[0] // xb.shape[0]
                        if m < 1 or v.shape[0] != m * xb.shape[0] or cached.rows.get(node, m) != m:
                            raise UnsupportedModelError(
                                f"the value '{node.name}' has {v.shape[0]} rows for a batch of {xb.shape[0]} samples: "
                                "modlens caches values whose first dimension is the batch (or a fixed multiple of it)")
                        if node not in cached:
                            fmt = torch.channels_last if self.channels_last and v.dim() == 4 else torch.contiguous_format
                            cached[node] = torch.empty(((stop - start) * m, *v.shape[1:]), dtype=v.dtype,
                                                       device=v.device, memory_format=fmt)
                            cached.rows[node] = m
                        cached[node][pos * m:(pos + xb.shape[0]) * m] = v
                pos += xb.shape[0]
        return caches

    def _group(self, layer: int, room: int) -> list[tuple[int, object, int]]:
        """``[(layer, plan, bytes)]``: the announced layers after ``layer`` (:meth:`prepare`) whose whole caches
        fit, in order, in ``room`` bytes; it stops at the first that does not fit or has no plan."""
        order = self._order
        if layer not in order:
            return []
        n, group = len(self.x), []
        for later in order[order.index(layer) + 1:]:
            if later in self._caches:
                continue
            try:
                plan = self.adapter.lesion_plan(later)
            except UnsupportedModelError:
                break   # refused when its turn comes, with its own message
            size = n * plan.cache_elements(self.shapes) * self.itemsize
            if size > room:
                break
            group.append((later, plan, size))
            room -= size
        return group

    def _cache_chunks(self, layer: int, plan):
        """Yield (start, stop, cached values) over the samples, whole when the cache fits."""
        n = len(self.x)
        per_sample = plan.cache_elements(self.shapes) * self.itemsize
        limit = self.budget // 2
        if layer in self._caches:
            self._caches.move_to_end(layer)
            yield 0, n, self._caches[layer]
            return
        if n * per_sample <= limit:
            group = [(layer, plan, n * per_sample)] + self._group(layer, limit - n * per_sample)
            need = sum(g[2] for g in group)
            while self._caches and sum(self._cached_bytes.values()) + need > limit:
                old, _ = self._caches.popitem(last=False)
                del self._cached_bytes[old]
            try:
                filled = self._fill_many([g[1] for g in group], 0, n)
            except UnsupportedModelError:
                if len(group) == 1:
                    raise
                group = group[:1]   # a later layer's value cannot be cached: it says so when its turn comes
                filled = self._fill_many([plan], 0, n)
            # in the order of use: this layer is the first to go when room is needed, the announced ones after it
            for (l, _, size), cached in zip(group, filled):
                self._caches[l] = cached
                self._cached_bytes[l] = size
            yield 0, n, self._caches[layer]
            return
        self.clear_cache()
        for start, stop in _chunks(n, max(1, limit // per_sample)):
            yield start, stop, self._fill(plan, start, stop)

    def clear_cache(self) -> None:
        """Free the cached values of every layer."""
        self._caches.clear()
        self._cached_bytes.clear()

    # ----- lesions ---------------------------------------------------------------------------------
    def _block_shape(self, plan, n_sets: int, set_size: int, n_chunk: int) -> tuple[int, int]:
        """(sets, samples) per block so that one block's working memory fits: half of it for the
        consumer weights gathered per set, the rest for (set, sample) pairs."""
        work = max(1, plan.work_elements(self.shapes) * self.itemsize)
        block = _memory.block_bytes(self.device, self.budget - self.budget // 2)
        weights = plan.weight_elements(set_size) * self.itemsize
        max_sets = max(1, (block // 2) // max(1, weights))
        pairs = max(1, (block - min(block // 2, weights)) // work)
        samples = max(1, min(n_chunk, pairs))
        return max(1, min(n_sets, max_sets, pairs // samples)), samples

    def _indices(self, plan, sets: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The correction and mask indices of ``sets`` (one row per set) on the engine's device."""
        corr_idx, mask_idx = plan.indices(sets, self.shapes)
        return ([torch.as_tensor(i, device=self.device) for i in corr_idx],
                [torch.as_tensor(i, device=self.device) for i in mask_idx])

    def _blocks(self, plan, corr_idx, mask_idx, n_sets: int, set_size: int, start: int, stop: int):
        """The blocks of ``n_sets`` equally sized sets on the cached samples ``start:stop``, as
        ``(b0, b1, s0, s1, ci, mi)``: sets ``b0:b1`` (their indices ``ci``/``mi``) on cached rows
        ``s0:s1``; each block is counted in ``last_stats`` once its caller is done with it."""
        stats = self.last_stats
        n_block_sets, n_block_samples = self._block_shape(plan, n_sets, set_size, stop - start)
        stats.update(sets_per_block=n_block_sets, samples_per_block=n_block_samples)
        for b0, b1 in _chunks(n_sets, n_block_sets):
            ci = [i[b0:b1] for i in corr_idx]
            mi = [i[b0:b1] for i in mask_idx]
            for s0, s1 in _chunks(stop - start, n_block_samples):
                yield b0, b1, s0, s1, ci, mi
                stats["blocks"] += 1

    @staticmethod
    def _tail(plan, cached: dict, b0: int, b1: int, s0: int, s1: int, ci, mi) -> torch.Tensor:
        """The lesioned outputs of sets ``b0:b1`` on cached rows ``s0:s1``, shaped ``(sets, samples, ...)``."""
        rows = getattr(cached, "rows", {})
        part = {node: v[s0 * rows.get(node, 1):s1 * rows.get(node, 1)] for node, v in cached.items()}
        out = plan.tail(*plan.tail_inputs(part, ci, mi))
        return out.reshape(b1 - b0, s1 - s0, *out.shape[1:])

    @torch.inference_mode()
    def _counts(self, layer: int, groups: list, progress) -> list[np.ndarray]:
        """Counts for groups of equally sized sets; each cache chunk serves every group."""
        plan = self.adapter.lesion_plan(layer)
        prepared = []
        for _, sets in groups:
            prepared.append((*self._indices(plan, sets),
                             torch.zeros(len(sets), self.n_classes, dtype=self.count_dtype, device=self.device),
                             sets.shape[1]))
        stats = self.last_stats
        with self._mode():
            skip = LinearSkip.build(plan, plan.macs(self.shapes, 1)["lesion"]) if self.skip else None
            stats["skip"] = None if skip is None else ("chain" if skip.stages is not None else "silent")
            for start, stop, cached in self._cache_chunks(layer, plan):
                stats["cache_chunks"] += 1
                last = stop == len(self.x)
                base = None if skip is None else skip.baseline(cached[plan.corrections[0].consumer], self.batch_size)
                for corr_idx, mask_idx, counts, set_size in prepared:
                    n_sets = counts.shape[0]
                    for b0, b1, s0, s1, ci, mi in self._blocks(plan, corr_idx, mask_idx, n_sets, set_size, start, stop):
                        lo, hi = start + s0, start + s1
                        if skip is not None:
                            pred = skip.predictions(cached, base, s0, s1, ci[0], stats)
                        else:
                            pred = self._tail(plan, cached, b0, b1, s0, s1, ci, mi).flatten(2).argmax(-1)
                        counts[b0:b1] += _class_counts(pred, self.y[lo:hi], self.onehot[lo:hi])
                    if last and progress is not None:
                        progress(n_sets)
        return [c.round().to(torch.int64).cpu().numpy() for _, _, c, _ in prepared]


class _Cache(dict):
    """Cached probe outputs by node; ``rows[node]``: rows of the value per sample (1 but where windows
    or heads are folded into the batch dimension)."""

    def __init__(self):
        super().__init__()
        self.rows: dict = {}


def _mask(value: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * value.dim()
    shape[dim] = -1
    return value * keep.view(shape)


def _zero_inputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Direct weight surgery: zero the weights of ``module`` that read input channels ``idx``."""
    w = module.weight
    if isinstance(module, nn.Linear) or module.groups == 1:
        w[:, idx] = 0
        return
    per_in = module.in_channels // module.groups
    per_out = module.out_channels // module.groups
    for i in idx.tolist():
        g, local = divmod(i, per_in)
        w[g * per_out:(g + 1) * per_out, local] = 0


def _mask_nodes(gm: fx.GraphModule, sinks, shapes: dict, device, dtype) -> list[tuple]:
    """Insert a channel mask (all ones until a lesion sets zeros) between each mask sink's value
    and the operation that mixes it; returns (keep buffer, route) per sink."""
    by_name = {n.name: n for n in gm.graph.nodes}
    keeps = []
    for i, sink in enumerate(sinks):
        value, user = by_name[sink.value.name], by_name[sink.user.name]
        name = f"_modlens_keep_{i}"
        width = shapes[sink.value][sink.route.dim - 1]
        gm.register_buffer(name, torch.ones(width, device=device, dtype=dtype))
        with gm.graph.inserting_before(user):
            keep = gm.graph.get_attr(name)
            masked = gm.graph.call_function(_mask, (value, keep, sink.route.dim))
        user.replace_input_with(value, masked)
        keeps.append((getattr(gm, name), sink.route))
    gm.recompile()
    return keeps


def lesioned_copy(adapter: NetworkAdapter, layer: int, neurons: np.ndarray, shapes: dict) -> nn.Module:
    """A deep copy of the captured model with ``neurons`` of layer ``layer`` removed by weight
    surgery (their columns of every consumer zeroed; a channel mask where they enter an operation
    without weights, or a layer whose weight is applied more than once), for the plain oracles (:func:`correct_counts_plain` and the next-token one)."""
    sinks = adapter.structure.sinks[adapter.layer_node(layer)]
    model = copy.deepcopy(adapter.gm)
    calls: dict = {}  # applications of each weight (a shared layer is captured as one module per call)
    for node in model.graph.nodes:
        weight = getattr(model.get_submodule(node.target), "weight", None) if node.op == "call_module" else None
        if isinstance(weight, torch.Tensor):
            calls[weight.data_ptr()] = calls.get(weight.data_ptr(), 0) + 1

    def shared(sink) -> bool:
        return calls.get(model.get_submodule(sink.user.target).weight.data_ptr(), 0) > 1

    for sink in sinks:
        if sink.kind == "layer" and not shared(sink):
            m = model.get_submodule(sink.user.target)
            width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            _zero_inputs(m, torch.as_tensor(sink.route.indices(neurons, width, f"layer '{sink.user.target}'")))
    # a layer applied more than once (shared weights, as ALBERT's) is lesioned in this application
    # only: its input is masked on this edge instead of its weights being zeroed for every call
    masks = [sk for sk in sinks if sk.kind == "mask" or sk.kind == "layer" and shared(sk)]
    for keep, route in _mask_nodes(model, masks, shapes, adapter.device, adapter.dtype):
        keep[torch.as_tensor(route.indices(neurons, keep.shape[0]))] = 0
    return model.eval()


@torch.inference_mode()
def correct_counts_plain(
    adapter: NetworkAdapter,
    layer: int,
    neuron_sets: Sequence[Sequence[int]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 2048,
    memory_budget_bytes: int | None = None,
) -> np.ndarray:
    """The oracle, independent of the fast path's plan: for each set, a deep copy of the captured
    model in which the neurons' outgoing weights are zeroed by direct weight surgery (every
    layer that reads them, grouped convs and per-position Linears included) and, where they
    enter an operation without weights (residual addition, normalization, gate), their channels
    are multiplied by zero; then the whole test set runs through the copy's forward pass.
    Same result as :meth:`IncrementalLesions.correct_counts`, one full pass per lesion."""
    info = adapter.layers[layer]
    sets = _as_index_sets(neuron_sets, info.n_neurons, info.name)
    check_labels(y, adapter.n_classes, name="test data")
    adapter.check_input(x, "test data")
    shapes = adapter.node_shapes(x[:2])
    device, dtype = adapter.device, adapter.dtype
    budget = int(memory_budget_bytes or _memory.default_budget(device))
    batch = _memory.batch_for(shapes, dtype, batch_size, _memory.block_bytes(device, budget))
    y_dev = y.to(device)
    count_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    onehot = torch.nn.functional.one_hot(y_dev, adapter.n_classes).to(count_dtype)
    out = np.zeros((len(sets), adapter.n_classes), dtype=np.int64)
    for i, s in enumerate(sets):
        model = lesioned_copy(adapter, layer, s, shapes)
        total = torch.zeros(adapter.n_classes, dtype=count_dtype, device=device)
        for start in range(0, x.shape[0], batch):
            xb = to_model(x[start:start + batch], device, dtype)
            pred = model(xb).argmax(-1)
            total += _class_counts(pred, y_dev[start:start + xb.shape[0]], onehot[start:start + xb.shape[0]])
        out[i] = total.round().to(torch.int64).cpu().numpy()
    return out


class PlainLesions:
    """The ``"plain"`` engine: :func:`correct_counts_plain`, one full forward pass of a weight-
    edited copy per lesion set. The reference the incremental engine is checked against."""

    def __init__(self, adapter: NetworkAdapter, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048,
                 memory_budget_bytes: int | None = None):
        check_labels(y, adapter.n_classes, name="test data")
        adapter.check_input(x, "test data")
        if len(x) != len(y):
            raise ValueError(f"test data: {len(x)} inputs but {len(y)} labels")
        self.adapter, self.x, self.y = adapter, x, y
        self._options = dict(batch_size=batch_size, memory_budget_bytes=memory_budget_bytes)
        self.class_sizes = np.bincount(y.cpu().numpy(), minlength=adapter.n_classes)
        self.baseline = correct_counts_plain(adapter, 0, [[]], x, y, **self._options)[0]

    def correct_counts(self, layer: int, neuron_sets: Sequence[Sequence[int]], *,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        counts = correct_counts_plain(self.adapter, layer, neuron_sets, self.x, self.y, **self._options)
        if progress is not None:
            progress(len(neuron_sets))
        return counts


#: The lesion engines by name (``engine=`` of ``analyze``; both give the same counts).
ENGINES = {"incremental": IncrementalLesions, "plain": PlainLesions}


def lesion_engine(name: str, adapter: NetworkAdapter, x: torch.Tensor, y: torch.Tensor, **options) -> LesionEngine:
    """The engine ``name`` (``"incremental"`` or ``"plain"``) on test set ``(x, y)``."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return ENGINES[name](adapter, x, y, **options)
