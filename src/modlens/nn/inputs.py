"""Turn what users pass as data into validated (inputs, labels) tensors."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def as_tensors(data, *, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Accept ``(inputs, labels)`` (tensors or arrays), a DataLoader or any iterable of
    ``(inputs, labels)`` batches, or an object with ``.x`` and ``.y`` (a modlens Dataset).

    Returns float inputs and int64 labels on the CPU, checked for shape agreement and NaN.
    """
    if data is None:
        raise ValueError(f"{name} is missing: pass (inputs, labels) tensors or a DataLoader")
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2 and not _is_batch_list(data):
        x, y = data
    else:
        xs, ys = [], []
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(
                f"{name} must be an (inputs, labels) pair or a DataLoader yielding (inputs, labels); "
                f"got {type(data).__name__}"
            ) from None
        for batch in iterator:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"{name}: each batch must be an (inputs, labels) pair, got {type(batch).__name__}")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError(f"{name} is empty: the DataLoader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} is empty: inputs have shape {tuple(x.shape)}")
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must be a 1-D array of class indices, got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: {x.shape[0]} inputs (shape {tuple(x.shape)}) but {y.shape[0]} labels; they must match"
        )
    if y.is_floating_point():
        if not torch.all(y == y.round()):
            raise ValueError(f"{name}: labels must be integer class indices, got non-integer floats")
    y = y.long()
    if not x.is_floating_point() and x.dtype not in INDEX_DTYPES:
        x = x.float()  # images stored as uint8/bool; int32/int64 inputs stay token ids
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero()[0])
        raise ValueError(f"{name}: inputs contain NaN or inf (first at sample {bad})")
    return x.cpu(), y.cpu()


def as_inputs(data, *, name: str = "data") -> torch.Tensor:
    """Inputs only: a tensor or array of inputs, or anything :func:`as_tensors` accepts
    (labels are then ignored)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        data = (data, np.zeros(len(data), dtype=np.int64))
    return as_tensors(data, name=name)[0]


def _is_batch_list(data) -> bool:
    """A list of (x, y) batches rather than one (x, y) pair."""
    first = data[0]
    return isinstance(first, (tuple, list)) and len(first) == 2 and hasattr(first[0], "shape")


def check_labels(y: torch.Tensor, n_classes: int, *, name: str = "data") -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {n_classes - 1}] (the model has {n_classes} outputs); "
            f"found range [{int(y.min())}, {int(y.max())}]"
        )


INDEX_DTYPES = (torch.int32, torch.int64)


def to_model(x: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """``x`` on ``device``; floating inputs cast to the model's ``dtype``, integer inputs (token
    ids for an embedding lookup) kept as they are."""
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)


def batches(x: torch.Tensor, batch_size: int, *, device=None, dtype=None) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield to_model(x[start:start + batch_size], device, dtype)
