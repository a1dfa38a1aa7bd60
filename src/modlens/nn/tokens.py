"""Next-token data at the torch boundary (docs/language-models.md, section 3).

:func:`as_token_data` turns what users pass for a language model into one validated
:class:`TokenData`: token ids ``(N, T)``, the target of every position (``-100``: not scored) and
the classes of every scored position under two schemes, for coherence:

* **token classes**: the class of the position's *target* token, from ``token_classes`` (an int
  array over the vocabulary, or a mapping from token id to class; ``-1``: no class), e.g. byte
  classes;
* **position labels**: a label of the position itself, from ``position_classes`` (``(N,)`` for
  one label per sequence, or ``(N, T)``; ``-1``: no label), e.g. the genre of each sequence.

Accepted data: ids alone (a tensor or array ``(N, T)``: position ``t`` is scored against token
``t + 1``, the last position of every sequence is not scored); a mapping with ``input_ids`` (or
``ids``) and either ``labels`` (the Hugging Face convention, aligned with the ids: position ``t``
is scored against ``labels[:, t + 1]`` unless that is -100) or ``targets`` (already shifted:
``targets[:, t]`` is the token to predict at ``t``, -100 where not scored), plus an optional
``attention_mask`` (right padding: ones, then zeros; a position is scored only where it and its
target are real tokens); a DataLoader or iterable of such batches; or a dataset object with
``ids`` and ``targets`` (such as :class:`modlens.data.TextDataset`, which also brings its token
classes and position labels). A bare pair ``(ids, y)`` is refused: it does not say which of the
two conventions ``y`` follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from modlens.nn.inputs import INDEX_DTYPES

IGNORE = -100
#: Class of a position under a scheme that does not classify it (or when no scheme is given).
NO_CLASS = -1


@dataclass(frozen=True, eq=False)
class TokenData:
    """Validated next-token data: ``ids`` and ``targets`` int64 ``(N, T)`` on the CPU (``targets``
    -100 where a position is not scored), ``token_class`` and ``label`` int64 ``(N, T)`` (-1 where a
    position has no class / label), and the names of the classes and labels."""

    ids: torch.Tensor
    targets: torch.Tensor
    token_class: torch.Tensor
    label: torch.Tensor
    class_names: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    mask: torch.Tensor | None = None  # (N, T) attention mask (1 = real token), as given

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def scored(self) -> torch.Tensor:
        """(N, T) bool: the positions whose prediction is scored."""
        return self.targets != IGNORE

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def n_cells(self) -> int:
        """Cells of the joint classification: (token classes + 1) x (labels + 1), the last of each
        being "none"."""
        return (len(self.class_names) + 1) * (len(self.label_names) + 1)

    def cells(self) -> torch.Tensor:
        """(N, T) int64: the cell of every scored position (class-major: ``class * (L + 1) + label``
        with "none" as class ``C`` / label ``L``), -1 where not scored."""
        c = torch.where(self.token_class >= 0, self.token_class, torch.full_like(self.token_class, len(self.class_names)))
        l = torch.where(self.label >= 0, self.label, torch.full_like(self.label, len(self.label_names)))
        cell = c * (len(self.label_names) + 1) + l
        return torch.where(self.scored, cell, torch.full_like(cell, -1))

    def cell_sizes(self) -> np.ndarray:
        """Scored positions per cell, ``(n_cells,)`` int64."""
        cells = self.cells()
        return np.bincount(cells[cells >= 0].numpy(), minlength=self.n_cells).astype(np.int64)

    def positions(self) -> np.ndarray:
        """``(P, 2)`` int64 (sequence, position) pairs of the real tokens (where the mask is 1; all
        positions without a mask), in order."""
        real = torch.ones_like(self.ids, dtype=torch.bool) if self.mask is None else self.mask.bool()
        return real.nonzero().numpy().astype(np.int64)

    def subset(self, index) -> "TokenData":
        """The sequences ``index`` (a slice, or an index array)."""
        pick = (lambda t: None if t is None else t[index])
        return TokenData(self.ids[index], self.targets[index], self.token_class[index], self.label[index],
                         self.class_names, self.label_names, pick(self.mask))


def is_token_data(data) -> bool:
    return isinstance(data, TokenData)


def _tensor(value, what: str, name: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.is_floating_point():
        if not torch.all(t == t.round()):
            raise ValueError(f"{name}: {what} must be integers, got non-integer floats")
    elif t.dtype == torch.bool:
        t = t.long()
    elif t.dtype not in INDEX_DTYPES and t.dtype not in (torch.int8, torch.int16, torch.uint8):
        raise TypeError(f"{name}: {what} must be integers, got dtype {t.dtype}")
    return t.long().cpu()


def _first(mapping: Mapping, *keys):
    for k in keys:
        if k in mapping and mapping[k] is not None:
            return mapping[k]
    return None


def _batch_parts(batch, name: str) -> dict:
    """One batch as {"ids": ..., "labels": ..., "targets": ..., "mask": ...}."""
    if isinstance(batch, Mapping):
        ids = _first(batch, "input_ids", "ids")
        if ids is None:
            raise ValueError(f"{name}: a mapping of next-token data needs 'input_ids' (or 'ids'); got keys "
                             f"{sorted(batch)}")
        labels, targets = _first(batch, "labels"), _first(batch, "targets")
        if labels is not None and targets is not None:
            raise ValueError(f"{name}: give 'labels' (aligned with the ids, Hugging Face's convention) or "
                             "'targets' (already shifted: the token to predict at each position), not both")
        return {"ids": ids, "labels": labels, "targets": targets, "mask": _first(batch, "attention_mask")}
    if hasattr(batch, "ids") and hasattr(batch, "targets"):
        return {"ids": batch.ids, "labels": None, "targets": batch.targets, "mask": getattr(batch, "attention_mask", None)}
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return _batch_parts(batch[0], name)
        raise ValueError(
            f"{name}: a pair (ids, y) is ambiguous for next-token data; pass the ids alone (each position is "
            "scored against the next token), or a dict {'input_ids': ids, 'labels': y} when y is aligned with "
            "the ids (Hugging Face; -100 = ignored) or {'input_ids': ids, 'targets': y} when y[:, t] is the token "
            "to predict at position t")
    return {"ids": batch, "labels": None, "targets": None, "mask": None}


def _concat(parts: list[dict], name: str) -> dict:
    out = {}
    for key in ("ids", "labels", "targets", "mask"):
        given = [p[key] is not None for p in parts]
        if any(given) and not all(given):
            raise ValueError(f"{name}: some batches have {key!r} and some do not")
        out[key] = torch.cat([_tensor(p[key], key, name) for p in parts]) if all(given) else None
    return out


def _targets(ids: torch.Tensor, labels, targets, mask, name: str) -> torch.Tensor:
    n, t = ids.shape
    if targets is not None:
        if tuple(targets.shape) != (n, t):
            raise ValueError(f"{name}: targets have shape {tuple(targets.shape)}; expected {(n, t)} like the ids")
        out = targets.clone()
    else:
        src = ids if labels is None else labels
        if tuple(src.shape) != (n, t):
            raise ValueError(f"{name}: labels have shape {tuple(src.shape)}; expected {(n, t)} like the ids")
        out = torch.full_like(ids, IGNORE)
        out[:, :-1] = src[:, 1:]
    if mask is not None:
        if tuple(mask.shape) != (n, t):
            raise ValueError(f"{name}: attention_mask has shape {tuple(mask.shape)}; expected {(n, t)}")
        m = mask != 0
        if (m[:, 1:] & ~m[:, :-1]).any():
            row = int((m[:, 1:] & ~m[:, :-1]).any(1).nonzero()[0])
            raise ValueError(f"{name}: the attention mask of sequence {row} is not right padding (ones, then zeros); "
                             "modlens scores real positions of right-padded sequences only (left padding changes "
                             "what the real positions attend to)")
        out[~m] = IGNORE
        if targets is None:
            nxt = torch.zeros_like(m)
            nxt[:, :-1] = m[:, 1:]
            out[~nxt] = IGNORE
    bad = (out != IGNORE) & (out < 0)
    if bad.any():
        raise ValueError(f"{name}: targets must be token ids >= 0 or -100 (ignored); found {int(out[bad][0])}")
    return out


def _class_table(token_classes, name: str) -> np.ndarray:
    if isinstance(token_classes, Mapping):
        keys = [int(k) for k in token_classes]
        table = np.full(max(keys) + 1 if keys else 0, NO_CLASS, dtype=np.int64)
        for k, v in token_classes.items():
            table[int(k)] = int(v)
        return table
    table = np.asarray(token_classes)
    if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{name}: token_classes must be a 1-D int array over the vocabulary (or a mapping "
                         f"token id -> class), got shape {table.shape} dtype {table.dtype}")
    return table.astype(np.int64)


def _names(names, values: np.ndarray, kind: str) -> tuple[str, ...]:
    n = int(values.max()) + 1 if values.size and values.max() >= 0 else 0
    if names is None:
        return tuple(f"{kind} {i}" for i in range(n))
    names = tuple(str(x) for x in names)
    if len(names) < n:
        raise ValueError(f"{len(names)} {kind} names for {n} {kind}es (values up to {n - 1})")
    return names


def as_token_data(data, *, token_classes=None, position_classes=None, class_names: Iterable[str] | None = None,
                  label_names: Iterable[str] | None = None, name: str = "data") -> TokenData:
    """Validated :class:`TokenData` from what users pass (module docstring)."""
    if data is None:
        raise ValueError(f"{name} is missing: pass token ids (N, T), a dict with input_ids, or a DataLoader")
    if isinstance(data, TokenData):
        if token_classes is None and position_classes is None:
            return data
        data = {"input_ids": data.ids, "targets": data.targets, "attention_mask": data.mask}
    if isinstance(data, tuple) and len(data) == 2:
        _batch_parts(data, name)  # a pair (ids, y): refused with the two conventions spelled out
    dataset = data if hasattr(data, "ids") and hasattr(data, "targets") else None
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping)) or dataset is not None or (
            isinstance(data, (tuple, list)) and data and not isinstance(data[0], (Mapping, tuple, list, torch.Tensor))):
        parts = _batch_parts(data, name)
        parts = {k: None if v is None else _tensor(v, k, name) for k, v in parts.items()}
    else:
        try:
            batches = list(iter(data))
        except TypeError:
            raise TypeError(f"{name}: next-token data must be token ids (N, T), a dict with input_ids, a dataset with "
                            f"ids and targets, or a DataLoader of those; got {type(data).__name__}") from None
        if not batches:
            raise ValueError(f"{name} is empty: the DataLoader yielded no batches")
        parts = _concat([_batch_parts(b, name) for b in batches], name)
    ids = parts["ids"]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"{name}: token ids must have shape (N, T) with N >= 1 and T >= 2, got {tuple(ids.shape)}")
    if int(ids.min()) < 0:
        raise ValueError(f"{name}: token ids must be >= 0, found {int(ids.min())}")
    targets = _targets(ids, parts["labels"], parts["targets"], parts["mask"], name)
    if token_classes is None and dataset is not None and getattr(dataset, "token_classes", None) is not None:
        token_classes, class_names = dataset.token_classes, class_names or getattr(dataset, "token_class_names", None)
    if position_classes is None and dataset is not None and callable(getattr(dataset, "position_labels", None)):
        position_classes, label_names = dataset.position_labels(), label_names or getattr(dataset, "label_names", None)
    token_class = torch.full_like(ids, NO_CLASS)
    if token_classes is not None:
        table = _class_table(token_classes, name)
        if table.size and table.min() < NO_CLASS:
            raise ValueError(f"{name}: token_classes must be >= -1 (-1: no class), found {int(table.min())}")
        known = (targets >= 0) & (targets < table.size)
        token_class[known] = torch.from_numpy(table)[targets[known]]
        class_names = _names(class_names, table, "class")
    else:
        class_names = ()
    label = torch.full_like(ids, NO_CLASS)
    if position_classes is not None:
        lab = _tensor(position_classes, "position_classes", name)
        if lab.dim() == 1 and lab.shape[0] == ids.shape[0]:
            lab = lab[:, None].expand_as(ids)
        if tuple(lab.shape) != tuple(ids.shape):
            raise ValueError(f"{name}: position_classes must have shape ({ids.shape[0]},) (one label per sequence) or "
                             f"{tuple(ids.shape)} (one per position), got {tuple(lab.shape)}")
        if int(lab.min()) < NO_CLASS:
            raise ValueError(f"{name}: position_classes must be >= -1 (-1: no label), found {int(lab.min())}")
        label = lab.clone()
        label_names = _names(label_names, lab.numpy(), "label")
    else:
        label_names = ()
    mask = None if parts["mask"] is None else (parts["mask"] != 0).long()
    return TokenData(ids, targets, token_class, label, tuple(class_names), tuple(label_names), mask)


def check_vocabulary(data: TokenData, vocab_size: int, *, name: str = "data") -> None:
    """One line when a token id or a target lies outside the model's vocabulary (its output width)."""
    for what, t in (("token ids", data.ids), ("targets", data.targets[data.scored])):
        if t.numel() and int(t.max()) >= vocab_size:
            raise ValueError(f"{name}: {what} must lie in [0, {vocab_size - 1}] (the model's output layer has "
                             f"{vocab_size} units, its vocabulary); found {int(t.max())}")


