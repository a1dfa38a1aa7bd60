"""Training with the paper's recipe (Keras defaults), deterministic for a fixed seed on CPU.

Adam (lr 1e-3, betas (0.9, 0.999), eps 1e-7), cross-entropy on logits, reshuffled each epoch from
an explicit ``torch.Generator``. Writes no files; saving is :func:`modlens.nn.io.save_model`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modlens.core.rng import as_generator
from modlens.nn.models import PAPER_MLP_HIDDEN, build_model

__all__ = ["train_classifier", "accuracy", "split_validation", "train_reference_mlp"]

Progress = Callable[[int, int, float], Any]


def _check_xy(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if not x.is_floating_point():
        raise ValueError(f"{what}: x must be a float tensor, got dtype {x.dtype}")
    if y.ndim != 1 or y.dtype != torch.int64:
        raise ValueError(f"{what}: y must be a 1-D int64 tensor of class labels, got shape "
                         f"{tuple(y.shape)} dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} samples (shape {tuple(x.shape)}) but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    return x, y


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def train_classifier(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` in place on ``(x_train, y_train)``; returns ``{"loss": [mean loss per epoch]}``.

    Batches come from a permutation drawn each epoch from a ``torch.Generator`` seeded with
    ``seed``; the last batch may be smaller (as in Keras). ``progress(epoch, epochs, loss)`` is
    called after each epoch (1-based). The model's train/eval mode is restored afterwards.
    """
    x_train, y_train = _check_xy(x_train, y_train, "train_classifier")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"train_classifier: need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    device = _device(model)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)
    n = x_train.shape[0]
    history: dict[str, list[float]] = {"loss": []}
    was_training = model.training
    model.train()
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x_train[idx].to(device), y_train[idx].to(device)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            mean = total / n
            if not np.isfinite(mean):
                raise FloatingPointError(f"train_classifier: loss became {mean} in epoch {epoch}; lower lr")
            history["loss"].append(mean)
            if progress is not None:
                progress(epoch, epochs, mean)
    finally:
        model.train(was_training)
    return history


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Fraction of samples whose arg-max logit equals the label (eval mode, no gradients)."""
    x, y = _check_xy(x, y, "accuracy")
    device = _device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
                correct += int((model(xb).argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / x.shape[0]


def split_validation(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted, disjoint ``(train_idx, val_idx)`` with ``len(val_idx) == n_val``."""
    n, n_val = int(n), int(n_val)
    if not 0 <= n_val < n:
        raise ValueError(f"split_validation: need 0 <= n_val < n, got n_val={n_val}, n={n}")
    perm = as_generator(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_reference_mlp(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    seed: int,
    epochs: int = 20,
    batch_size: int = 128,
    n_val: int = 5000,
    hidden: Sequence[int] = PAPER_MLP_HIDDEN,
    activation: str = "relu",
    progress: Progress | None = None,
    val_seed: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the paper's MLP (input-256x4-classes) on the training split minus a held-out validation split.

    The validation split (``n_val`` examples, chosen by ``split_validation(len(x_train), n_val,
    val_seed)``, ``val_seed`` defaulting to ``seed``) is never trained on; it is kept for activation
    graphs. Weights are initialized from a ``torch.Generator`` seeded with ``seed`` and the batches
    shuffled from another seeded with ``seed``. Returns ``(model in eval mode, info)``; ``info`` is
    JSON-able and its ``architecture`` entry is what :func:`modlens.nn.io.save_model` needs.
    """
    x_train, y_train = _check_xy(x_train, y_train, "train_reference_mlp (train)")
    x_test, y_test = _check_xy(x_test, y_test, "train_reference_mlp (test)")
    if x_test[0].numel() != x_train[0].numel():
        raise ValueError(f"train_reference_mlp: train samples have shape {tuple(x_train.shape[1:])} "
                         f"but test samples {tuple(x_test.shape[1:])}")
    val_seed = int(seed if val_seed is None else val_seed)
    n_total = int(x_train.shape[0])
    train_idx, val_idx = split_validation(n_total, n_val, val_seed)
    train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    n_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    architecture = {
        "type": "mlp",
        "sizes": [int(x_train[0].numel()), *(int(h) for h in hidden), n_classes],
        "activation": activation,
    }
    model = build_model(architecture, generator=torch.Generator().manual_seed(int(seed)))
    lr = 1e-3
    history = train_classifier(model, x_train[train_t], y_train[train_t], epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    model.eval()
    info = {
        "architecture": architecture,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": lr,
        "n_total": n_total,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "val_seed": val_seed,
        "test_accuracy": accuracy(model, x_test, y_test),
        "val_accuracy": accuracy(model, x_train[val_t], y_train[val_t]) if len(val_idx) else None,
        "train_loss": [float(v) for v in history["loss"]],
    }
    return model, info
