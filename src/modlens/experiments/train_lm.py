"""Training the reference decoder language model (issue 18), deterministic for a seed on the CPU.

The ``gpt`` recipe (:data:`modlens.experiments._reference.RECIPES`): next-token cross-entropy on
contexts of the two-genre text corpus, AdamW (betas 0.9 / 0.95, weight decay on matrices only),
a linear warm-up then a cosine decay of the learning rate to a tenth, gradients clipped to norm 1,
a fixed number of steps. Batches are sequences drawn without replacement from a permutation of
the training contexts (a new permutation from the same seeded ``torch.Generator`` whenever one
is used up). Weights are initialized from another generator seeded with the same seed. Writes no
files; :func:`modlens.study.commands.train_and_save` saves the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modlens.experiments._reference import recipe
from modlens.nn import device_dtype
from modlens.nn.models import GPT_REFERENCE, build_model

Progress = Callable[[int, int, float], Any]
#: Test sequences the saved accuracy and loss are measured on (a balanced subset of the test split).
EVAL_SEQUENCES = 256


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_language_model(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, *, steps: int, batch_size: int,
                         lr: float, warmup: int, weight_decay: float, seed: int,
                         progress: Progress | None = None) -> list[float]:
    """Train ``model`` (token ids ``(B, T)`` -> logits ``(B, T, V)``) in place on next-token
    cross-entropy; ``targets`` ``(N, T)`` are the shifted next tokens (-100 ignored). Returns the loss
    of every step. ``progress(step, steps, loss)`` is called after every step (1-based)."""
    ids, targets = torch.as_tensor(ids), torch.as_tensor(targets)
    if ids.dim() != 2 or targets.shape != ids.shape or ids.shape[0] == 0:
        raise ValueError(f"train_language_model: ids and targets must be (N, T) of the same shape, got "
                         f"{tuple(ids.shape)} and {tuple(targets.shape)}")
    if steps < 0 or batch_size < 1 or warmup < 0 or not lr > 0:
        raise ValueError(f"train_language_model: need steps >= 0, batch_size >= 1, warmup >= 0 and lr > 0, got "
                         f"{steps}, {batch_size}, {warmup}, {lr}")
    device = device_dtype(model)[0]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    order_generator = torch.Generator().manual_seed(int(seed))
    order, used = torch.randperm(ids.shape[0], generator=order_generator), 0
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            if used + batch_size > ids.shape[0]:
                order, used = torch.randperm(ids.shape[0], generator=order_generator), 0
            idx = order[used:used + batch_size]
            used += batch_size
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            xb, yb = ids[idx].to(device), targets[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"train_language_model: loss became {value} at step {step + 1}; lower lr")
            losses.append(value)
            if progress is not None:
                progress(step + 1, steps, value)
    finally:
        model.train(was_training)
    return losses


@torch.no_grad()
def next_token_scores(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 64) -> dict:
    """Next-token accuracy and mean cross-entropy (nats) of ``model`` over the scored positions."""
    device = device_dtype(model)[0]
    was_training = model.training
    model.eval()
    correct = total = 0
    ce = 0.0
    try:
        for start in range(0, ids.shape[0], batch_size):
            xb, yb = ids[start:start + batch_size].to(device), targets[start:start + batch_size].to(device)
            logits = model(xb)
            keep = yb != -100
            ce += float(F.cross_entropy(logits[keep], yb[keep], reduction="sum"))
            correct += int((logits.argmax(-1)[keep] == yb[keep]).sum())
            total += int(keep.sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(1, total), "cross_entropy": ce / max(1, total), "positions": total}


def train_reference_lm(architecture: dict, train, test, *, seed: int, steps: int | None = None,
                       batch_size: int | None = None, lr: float | None = None,
                       progress: Progress | None = None) -> tuple[nn.Module, dict]:
    """Train the reference decoder (``{"type": "gpt", ...}``; missing keys from
    :data:`~modlens.nn.models.GPT_REFERENCE`, the context from the data) on ``train`` (an object with
    ``ids`` and ``targets`` ``(N, T)``, e.g. a :class:`modlens.data.TextDataset`) with the ``gpt``
    recipe; ``steps``, ``batch_size`` and ``lr`` override it. Returns ``(model in eval mode, info)``
    with the next-token accuracy and loss on at most :data:`EVAL_SEQUENCES` sequences of ``test``."""
    spec = {**{k: v for k, v in GPT_REFERENCE.items()}, **dict(architecture), "type": "gpt"}
    context = int(train.ids.shape[1])
    if int(spec.get("context", context)) < context:
        raise ValueError(f"architecture context {spec['context']} is shorter than the data's contexts ({context})")
    spec["context"] = context
    vocab = int(max(int(np.max(train.ids)), int(np.max(train.targets)))) + 1
    if spec["vocab_size"] < vocab:
        raise ValueError(f"architecture vocab_size {spec['vocab_size']} but the data has token ids up to {vocab - 1}")
    r = recipe(spec)
    setup = {"steps": int(r["steps"] if steps is None else steps), "batch_size": int(r["batch_size"] if batch_size is None
             else batch_size), "lr": float(r["lr"] if lr is None else lr), "warmup": int(r["warmup"]),
             "weight_decay": float(r["weight_decay"])}
    model = build_model(spec, generator=torch.Generator().manual_seed(int(seed)))
    ids, targets = torch.as_tensor(np.asarray(train.ids)), torch.as_tensor(np.asarray(train.targets))
    losses = train_language_model(model, ids, targets, seed=seed, progress=progress, **setup)
    model.eval()
    ev = test.balanced(EVAL_SEQUENCES, seed) if hasattr(test, "balanced") else test
    scores = next_token_scores(model, torch.as_tensor(np.asarray(ev.ids)), torch.as_tensor(np.asarray(ev.targets)))
    info = {"architecture": spec, "seed": int(seed), **setup, "n_train": int(ids.shape[0]),
            "train_tokens": int(setup["steps"] * setup["batch_size"] * context),
            "test_accuracy": scores["accuracy"], "test_cross_entropy": scores["cross_entropy"],
            "test_positions": scores["positions"], "train_loss_first": losses[0] if losses else None,
            "train_loss_last": float(np.mean(losses[-20:])) if losses else None}
    return model, info


__all__ = ["train_language_model", "train_reference_lm", "next_token_scores", "EVAL_SEQUENCES"]
