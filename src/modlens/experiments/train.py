"""Training with the paper's recipe (Keras defaults), deterministic for a fixed seed on CPU.

Adam (lr 1e-3, betas (0.9, 0.999), eps 1e-7), cross-entropy on logits, reshuffled each epoch from
an explicit ``torch.Generator``. Optional Keras-style L2 penalty on kernels and random affine
augmentation (the CIFAR VGG recipe). Writes no files; saving is :func:`modlens.nn.io.save_model`.

Recipes (appendix A.2 and the notes on the original code), used by :func:`train_reference` for
whatever is not passed explicitly:

=====  ======  =====  =========  ============================================
type   epochs  batch  L2         augmentation
=====  ======  =====  =========  ============================================
mlp    20      128    0          none
cnn    10      64     0          none
vgg    200     128    5e-4       rotation 15 deg, shifts 10 %, horizontal flip
=====  ======  =====  =========  ============================================

Other architecture types get the mlp row.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modlens.core.seeds import named_seed
from modlens.data import split_validation
from modlens.experiments._augment import PAPER_AUGMENT, augment_images, check_augment, l2_penalty
from modlens.experiments._reference import ARCHS, DIGITS_MLP_EPOCHS, RECIPES, complete_architecture, default_epochs, recipe
from modlens.nn import device_dtype
from modlens.nn.models import PAPER_MLP_HIDDEN, build_model

__all__ = [
    "train_classifier", "accuracy", "train_reference", "train_reference_mlp",
    "reference_setup", "reference_info", "MEMORY_FORMATS", "use_channels_last",
    "complete_architecture", "recipe", "RECIPES", "ARCHS", "DIGITS_MLP_EPOCHS", "default_epochs", "PAPER_AUGMENT",
    "augment_images", "l2_penalty",
]

Progress = Callable[[int, int, float], Any]

#: ``memory_format`` values of :func:`train_classifier`.
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def use_channels_last(model: nn.Module, x: torch.Tensor, memory_format: str = "auto") -> bool:
    """Whether :func:`train_classifier` trains ``model`` on images ``x`` in the channels-last layout.

    ``"auto"``: for image batches (N, C, H, W) into a model with a 2-D convolution, on the CPU, where
    oneDNN's channels-last kernels are faster (max-pooling by an order of magnitude, measured in
    ``benchmarks/README.md``). The layout changes no value and no recipe: same initialization,
    data order and arithmetic; the convolutions sum in another order, so weights differ from the
    contiguous layout's in the last bits (and drift apart over the steps, as any rounding does).
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format != "auto":
        return memory_format == "channels_last" and x.ndim == 4
    device = device_dtype(model)[0]
    return (x.ndim == 4 and device.type == "cpu"
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


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


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    weight_decay_l2: float = 0.0,
    augment: bool | dict | None = None,
    drop_last: bool | None = None,
    memory_format: str = "auto",
) -> dict[str, list[float]]:
    """Train ``model`` in place on ``(x_train, y_train)``; returns per-epoch means ``{"loss", "cross_entropy"}``.

    Batches come from a permutation drawn each epoch from a ``torch.Generator`` seeded with
    ``seed``; the last batch may be smaller (as in Keras). ``progress(epoch, epochs, loss)`` is
    called after each epoch (1-based). The model's train/eval mode is restored afterwards. Dropout
    masks come from torch's global generator, which is forked for the call and seeded from ``seed``
    (the caller's random state is left as it was), so training is deterministic for a seed on CPU.

    ``weight_decay_l2`` adds ``weight_decay_l2 * l2_penalty(model)`` (sum of squared conv/linear
    kernels) to each batch's loss, as Keras' ``kernel_regularizer=l2(...)``; ``"loss"`` is that total
    and ``"cross_entropy"`` the data term. ``augment`` (``True`` for the paper's settings or a dict, see
    :func:`check_augment`) transforms each batch with :func:`augment_images`, drawing from a second
    generator derived from ``seed``. ``drop_last`` skips a final incomplete batch; by default it is
    on only for models with batch norm that have at least one full batch (a batch of one sample
    breaks batch norm in training mode).

    ``memory_format`` (``"auto"``, ``"channels_last"``, ``"contiguous"``; see
    :func:`use_channels_last`) is the layout the parameters and the batches take during training;
    the parameters are returned to the contiguous layout afterwards.
    """
    x_train, y_train = _check_xy(x_train, y_train, "train_classifier")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"train_classifier: need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    weight_decay_l2 = float(weight_decay_l2)
    if not (np.isfinite(weight_decay_l2) and weight_decay_l2 >= 0):
        raise ValueError(f"train_classifier: weight_decay_l2 must be a finite number >= 0, got {weight_decay_l2}")
    augment = check_augment(augment)
    if augment is not None and x_train.ndim != 4:
        raise ValueError(f"train_classifier: augmentation needs images (N, C, H, W), got x of shape "
                         f"{tuple(x_train.shape)}; pass augment=None for flat inputs")
    n = x_train.shape[0]
    batch_norm = _has_batch_norm(model)
    if batch_norm and n < 2:
        raise ValueError(f"train_classifier: a model with batch norm needs at least 2 training samples, got {n}")
    if drop_last is None:
        drop_last = batch_norm and n >= batch_size
    stop = n - n % batch_size if drop_last else n
    device = device_dtype(model)[0]
    channels_last = use_channels_last(model, x_train, memory_format)
    order_generator = torch.Generator().manual_seed(int(seed))
    aug_generator = torch.Generator().manual_seed(named_seed(seed, "augment")) if augment else None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)
    history: dict[str, list[float]] = {"loss": [], "cross_entropy": []}
    was_training = model.training
    model.train()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # Dropout draws from torch's global generator: fork it (the caller's state is restored) and seed it.
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(named_seed(seed, "dropout"))
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(named_seed(seed, "dropout"))
        try:
            if channels_last:
                model.to(memory_format=torch.channels_last)
            _epochs(model, x_train, y_train, order_generator=order_generator, aug_generator=aug_generator,
                    augment=augment, optimizer=optimizer, weight_decay_l2=weight_decay_l2, epochs=epochs, batch_size=batch_size,
                    stop=stop, device=device, history=history, progress=progress, channels_last=channels_last)
        finally:
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
            model.train(was_training)
    return history


