"""Lesions of a language model on next-token data (docs/language-models.md, sections 4, 5 and 8).

A lesioned MLP neuron is zero at every position (its column of the block's second map reads
nothing). For each lesion set the engines return, per *cell* of the test positions (the joint
classification of :meth:`modlens.nn.tokens.TokenData.cells`: token class x position label), the
number of positions whose argmax is the target and the sum of the cross-entropies
``-log softmax(logits)[target]``; every next-token metric is computed from these two arrays.

* :class:`IncrementalTokenLesions`, the fast path: the lesion plan of the layer
  (:class:`modlens.nn._plan.LesionPlan`) caches everything before the lesioned block's second map
  once (the prefix: all earlier blocks run once for every lesion set), then runs only the rest of
  the network for many lesion sets at once, stacked along the batch dimension. Its memory budget
  counts the ``(sets x sequences x T x V)`` logits and the log-softmax made from them.
* :class:`PlainTokenLesions` (:func:`token_counts_plain`), the oracle: a deep copy of the captured
  model with the neurons' outgoing weights zeroed, one full forward pass per lesion set.

Both give the same counts (and cross-entropy sums equal to rounding) in float64.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from modlens.nn import _fx, _memory
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.inputs import to_model
from modlens.nn.lesion import IncrementalLesions, _as_index_sets, lesioned_copy
from modlens.nn.tokens import IGNORE, TokenData, check_vocabulary


def token_scores(logits: torch.Tensor, targets: torch.Tensor, cells: torch.Tensor, n_cells: int):
    """Per lesion set, correct predictions and cross-entropy sums per cell.

    ``logits`` (S, n, T, V), ``targets`` (n, T) with -100 where not scored, ``cells`` (n, T) (-1 where
    not scored). Returns ``(correct, ce)``, both float64 (S, n_cells)."""
    s = logits.shape[0]
    scored = targets != IGNORE
    tgt = targets.clamp(min=0)
    correct = (logits.argmax(-1) == tgt).reshape(s, -1).to(torch.float64)
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, tgt.unsqueeze(0).unsqueeze(-1).expand(s, *tgt.shape, 1)).squeeze(-1)
    del logp
    index = torch.where(scored, cells, torch.full_like(cells, n_cells)).reshape(1, -1).expand(s, -1)
    out = []
    for values in (correct, nll.reshape(s, -1).to(torch.float64)):
        acc = torch.zeros(s, n_cells + 1, dtype=torch.float64, device=logits.device)
        acc.scatter_add_(1, index, values)
        out.append(acc[:, :n_cells])
    return out[0], out[1]


class _TokenEngine:
    """What both token engines share: the data, its cells and the result format."""

    def _setup(self, adapter: NetworkAdapter, data: TokenData) -> None:
        if not adapter.is_transformer:
            raise ValueError(f"the next-token task needs a language model (a model with attention whose output layer "
                             f"gives one score per vocabulary entry at every position); {type(adapter.model).__name__} "
                             "has no attention")
        check_vocabulary(data, adapter.n_classes, name="test data")
        adapter.check_input(data.ids, "test data")
        self.adapter = adapter
        self.data = data
        self.x = data.ids
        self.n_cells = data.n_cells
        self.class_sizes = data.cell_sizes()
        self.n_scored = int(self.class_sizes.sum())
        if self.n_scored == 0:
            raise ValueError("test data: no position is scored (every target is -100 or masked)")

    def lesion_counts(self, layer: int, neuron_sets, *, progress=None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def correct_counts(self, layer: int, neuron_sets: Sequence[Sequence[int]], *,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Correct next-token predictions per cell, (len(neuron_sets), n_cells)."""
        return self.lesion_counts(layer, neuron_sets, progress=progress)[0]


