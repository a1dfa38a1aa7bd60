"""Reference architectures, built from JSON-able dicts so a saved model can be rebuilt.

Initialization follows Keras defaults (glorot-uniform weights, zero biases) and draws only from
an explicit ``torch.Generator``: the same seed gives identical weights.

Architecture types for :func:`build_model` (every key but ``type`` optional unless noted):

* ``{"type": "mlp", "sizes": [784, 256, 10], "activation": "relu"}`` (``sizes`` required);
* ``{"type": "cnn", "input_shape": [1, 28, 28], "n_classes": 10, "conv": [64, 64, "M", 64, "M"],
  "dense": [128], "activation": "relu"}``: the paper's small CNN (:func:`small_cnn`);
* ``{"type": "vgg", "input_shape": [3, 32, 32], "n_classes": 10, "conv": [...13 widths and 'M'...],
  "dense": [512, 512], "dropout": true, "activation": "relu"}``: the CIFAR VGG (:func:`cifar_vgg`);
* ``{"type": "torchvision", "name": "vgg16" | "vgg19" | "resnet18" | "resnet50", "num_classes": 1000}``
  (``name`` required; needs the optional torchvision, weights are not downloaded);
* ``{"type": "small_vgg", ...}`` and ``{"type": "small_resnet", ...}``: small test networks
  structured like the real ones (:func:`small_vgg`, :func:`small_resnet`);
* ``{"type": "gpt", "vocab_size": 128, "context": 128, "d_model": 128, "n_blocks": 4, "n_heads": 4,
  "d_mlp": 512}``: the reference decoder language model (:class:`Decoder`: GELU MLPs, LayerNorm,
  causal attention, unembedding tied to the token embedding); ``"head": "classes"`` with
  ``"n_classes"`` puts a class head on the last position instead.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from modlens.nn._convnets import (
    CIFAR_VGG_CONV,
    CIFAR_VGG_DENSE,
    SMALL_CNN_CONV,
    SMALL_CNN_DENSE,
    TORCHVISION_NAMES,
    cifar_vgg,
    small_cnn,
    small_resnet,
    small_vgg,
    torchvision_model,
    vgg_dropout_rates,
)
from modlens.nn._gpt import Decoder
from modlens.nn._layers import ACTIVATIONS, linear
from modlens.nn._layers import activation as _activation

__all__ = [
    "PAPER_MLP_HIDDEN", "ACTIVATIONS", "SMALL_CNN_CONV", "SMALL_CNN_DENSE", "CIFAR_VGG_CONV", "CIFAR_VGG_DENSE",
    "TORCHVISION_NAMES", "mlp", "small_cnn", "cifar_vgg", "vgg_dropout_rates", "small_vgg", "small_resnet",
    "torchvision_model", "build_model", "Decoder", "GPT_REFERENCE",
]

#: The reference decoder of issue 18 (docs/language-models.md): byte-level, 4 blocks of width 128 with
#: 512 MLP units, 4 heads, a context of 128 tokens.
GPT_REFERENCE = {"vocab_size": 128, "context": 128, "d_model": 128, "n_blocks": 4, "n_heads": 4, "d_mlp": 512}

#: Hidden widths of the paper's MNIST MLP (784-256-256-256-256-10).
PAPER_MLP_HIDDEN = (256, 256, 256, 256)


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
        layers.append(linear(n_in, n_out, generator))  # skip_init: no draw from torch's global RNG
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def _build_mlp(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    return mlp(spec["sizes"], spec.get("activation", "relu"), generator=generator)


def _build_cnn(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    return small_cnn(spec.get("input_shape", (1, 28, 28)), spec.get("n_classes", 10),
                     conv=spec.get("conv", SMALL_CNN_CONV), dense=spec.get("dense", SMALL_CNN_DENSE),
                     activation=spec.get("activation", "relu"), generator=generator)


def _build_vgg(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    return cifar_vgg(spec.get("input_shape", (3, 32, 32)), spec.get("n_classes", 10),
                     conv=spec.get("conv", CIFAR_VGG_CONV), dense=spec.get("dense", CIFAR_VGG_DENSE),
                     dropout=spec.get("dropout", True), activation=spec.get("activation", "relu"),
                     generator=generator)


def _build_torchvision(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    return torchvision_model(spec["name"], spec.get("num_classes", 1000), generator=generator)


def _build_small_vgg(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    kwargs = {k: spec[k] for k in ("conv", "dense", "style", "batch_norm") if k in spec}
    return small_vgg(spec.get("input_shape", (3, 16, 16)), spec.get("n_classes", 10), generator=generator, **kwargs)


def _build_small_resnet(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    kwargs = {k: spec[k] for k in ("widths", "blocks", "stem_pool") if k in spec}
    return small_resnet(spec.get("in_channels", 3), spec.get("n_classes", 10), generator=generator, **kwargs)


def _build_gpt(spec: dict[str, Any], generator: torch.Generator | None) -> nn.Module:
    kwargs = {k: spec.get(k, v) for k, v in GPT_REFERENCE.items()}
    return Decoder(**kwargs, head=spec.get("head", "lm"), n_classes=spec.get("n_classes"), generator=generator)


# Dispatch table: type -> (builder, required keys, optional keys).
_BUILDERS: dict[str, tuple[Callable[[dict[str, Any], torch.Generator | None], nn.Module], set[str], set[str]]] = {
    "mlp": (_build_mlp, {"sizes"}, {"activation"}),
    "cnn": (_build_cnn, set(), {"input_shape", "n_classes", "conv", "dense", "activation"}),
    "vgg": (_build_vgg, set(), {"input_shape", "n_classes", "conv", "dense", "dropout", "activation"}),
    "torchvision": (_build_torchvision, {"name"}, {"num_classes"}),
    "small_vgg": (_build_small_vgg, set(), {"input_shape", "n_classes", "conv", "dense", "style", "batch_norm"}),
    "small_resnet": (_build_small_resnet, set(), {"in_channels", "n_classes", "widths", "blocks", "stem_pool"}),
    "gpt": (_build_gpt, set(), {*GPT_REFERENCE, "head", "n_classes"}),
}


def build_model(architecture: dict[str, Any], *, generator: torch.Generator | None = None) -> nn.Module:
    """Build a model from a JSON-able dict such as ``{"type": "mlp", "sizes": [...], "activation": "relu"}``.

    Unknown types or keys and bad values raise ``ValueError`` naming them (``ImportError`` when a
    ``torchvision`` architecture is asked for without torchvision). ``generator`` seeds the initial
    weights. See the module docstring for the types and their keys.
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