def _epochs(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, order_generator: torch.Generator,
            aug_generator: torch.Generator | None, augment: dict | None, optimizer: torch.optim.Optimizer,
            weight_decay_l2: float, epochs: int, batch_size: int, stop: int, device: torch.device,
            history: dict[str, list[float]], progress: Progress | None, channels_last: bool = False) -> None:
    """The training loop of :func:`train_classifier` (arguments already checked)."""
    n = x_train.shape[0]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=order_generator)
        total = total_ce = 0.0
        seen = 0
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            if aug_generator is not None:
                xb = augment_images(xb, aug_generator, **augment)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            ce = F.cross_entropy(model(xb), yb)
            loss = ce + weight_decay_l2 * l2_penalty(model) if weight_decay_l2 > 0 else ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            total_ce += float(ce.detach()) * len(idx)
            seen += len(idx)
        mean = total / seen
        if not np.isfinite(mean):
            raise FloatingPointError(f"train_classifier: loss became {mean} in epoch {epoch}; lower lr")
        history["loss"].append(mean)
        history["cross_entropy"].append(total_ce / seen)
        if progress is not None:
            progress(epoch, epochs, mean)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Fraction of samples whose arg-max logit equals the label (eval mode, no gradients)."""
    x, y = _check_xy(x, y, "accuracy")
    device = device_dtype(model)[0]
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


def train_reference(
    architecture: dict[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    seed: int,
    epochs: int | None = None,
    batch_size: int | None = None,
    n_val: int = 5000,
    weight_decay_l2: float | None = None,
    augment: bool | dict | None = None,
    progress: Progress | None = None,
    val_seed: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a reference network (``{"type": "mlp" | "cnn" | "vgg" | ...}``) on the training split minus
    a held-out validation split.

    ``architecture`` may leave out what the data determines (input shape or size, number of classes;
    an MLP without ``sizes`` gets the paper's 4x256 hidden layers): :func:`complete_architecture`
    fills it in and checks what is given. ``epochs``, ``batch_size``, ``weight_decay_l2`` and
    ``augment`` default to the type's recipe (:func:`recipe`); pass ``augment=False`` to switch the
    VGG's augmentation off and ``weight_decay_l2=0`` for its unregularized variant (with
    ``"dropout": false`` in the architecture).

    The validation split (``n_val`` examples, chosen by ``split_validation(len(x_train), n_val,
    val_seed)``, ``val_seed`` defaulting to ``seed``) is never trained on; it is kept for activation
    graphs. Weights are initialized from a ``torch.Generator`` seeded with ``seed``, batches shuffled
    from another seeded with ``seed`` and augmentations drawn from a third derived from ``seed``.
    Returns ``(model in eval mode, info)``; ``info`` is JSON-able and its ``architecture`` entry is
    what :func:`modlens.nn.io.save_model` needs.
    """
    x_train, y_train = _check_xy(x_train, y_train, "train_reference (train)")
    x_test, y_test = _check_xy(x_test, y_test, "train_reference (test)")
    setup = reference_setup(architecture, x_train, y_train, x_test, y_test, epochs=epochs, batch_size=batch_size,
                            n_val=n_val, weight_decay_l2=weight_decay_l2, augment=augment, seed=seed, val_seed=val_seed)
    train_t = torch.from_numpy(setup["train_idx"])
    model = build_model(setup["architecture"], generator=torch.Generator().manual_seed(int(seed)))
    history = train_classifier(model, x_train[train_t], y_train[train_t], epochs=setup["epochs"],
                               batch_size=setup["batch_size"], lr=setup["lr"], seed=seed, progress=progress,
                               weight_decay_l2=setup["weight_decay_l2"], augment=setup["augment"])
    return model, reference_info(model, setup, history, x_train, y_train, x_test, y_test, seed=seed)


