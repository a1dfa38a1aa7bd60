"""Reference architectures, built from JSON-able dicts so a saved model can be rebuilt.

Initialization follows Keras defaults (glorot-uniform weights, zero biases) and draws only from
an explicit ``torch.Generator``: the same seed gives identical weights.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["PAPER_MLP_HIDDEN", "ACTIVATIONS", "mlp", "build_model"]

#: Hidden widths of the paper's MNIST MLP (784-256-256-256-256-10).
PAPER_MLP_HIDDEN = (256, 256, 256, 256)

#: Supported activation names -> module factories (never in-place, so hooks see clean tensors).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None


def _glorot_(linear: nn.Linear, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        nn.init.xavier_uniform_(linear.weight, generator=generator)
        nn.init.zeros_(linear.bias)


def mlp(
    sizes: Sequence[int],
    activation: str = "relu",
    *,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A fully connected network ``Flatten -> Linear -> act -> ... -> Linear`` (logits out).

    ``sizes`` lists the layer widths including input and output, e.g. ``[784, 256, 256, 10]``.
    Weights are glorot-uniform and biases zero, drawn from ``generator`` (seed it for reproducible
    weights; ``None`` uses torch's global generator).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least an input and an output size, got sizes={sizes}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"mlp sizes must be positive integers, got sizes={sizes}")
    _activation(activation)  # validate before building
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.utils.skip_init(nn.Linear, n_in, n_out)  # no draw from torch's global RNG
        _glorot_(linear, generator)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def _build_mlp(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    return mlp(spec["sizes"], spec.get("activation", "relu"), generator=generator)


# Dispatch table: type -> (builder, required keys, optional keys). Add "cnn", "vgg" here.
_BUILDERS: dict[str, tuple[Callable[[dict[str, Any], torch.Generator | None], nn.Module], set[str], set[str]]] = {
    "mlp": (_build_mlp, {"sizes"}, {"activation"}),
}


def build_model(architecture: dict[str, Any], *, generator: torch.Generator | None = None) -> nn.Module:
    """Build a model from a JSON-able dict such as ``{"type": "mlp", "sizes": [...], "activation": "relu"}``.

    Unknown types or keys raise ``ValueError`` naming them. ``generator`` seeds the initial weights.
    """
    if not isinstance(architecture, dict):
        raise ValueError(f"architecture must be a dict with a 'type' key, got {type(architecture).__name__}")
    kind = architecture.get("type")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown architecture type {kind!r}; supported: {', '.join(sorted(_BUILDERS))}")
    builder, required, optional = _BUILDERS[kind]
    keys = set(architecture) - {"type"}
    unknown = sorted(keys - required - optional)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} for architecture type {kind!r}; allowed: {sorted(required | optional)}"
        )
    missing = sorted(required - keys)
    if missing:
        raise ValueError(f"architecture type {kind!r} is missing required key(s) {missing}")
    return builder(architecture, generator)