class IncrementalTokenLesions(_TokenEngine, IncrementalLesions):
    """Fast, batched next-token lesions (the ``"incremental"`` engine of the next-token task)."""

    def __init__(self, adapter: NetworkAdapter, data: TokenData, *, batch_size: int = 256,
                 memory_budget_bytes: int | None = None):
        self._setup(adapter, data)
        self.skip = False  # cross-entropy needs every logit: no pair's prediction is known without its tail
        self.channels_last = False  # token ids: no 2-D conv layout to convert
        self.device, self.dtype = adapter.device, adapter.dtype
        self.targets = data.targets.to(self.device)
        self.cells = data.cells().to(self.device)
        self.budget = int(memory_budget_bytes or _memory.default_budget(self.device))
        self.itemsize = _memory.itemsize(self.dtype)
        self.shapes = adapter.node_shapes(self.x[:2])
        t = int(self.x.shape[1])
        #: per (set, sequence): the log-softmax of the logits and its temporaries, beyond the tail's values
        self.extra_elements = 2 * t * int(adapter.n_classes)
        self.batch_size = _memory.batch_for(self.shapes, self.dtype, batch_size,
                                            _memory.block_bytes(self.device, self.budget // 4),
                                            extra_elements=self.extra_elements)
        self._init_caches()
        self.baseline, self.baseline_ce = self._baseline()

    @torch.inference_mode()
    def _baseline(self):
        correct = torch.zeros(self.n_cells, dtype=torch.float64, device=self.device)
        ce = torch.zeros_like(correct)
        start = 0
        with _fx.eval_mode(self.adapter.model):
            for xb in self._batches(0, len(self.x)):
                n = xb.shape[0]
                c, e = token_scores(self.adapter.gm(xb).unsqueeze(0), self.targets[start:start + n],
                                    self.cells[start:start + n], self.n_cells)
                correct += c[0]
                ce += e[0]
                start += n
        return correct.round().to(torch.int64).cpu().numpy(), ce.cpu().numpy()

    def _block_shape(self, plan, n_sets: int, set_size: int, n_chunk: int) -> tuple[int, int]:
        """(sets, sequences) per block: the plan's working values plus the logits' log-softmax,
        ``sets x sequences x T x V`` elements, within the block budget."""
        work = max(1, (plan.work_elements(self.shapes) + self.extra_elements) * self.itemsize)
        block = _memory.block_bytes(self.device, self.budget - self.budget // 2)
        pairs = max(1, block // work)
        samples = max(1, min(n_chunk, pairs))
        return max(1, min(n_sets, pairs // samples)), samples

    def lesion_counts(self, layer: int, neuron_sets, *, progress=None) -> tuple[np.ndarray, np.ndarray]:
        """``(correct, ce)``: per lesion set of layer ``layer``, correct predictions (int64) and
        cross-entropy sums (float64) per cell, each (len(neuron_sets), n_cells)."""
        info = self.adapter.layers[layer]
        sets = _as_index_sets(neuron_sets, info.n_neurons, info.name)
        correct = np.zeros((len(sets), self.n_cells), dtype=np.int64)
        ce = np.zeros((len(sets), self.n_cells), dtype=np.float64)
        self.last_stats = {"layer": layer, "cache_chunks": 0, "blocks": 0}
        by_size: dict[int, list[int]] = {}
        for i, s in enumerate(sets):
            by_size.setdefault(s.size, []).append(i)
        if 0 in by_size:
            members = by_size.pop(0)
            correct[members], ce[members] = self.baseline, self.baseline_ce
            if progress is not None:
                progress(len(members))
        if by_size:
            groups = [(members, np.stack([sets[i] for i in members])) for members in by_size.values()]
            for members, (c, e) in zip(by_size.values(), self._token_counts(layer, groups, progress)):
                correct[members], ce[members] = c, e
        return correct, ce

    @torch.inference_mode()
    def _token_counts(self, layer: int, groups: list, progress) -> list:
        plan = self.adapter.lesion_plan(layer)
        prepared = []
        for _, sets in groups:
            n = len(sets)
            prepared.append((*self._indices(plan, sets),
                             torch.zeros(n, self.n_cells, dtype=torch.float64, device=self.device),
                             torch.zeros(n, self.n_cells, dtype=torch.float64, device=self.device), sets.shape[1]))
        stats = self.last_stats
        stats["skip"] = None
        with _fx.eval_mode(self.adapter.model):
            for start, stop, cached in self._cache_chunks(layer, plan):
                stats["cache_chunks"] += 1
                last = stop == len(self.x)
                for corr_idx, mask_idx, correct, ce, set_size in prepared:
                    n_sets = correct.shape[0]
                    for b0, b1, s0, s1, ci, mi in self._blocks(plan, corr_idx, mask_idx, n_sets, set_size, start, stop):
                        lo, hi = start + s0, start + s1
                        logits = self._tail(plan, cached, b0, b1, s0, s1, ci, mi)
                        c, e = token_scores(logits, self.targets[lo:hi], self.cells[lo:hi], self.n_cells)
                        del logits
                        correct[b0:b1] += c
                        ce[b0:b1] += e
                    if last and progress is not None:
                        progress(n_sets)
        return [(c.round().to(torch.int64).cpu().numpy(), e.cpu().numpy()) for _, _, c, e, _ in prepared]


@torch.inference_mode()
def token_counts_plain(adapter: NetworkAdapter, layer: int, neuron_sets, data: TokenData, *, batch_size: int = 256,
                       memory_budget_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: ``(correct, ce)`` per lesion set and cell, one full forward pass of a
    weight-edited copy per set (independent of the fast path's plan)."""
    info = adapter.layers[layer]
    sets = _as_index_sets(neuron_sets, info.n_neurons, info.name)
    check_vocabulary(data, adapter.n_classes, name="test data")
    shapes = adapter.node_shapes(data.ids[:2])
    device, dtype = adapter.device, adapter.dtype
    budget = int(memory_budget_bytes or _memory.default_budget(device))
    extra = 2 * int(data.ids.shape[1]) * int(adapter.n_classes)
    batch = _memory.batch_for(shapes, dtype, batch_size, _memory.block_bytes(device, budget), extra_elements=extra)
    targets, cells, n_cells = data.targets.to(device), data.cells().to(device), data.n_cells
    correct = np.zeros((len(sets), n_cells), dtype=np.int64)
    ce = np.zeros((len(sets), n_cells), dtype=np.float64)
    for i, s in enumerate(sets):
        model = lesioned_copy(adapter, layer, s, shapes)
        c_sum = torch.zeros(n_cells, dtype=torch.float64, device=device)
        e_sum = torch.zeros_like(c_sum)
        for start in range(0, len(data), batch):
            xb = to_model(data.ids[start:start + batch], device, dtype)
            c, e = token_scores(model(xb).unsqueeze(0), targets[start:start + xb.shape[0]],
                                cells[start:start + xb.shape[0]], n_cells)
            c_sum += c[0]
            e_sum += e[0]
        correct[i], ce[i] = c_sum.round().to(torch.int64).cpu().numpy(), e_sum.cpu().numpy()
    return correct, ce


class PlainTokenLesions(_TokenEngine):
    """The ``"plain"`` engine of the next-token task: :func:`token_counts_plain`."""

    def __init__(self, adapter: NetworkAdapter, data: TokenData, *, batch_size: int = 256,
                 memory_budget_bytes: int | None = None):
        self._setup(adapter, data)
        self._options = dict(batch_size=batch_size, memory_budget_bytes=memory_budget_bytes)
        c, e = token_counts_plain(adapter, 0, [[]], data, **self._options)
        self.baseline, self.baseline_ce = c[0], e[0]

    def lesion_counts(self, layer: int, neuron_sets, *, progress=None) -> tuple[np.ndarray, np.ndarray]:
        out = token_counts_plain(self.adapter, layer, neuron_sets, self.data, **self._options)
        if progress is not None:
            progress(len(neuron_sets))
        return out


#: The next-token lesion engines by name (``engine=`` of ``analyze``; both give the same counts).
TOKEN_ENGINES = {"incremental": IncrementalTokenLesions, "plain": PlainTokenLesions}


def token_lesion_engine(name: str, adapter: NetworkAdapter, data: TokenData, **options):
    """The next-token engine ``name`` (``"incremental"`` or ``"plain"``) on test data ``data``."""
    if name not in TOKEN_ENGINES:
        raise ValueError(f"engine must be one of {', '.join(TOKEN_ENGINES)}, got {name!r}")
    return TOKEN_ENGINES[name](adapter, data, **options)


__all__ = ["IncrementalTokenLesions", "PlainTokenLesions", "TOKEN_ENGINES", "token_lesion_engine",
           "token_counts_plain", "token_scores"]
