"""Replicates trained together: identically configured networks with different seeds in one
batched computation, each the network that training it alone with its seed gives.

:func:`train_classifiers_together` is :func:`~modlens.experiments.train.train_classifier` for ``R``
models at once: parameters are stacked (:class:`~modlens.experiments._stacked.StackedNet`), every
layer is one batched product over the replicates, and the loss is the sum of the replicates'
mean cross-entropies, so replicate r's gradient is exactly its own. Each replicate keeps its own
streams, drawn from the same generators as the single path: the batch order from
``torch.Generator().manual_seed(seed_r)``, augmentations from the generator derived from
``seed_r``; its own Adam state (Adam is elementwise, so one Adam over stacked tensors is R
independent Adams with equal step counts). Initial weights are those ``build_model`` draws from
``seed_r``.

Equality with the single path: in float64 parameters agree to rounding (tested); in float32 the
dense products are the kernels ``F.linear`` and its backward use for one replicate, so on one
thread an MLP trained together is bit-identical to one trained alone (tested); on two threads
``bmm`` and ``mm`` can split small products differently (after 20 epochs on digits: weights within
1.2e-4, equal test accuracy). Grouped convolutions sum in another order, so CNN weights drift from
rounding on and test accuracies agree within a test example (``conv="loop"``: bit-identical to
the single path in the contiguous layout, ``memory_format="contiguous"``; on the CPU the single
path trains conv nets channels-last by default, whose convolutions also sum in another order).
On the CPU stacking does not make an MLP step cheaper (each step is bound by arithmetic; measured
in ``benchmarks/README.md``); it pays where small products leave the device idle, on a GPU.

On the CPU ``train_replicates(together="auto")`` therefore trains one by one. Models with batch norm
or active dropout (the CIFAR VGG) are always trained one by one through the single path: their masks come from torch's global generator, and on the CPU grouped
VGG convolutions are slower than separate ones (0.67x, measured in ``benchmarks/README.md``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modlens.core.seeds import named_seed
from modlens.experiments._augment import augment_images, check_augment
from modlens.experiments._stacked import CONV_MODES, StackedNet, stackable
from modlens.experiments.train import (
    _check_xy,
    reference_info,
    reference_setup,
    train_classifier,
)
from modlens.nn import device_dtype
from modlens.nn.models import build_model

__all__ = ["train_classifiers_together", "train_replicates", "TOGETHER_MODES"]

TOGETHER_MODES = ("auto", "together", "one-by-one")
#: ``progress(epoch, epochs, losses)``: ``losses`` holds each replicate's mean loss of the epoch.
ReplicateProgress = Callable[[int, int, list], Any]


def _check_seeds(seeds: Sequence[int], what: str) -> list[int]:
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: seeds must be a list of ints such as [0, 1, 2], got {seeds!r}") from None
    if not seeds:
        raise ValueError(f"{what}: need at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{what}: seeds {seeds} repeat a value; replicates need distinct seeds")
    return seeds


def train_classifiers_together(
    models: Sequence[nn.Module],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    seeds: Sequence[int],
    indices: Sequence[torch.Tensor] | None = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay_l2: float = 0.0,
    augment: bool | dict | None = None,
    conv: str = "grouped",
    progress: ReplicateProgress | None = None,
) -> list[dict[str, list[float]]]:
    """Train ``models`` (replicates of one stackable Sequential) in place, together.

    Replicate r ends as ``train_classifier(models[r], x_train[indices[r]], y_train[indices[r]],
    seed=seeds[r], ...)`` leaves it (up to rounding, see the module docstring); ``indices`` (one
    int64 tensor per replicate, all of one length; default: all samples) selects each replicate's
    training set without copying ``x_train`` R times. ``conv`` is ``"grouped"`` (one grouped
    convolution per layer) or ``"loop"`` (R convolutions per layer). Returns each replicate's history
    ``{"loss", "cross_entropy"}`` as ``train_classifier`` does. Models are left in their train/eval mode.
    """
    what = "train_classifiers_together"
    x_train, y_train = _check_xy(x_train, y_train, what)
    seeds = _check_seeds(seeds, what)
    if len(models) != len(seeds):
        raise ValueError(f"{what}: {len(models)} models but {len(seeds)} seeds; give one seed per model")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"{what}: need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    weight_decay_l2 = float(weight_decay_l2)
    if not (np.isfinite(weight_decay_l2) and weight_decay_l2 >= 0):
        raise ValueError(f"{what}: weight_decay_l2 must be a finite number >= 0, got {weight_decay_l2}")
    augment = check_augment(augment)
    if augment is not None and x_train.ndim != 4:
        raise ValueError(f"{what}: augmentation needs images (N, C, H, W), got x of shape {tuple(x_train.shape)}")
    if indices is None:
        indices = [torch.arange(x_train.shape[0])] * len(models)
    indices = [torch.as_tensor(i, dtype=torch.int64) for i in indices]
    if len(indices) != len(models) or len({len(i) for i in indices}) != 1 or len(indices[0]) == 0:
        raise ValueError(f"{what}: indices must be one non-empty index tensor per model, all of one length; got "
                         f"lengths {[len(i) for i in indices]} for {len(models)} models")
    R, n = len(models), len(indices[0])
    device = device_dtype(models[0])[0]
    net = StackedNet(models, conv=conv)
    order_gens = [torch.Generator().manual_seed(s) for s in seeds]
    aug_gens = [torch.Generator().manual_seed(named_seed(s, "augment")) for s in seeds] if augment else None
    optimizer = torch.optim.Adam(net.params, lr=lr, betas=(0.9, 0.999), eps=1e-7)
    histories: list[dict[str, list[float]]] = [{"loss": [], "cross_entropy": []} for _ in models]
    x_dev, y_dev = (x_train.to(device), y_train.to(device)) if device.type != "cpu" else (x_train, y_train)
    for epoch in range(1, epochs + 1):
        # (R, n) sample numbers of x_train, in each replicate's own order for this epoch
        order = torch.stack([idx[torch.randperm(n, generator=g)] for idx, g in zip(indices, order_gens)])
        total, total_ce = [0.0] * R, [0.0] * R
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]
            xb, yb = x_dev[idx.to(x_dev.device)], y_dev[idx.to(y_dev.device)]
            if aug_gens is not None:
                xb = torch.stack([augment_images(xb[r], g, **augment) for r, g in enumerate(aug_gens)])
            logits = net(xb)
            b = idx.shape[1]
            # one mean per replicate, reduced as the single path reduces it (a batched mean sums in another order)
            ce = torch.stack([F.cross_entropy(logits[r], yb[r]) for r in range(R)])
            loss = ce + weight_decay_l2 * net.l2_penalty() if weight_decay_l2 > 0 else ce
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            for r, (lv, cv) in enumerate(zip(loss.detach().tolist(), ce.detach().tolist())):
                total[r] += lv * b
                total_ce[r] += cv * b
        means = [t / n for t in total]
        bad = [s for s, m in zip(seeds, means) if not np.isfinite(m)]
        if bad:
            raise FloatingPointError(f"{what}: loss became non-finite in epoch {epoch} for seed(s) {bad}; lower lr")
        for h, m, c in zip(histories, means, total_ce):
            h["loss"].append(m)
            h["cross_entropy"].append(c / n)
        if progress is not None:
            progress(epoch, epochs, means)
    net.write_back(models)
    return histories


def train_replicates(
    architecture: dict[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    seeds: Sequence[int],
    epochs: int | None = None,
    batch_size: int | None = None,
    n_val: int = 5000,
    weight_decay_l2: float | None = None,
    augment: bool | dict | None = None,
    val_seeds: Sequence[int] | None = None,
    together: str = "auto",
    conv: str = "grouped",
    device: str | torch.device | None = None,
    progress: ReplicateProgress | None = None,
) -> list[tuple[nn.Module, dict[str, Any]]]:
    """:func:`~modlens.experiments.train.train_reference` for every seed in ``seeds``, trained together.

    Returns ``[(model in eval mode, info), ...]`` in the order of ``seeds``; entry r is what
    ``train_reference(architecture, ..., seed=seeds[r], val_seed=val_seeds[r])`` returns (same
    held-out split, same recipe, same streams), with ``info["trained"]`` saying ``"together"`` or
    ``"one-by-one"``. ``together="auto"`` batches stackable networks (the MLP and the small CNN)
    on a GPU and trains everything else one by one: the VGG (batch norm, dropout) anywhere, and
    every network on the CPU, where batching was measured not to pay (an MLP step is bound by
    arithmetic; ``benchmarks/README.md``). ``"together"`` batches on any device and raises for a
    network that cannot be stacked. ``device`` moves the models there before training (default CPU).
    """
    what = "train_replicates"
    seeds = _check_seeds(seeds, what)
    if together not in TOGETHER_MODES:
        raise ValueError(f"{what}: together must be one of {TOGETHER_MODES}, got {together!r}")
    if conv not in CONV_MODES:
        raise ValueError(f"{what}: conv must be one of {CONV_MODES}, got {conv!r}")
    val_seeds = list(seeds) if val_seeds is None else [int(v) for v in val_seeds]
    if len(val_seeds) != len(seeds):
        raise ValueError(f"{what}: {len(val_seeds)} val_seeds for {len(seeds)} seeds; give one per seed or none")
    x_train, y_train = _check_xy(x_train, y_train, f"{what} (train)")
    x_test, y_test = _check_xy(x_test, y_test, f"{what} (test)")
    setups = [reference_setup(architecture, x_train, y_train, x_test, y_test, epochs=epochs, batch_size=batch_size,
                              n_val=n_val, weight_decay_l2=weight_decay_l2, augment=augment, seed=s, val_seed=v)
              for s, v in zip(seeds, val_seeds)]
    setup = setups[0]
    models = [build_model(setup["architecture"], generator=torch.Generator().manual_seed(s)) for s in seeds]
    if device is not None:
        models = [m.to(device) for m in models]
    reason = stackable(models[0])
    if together == "together" and reason is not None:
        raise ValueError(f"{what}: {setup['architecture']['type']!r} networks cannot be trained together: they have "
                         f"{reason}; use together='one-by-one' or 'auto'")
    on_gpu = device_dtype(models[0])[0].type == "cuda"
    batched = reason is None and (together == "together" or (together == "auto" and on_gpu))
    kwargs = dict(epochs=setup["epochs"], batch_size=setup["batch_size"], lr=setup["lr"],
                  weight_decay_l2=setup["weight_decay_l2"], augment=setup["augment"])
    if batched:
        for m in models:
            m.train()
        histories = train_classifiers_together(models, x_train, y_train, seeds=seeds, conv=conv, progress=progress,
                                               indices=[torch.from_numpy(s["train_idx"]) for s in setups], **kwargs)
    else:
        histories = []
        for r, (m, s, seed) in enumerate(zip(models, setups, seeds)):
            t = torch.from_numpy(s["train_idx"])
            report = None if progress is None else \
                (lambda e, n, loss, r=r: progress(e, n, [None] * r + [loss] + [None] * (len(seeds) - r - 1)))
            histories.append(train_classifier(m, x_train[t], y_train[t], seed=seed, progress=report, **kwargs))
    out = []
    for m, s, h, seed in zip(models, setups, histories, seeds):
        info = reference_info(m, s, h, x_train, y_train, x_test, y_test, seed=seed)
        info["trained"] = "together" if batched else "one-by-one"
        out.append((m, info))
    return out
