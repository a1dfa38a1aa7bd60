"""Layer factories shared by the reference architectures: activations, Keras-style init, batch norm.

Every layer is created with ``nn.utils.skip_init`` and then initialized from an explicit
``torch.Generator``, so building a model never draws from torch's global random state.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

#: Supported activation names -> module factories (never in-place, so hooks see clean tensors).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

#: Keras' BatchNormalization defaults (epsilon 1e-3, moving-average momentum 0.99) in torch's terms.
KERAS_BN = {"eps": 1e-3, "momentum": 0.01}


def activation(name: str) -> nn.Module:
    """A new activation module for ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None


def glorot_(module: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """Glorot-uniform weight and zero bias (Keras defaults) for a Linear or Conv layer, in place."""
    with torch.no_grad():
        nn.init.xavier_uniform_(module.weight, generator=generator)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return module


def linear(n_in: int, n_out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with glorot-uniform weights and zero biases."""
    return glorot_(nn.utils.skip_init(nn.Linear, n_in, n_out), generator)


def conv3x3(
    c_in: int, c_out: int, generator: torch.Generator | None, *, stride: int = 1, bias: bool = True
) -> nn.Conv2d:
    """A 3x3 'same' convolution (padding 1) with glorot-uniform weights and zero biases."""
    conv = nn.utils.skip_init(nn.Conv2d, c_in, c_out, 3, stride=stride, padding=1, bias=bias)
    return glorot_(conv, generator)


def conv1x1(c_in: int, c_out: int, generator: torch.Generator | None, *, stride: int = 1) -> nn.Conv2d:
    """A bias-free 1x1 convolution (a ResNet shortcut) with glorot-uniform weights."""
    return glorot_(nn.utils.skip_init(nn.Conv2d, c_in, c_out, 1, stride=stride, bias=False), generator)
