"""Training recipes of the reference networks and completing an architecture from the data."""

from __future__ import annotations

from typing import Any

from modlens.experiments._augment import PAPER_AUGMENT
from modlens.nn.models import PAPER_MLP_HIDDEN

#: Per architecture type: epochs, batch size, L2 coefficient on kernels, augmentation (appendix A.2).
RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 20, "batch_size": 128, "weight_decay_l2": 0.0, "augment": None},
    "cnn": {"epochs": 10, "batch_size": 64, "weight_decay_l2": 0.0, "augment": None},
    "vgg": {"epochs": 200, "batch_size": 128, "weight_decay_l2": 5e-4, "augment": dict(PAPER_AUGMENT)},
    # the reference decoder language model (issue 18; modlens.experiments.train_lm): steps of AdamW on
    # byte contexts of the two-genre corpus, and the held-out sequences its analysis uses
    "gpt": {"epochs": 1, "batch_size": 16, "weight_decay_l2": 0.0, "augment": None, "steps": 400, "lr": 3e-3,
            "warmup": 40, "weight_decay": 0.1, "context": 128, "n_test": 16, "n_activation": 128},
}

#: The reference architectures (the keys of :data:`RECIPES`).
ARCHS = tuple(RECIPES)

#: The MLP on scikit-learn's small digits data trains for 60 epochs (the demo's recipe; 20 epochs of
#: 1,000 images leave it far from convergence).
DIGITS_MLP_EPOCHS = 60


def default_epochs(arch: str, dataset: str) -> int:
    """Epochs of the reference recipe of ``arch`` on ``dataset``."""
    if dataset.endswith("digits") and arch == "mlp":
        return DIGITS_MLP_EPOCHS
    return int(RECIPES[arch]["epochs"])


# Architecture types whose spec names the input image shape / the number of outputs, and the key.
_IMAGE_SHAPE_KEY = {"cnn": "input_shape", "vgg": "input_shape", "small_vgg": "input_shape"}
_CLASSES_KEY = {"cnn": "n_classes", "vgg": "n_classes", "small_vgg": "n_classes", "small_resnet": "n_classes",
                "torchvision": "num_classes"}


def recipe(architecture: dict[str, Any]) -> dict[str, Any]:
    """The training defaults for ``architecture``'s type (a copy); types without a recipe get the MLP's."""
    kind = architecture.get("type") if isinstance(architecture, dict) else None
    chosen = RECIPES.get(kind, RECIPES["mlp"])
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in chosen.items()}


def complete_architecture(
    architecture: dict[str, Any], sample_shape: tuple[int, ...], n_classes: int
) -> dict[str, Any]:
    """A copy of ``architecture`` with what the data determines filled in, and checked against the data.

    ``sample_shape`` is the shape of one input (e.g. ``(1, 28, 28)``), ``n_classes`` one more than the
    largest label. MLP: ``sizes`` defaults to ``[prod(sample_shape), 256, 256, 256, 256, n_classes]``;
    conv nets: ``input_shape``/``in_channels`` and ``n_classes``/``num_classes`` default to the data's.
    Given values must fit the data (same input shape, at least ``n_classes`` outputs).
    """
    if not isinstance(architecture, dict) or "type" not in architecture:
        raise ValueError(f"architecture must be a dict with a 'type' key such as {{'type': 'cnn'}}, "
                         f"got {architecture!r}")
    spec = dict(architecture)
    kind = spec["type"]
    sample_shape = tuple(int(s) for s in sample_shape)
    n_in = 1
    for s in sample_shape:
        n_in *= s
    if kind == "mlp":
        sizes = spec.setdefault("sizes", [n_in, *PAPER_MLP_HIDDEN, n_classes])
        if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
            raise ValueError(f"architecture 'sizes' must be a list such as [784, 256, 10], got {sizes!r}")
        spec["sizes"] = [int(v) for v in sizes]
        if spec["sizes"][0] != n_in:
            raise ValueError(f"architecture sizes[0] = {spec['sizes'][0]} but the inputs have {n_in} values "
                             f"(shape {sample_shape}); set sizes[0] to {n_in}")
        _check_outputs(spec["sizes"][-1], n_classes, "sizes[-1]")
        return spec
    key = _IMAGE_SHAPE_KEY.get(kind)
    if key is not None or kind == "small_resnet":
        if len(sample_shape) != 3:
            raise ValueError(f"a {kind!r} network needs image inputs (N, C, H, W), got samples of shape {sample_shape}")
    if key is not None:
        given = spec.setdefault(key, list(sample_shape))
        if not isinstance(given, (list, tuple)) or tuple(given) != sample_shape:
            raise ValueError(f"architecture {key} is {given!r} but the data's samples have shape "
                             f"{list(sample_shape)}; drop {key} or set it to {list(sample_shape)}")
        spec[key] = list(sample_shape)
    if kind == "small_resnet":
        given = spec.setdefault("in_channels", sample_shape[0])
        if given != sample_shape[0]:
            raise ValueError(f"architecture in_channels is {given!r} but the data has {sample_shape[0]} channels")
    ckey = _CLASSES_KEY.get(kind)
    if ckey is not None:
        _check_outputs(spec.setdefault(ckey, n_classes), n_classes, ckey)
    return spec


def _check_outputs(n_out: Any, n_classes: int, what: str) -> None:
    if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < n_classes:
        raise ValueError(f"architecture {what} is {n_out!r}, but the labels need at least {n_classes} outputs "
                         f"(largest label {n_classes - 1})")