def reference_setup(architecture, x_train, y_train, x_test, y_test, *, epochs, batch_size, n_val, weight_decay_l2,
                    augment, seed: int, val_seed: int | None) -> dict[str, Any]:
    """Checked arguments of :func:`train_reference` with the recipe's defaults filled in, and the
    held-out split: ``architecture, epochs, batch_size, lr, weight_decay_l2, augment, val_seed,
    n_total, train_idx, val_idx``."""
    x_train, y_train = _check_xy(x_train, y_train, "train_reference (train)")
    x_test, y_test = _check_xy(x_test, y_test, "train_reference (test)")
    flat = isinstance(architecture, dict) and architecture.get("type") == "mlp"
    if (x_test[0].numel() != x_train[0].numel()) if flat else (x_test.shape[1:] != x_train.shape[1:]):
        raise ValueError(f"train_reference: train samples have shape {tuple(x_train.shape[1:])} "
                         f"but test samples {tuple(x_test.shape[1:])}")
    n_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    architecture = complete_architecture(architecture, tuple(x_train.shape[1:]), n_classes)
    defaults = recipe(architecture)
    val_seed = int(seed if val_seed is None else val_seed)
    n_total = int(x_train.shape[0])
    train_idx, val_idx = split_validation(n_total, n_val, val_seed)
    return {
        "architecture": architecture,
        "epochs": defaults["epochs"] if epochs is None else int(epochs),
        "batch_size": defaults["batch_size"] if batch_size is None else int(batch_size),
        "lr": 1e-3,
        "weight_decay_l2": defaults["weight_decay_l2"] if weight_decay_l2 is None else float(weight_decay_l2),
        "augment": check_augment(defaults["augment"] if augment is None else augment),
        "val_seed": val_seed, "n_total": n_total, "train_idx": train_idx, "val_idx": val_idx,
    }


def reference_info(model: nn.Module, setup: dict[str, Any], history: dict[str, list[float]], x_train, y_train,
                   x_test, y_test, *, seed: int) -> dict[str, Any]:
    """Put ``model`` in eval mode and return :func:`train_reference`'s JSON-able ``info``."""
    model.eval()
    val_t = torch.from_numpy(setup["val_idx"])
    weight_decay_l2 = setup["weight_decay_l2"]
    info = {
        "architecture": setup["architecture"],
        "seed": int(seed),
        "epochs": int(setup["epochs"]),
        "batch_size": int(setup["batch_size"]),
        "lr": setup["lr"],
        "weight_decay_l2": weight_decay_l2,
        "augment": setup["augment"],
        "n_total": setup["n_total"],
        "n_train": int(len(setup["train_idx"])),
        "n_val": int(len(val_t)),
        "val_seed": setup["val_seed"],
        "test_accuracy": accuracy(model, x_test, y_test),
        "val_accuracy": accuracy(model, x_train[val_t], y_train[val_t]) if len(val_t) else None,
        "train_loss": [float(v) for v in history["loss"]],
    }
    if weight_decay_l2 > 0:
        info["train_cross_entropy"] = [float(v) for v in history["cross_entropy"]]
    return info


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

    :func:`train_reference` with ``{"type": "mlp", "sizes": [input, *hidden, classes]}``, no L2
    penalty and no augmentation (identical weights to earlier versions for the same arguments).
    """
    x_train, y_train = _check_xy(x_train, y_train, "train_reference_mlp (train)")
    x_test, y_test = _check_xy(x_test, y_test, "train_reference_mlp (test)")
    if x_test[0].numel() != x_train[0].numel():
        raise ValueError(f"train_reference_mlp: train samples have shape {tuple(x_train.shape[1:])} "
                         f"but test samples {tuple(x_test.shape[1:])}")
    n_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    architecture = {
        "type": "mlp",
        "sizes": [int(x_train[0].numel()), *(int(h) for h in hidden), n_classes],
        "activation": activation,
    }
    return train_reference(architecture, x_train, y_train, x_test, y_test, seed=seed, epochs=epochs,
                           batch_size=batch_size, n_val=n_val, weight_decay_l2=0.0, augment=False,
                           progress=progress, val_seed=val_seed)
