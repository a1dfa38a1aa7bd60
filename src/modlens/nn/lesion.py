"""Lesion evaluation: class-wise correct counts of a network with sets of neurons removed.

A lesioned neuron contributes nothing downstream (paper, section 4.1: the weights out of
it are zero). Two paths compute the same numbers:

* :func:`correct_counts_plain`, the oracle: zero the outgoing weights in a copy of the
  model and run the whole test set through the model's own forward, one lesion at a time.
* :class:`LesionEvaluator`, the fast path. Nothing before the lesioned layer changes, so it
  caches, for every hidden layer l, the consumer's input ``u_l`` and output ``z_{l+1}`` once.
  Removing the set S changes the consumer output by the low-rank term
  ``u_l[:, S] @ W[:, S].T``; many lesion sets of one size are corrected together with one
  batched matrix product, and only the layers after the consumer are recomputed.

For an MLP with hidden width h, a lesion in layer l costs N*|S|*h for the correction plus
N*h*h per later hidden layer, against N*(d*h + (L-1)*h*h) for the whole forward pass.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch

from modlens.nn import _fx
from modlens.nn.adapter import MLPAdapter
from modlens.nn.inputs import batches, check_labels

# Largest number of elements in one (masks x samples x width) block of the fast path.
_BLOCK_ELEMENTS = 1 << 20


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


class LesionEvaluator:
    """Fast, batched lesion evaluation on a fixed test set.

    Parameters
    ----------
    adapter:
        The model's :class:`MLPAdapter`.
    x, y:
        Test inputs and integer labels (CPU tensors; moved to the model's device in chunks).
    batch_size:
        Samples per forward pass when filling the cache.
    """

    def __init__(self, adapter: MLPAdapter, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048):
        self.adapter = adapter
        self.device, self.dtype = _fx.module_device_dtype(adapter.model)
        check_labels(y, adapter.n_classes, name="test data")
        self.n_classes = adapter.n_classes
        self.y = y.to(self.device)
        self.onehot = torch.nn.functional.one_hot(self.y, self.n_classes).to(self.dtype)
        self.class_sizes = np.bincount(y.numpy(), minlength=self.n_classes)
        n_layers = len(adapter.layers)
        us: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        zs: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]
        for z_list, u_list, logits in adapter.iter_records(batches(x, batch_size, device=self.device, dtype=self.dtype)):
            for i in range(n_layers):
                us[i].append(u_list[i])
                zs[i].append(z_list[i])
            zs[n_layers].append(logits)
        self.u = [torch.cat(p) for p in us]
        # z[l + 1] is the consumer output of hidden layer l (the last one is the output layer).
        self.z = [torch.cat(p) for p in zs]
        with torch.inference_mode(), _fx.run_in_eval(adapter.model):
            out = adapter.tail(n_layers - 1)(self.z[n_layers])
        self.baseline = _class_counts(out.argmax(-1), self.y, self.onehot).cpu().numpy()

    def correct_counts(
        self, layer: int, neuron_sets: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Correct predictions per class, shape (len(neuron_sets), n_classes), with each set of
        neurons of hidden layer ``layer`` lesioned in turn."""
        info = self.adapter.layers[layer]
        sets = _as_index_sets(neuron_sets, info.n_neurons, info.name)
        result = np.zeros((len(sets), self.n_classes), dtype=np.int64)
        by_size: dict[int, list[int]] = {}
        for i, s in enumerate(sets):
            by_size.setdefault(s.size, []).append(i)
        for size, members in by_size.items():
            if size == 0:
                result[members] = self.baseline
                continue
            idx = torch.as_tensor(np.stack([sets[i] for i in members]), device=self.device)
            result[members] = self._counts_same_size(layer, idx)
            if progress is not None:
                progress(len(members))
        return result

    @torch.inference_mode()
    def _counts_same_size(self, layer: int, idx: torch.Tensor) -> np.ndarray:
        u, z = self.u[layer], self.z[layer + 1]
        weight = self.adapter.consumer(layer).weight.detach().to(self.dtype)  # (out, width)
        tail = self.adapter.tail(layer)
        n_sets, size = idx.shape
        n, out_width = z.shape
        counts = torch.zeros(n_sets, self.n_classes, dtype=self.dtype, device=self.device)
        widest = max(out_width, max(l.n_neurons for l in self.adapter.layers[layer:]), size)
        sets_per_block = max(1, min(n_sets, _BLOCK_ELEMENTS // (widest * min(n, 256))))
        with _fx.run_in_eval(self.adapter.model):
            for b0 in range(0, n_sets, sets_per_block):
                block = idx[b0:b0 + sets_per_block]                       # (B, s)
                nb = block.shape[0]
                w_sel = weight[:, block].permute(1, 2, 0)                 # (B, s, out)
                chunk = max(1, _BLOCK_ELEMENTS // (nb * widest))
                for s0 in range(0, n, chunk):
                    u_sel = u[s0:s0 + chunk][:, block].permute(1, 0, 2)   # (B, c, s)
                    z_new = z[s0:s0 + chunk].unsqueeze(0) - torch.bmm(u_sel, w_sel)
                    c = z_new.shape[1]
                    scores = tail(z_new.reshape(nb * c, out_width)).reshape(nb, c, -1)
                    counts[b0:b0 + nb] += _class_counts(scores.argmax(-1), self.y[s0:s0 + c], self.onehot[s0:s0 + c])
        return counts.round().to(torch.int64).cpu().numpy()


@torch.inference_mode()
def correct_counts_plain(
    adapter: MLPAdapter,
    layer: int,
    neuron_sets: Sequence[Sequence[int]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 2048,
) -> np.ndarray:
    """The oracle: for each set, zero its outgoing weights in a copy of the model and run
    the model's own forward over the whole test set. Same result as
    :meth:`LesionEvaluator.correct_counts`, one full pass per lesion."""
    info = adapter.layers[layer]
    sets = _as_index_sets(neuron_sets, info.n_neurons, info.name)
    model = copy.deepcopy(adapter.model)
    device, dtype = _fx.module_device_dtype(model)
    consumer_name = adapter._linear_nodes[layer + 1].target
    weight = model.get_submodule(consumer_name).weight
    check_labels(y, adapter.n_classes, name="test data")
    y_dev = y.to(device)
    onehot = torch.nn.functional.one_hot(y_dev, adapter.n_classes).to(dtype)
    out = np.zeros((len(sets), adapter.n_classes), dtype=np.int64)
    with _fx.run_in_eval(model):
        for i, s in enumerate(sets):
            saved = weight[:, s].clone()
            weight[:, s] = 0
            try:
                total = torch.zeros(adapter.n_classes, dtype=dtype, device=device)
                start = 0
                for xb in batches(x, batch_size, device=device, dtype=dtype):
                    pred = model(xb).argmax(-1)
                    total += _class_counts(pred, y_dev[start:start + xb.shape[0]], onehot[start:start + xb.shape[0]])
                    start += xb.shape[0]
            finally:
                weight[:, s] = saved
            out[i] = total.round().to(torch.int64).cpu().numpy()
    return out