def sample_positions(candidates: np.ndarray, max_positions: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_positions`` rows of ``candidates`` ``(P, 2)`` (sequence, position), drawn without
    replacement from ``rng`` (all of them when there are fewer), sorted by sequence then position."""
    candidates = np.asarray(candidates, dtype=np.int64).reshape(-1, 2)
    if max_positions is not None and len(candidates) > max_positions:
        candidates = candidates[rng.choice(len(candidates), size=int(max_positions), replace=False)]
    return candidates[np.lexsort((candidates[:, 1], candidates[:, 0]))]


def position_values(adapter, ids: torch.Tensor, positions: np.ndarray, layers=None, *, batch_size: int = 256,
                    name: str = "data") -> list[np.ndarray]:
    """Pre-activations of the analysed ``layers`` (default: all) at the given ``(sequence, position)``
    pairs (sorted by sequence, as :func:`sample_positions` gives them): one ``(P, width)`` float
    array per layer, rows in the order of ``positions``. Only the sequences that hold a position run,
    in batches; memory grows with ``P`` x neurons, not with the sequences' length."""
    from modlens.nn import _fx
    from modlens.nn.inputs import to_model

    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    if len(positions) and np.any(np.diff(positions[:, 0]) < 0):
        raise ValueError("position_values: positions must be sorted by sequence (use sample_positions)")
    adapter.check_input(ids, name)
    module = adapter.values(layers)
    seqs = np.unique(positions[:, 0])
    batch = adapter.batch_size_for(ids[:1], batch_size)
    parts: list[list[np.ndarray]] = []
    with torch.no_grad(), _fx.eval_mode(adapter.model):
        for start in range(0, len(seqs), batch):
            chunk = seqs[start:start + batch]
            out = module(to_model(ids[torch.as_tensor(chunk)], adapter.device, adapter.dtype))
            out = out if isinstance(out, tuple) else (out,)
            lo, hi = np.searchsorted(positions[:, 0], [chunk[0], chunk[-1] + 1])
            rows = np.searchsorted(chunk, positions[lo:hi, 0])
            cols = positions[lo:hi, 1]
            parts = parts or [[] for _ in out]
            for i, z in enumerate(out):   # (B, C, T): channels first
                if z.dim() != 3:
                    raise ValueError(f"position_values: layer {i} has values of shape {tuple(z.shape)}; per-position "
                                     "values need (batch, neurons, tokens)")
                parts[i].append(z[torch.as_tensor(rows), :, torch.as_tensor(cols)].cpu().numpy())
    return [np.concatenate(p, 0) for p in parts]


__all__ = ["TokenData", "as_token_data", "check_vocabulary", "is_token_data", "sample_positions", "position_values",
           "IGNORE", "NO_CLASS"]
