"""The channels-last (NHWC) memory layout for conv nets on the CPU.

oneDNN, torch's CPU backend for convolutions, works natively in NHWC; in the default NCHW layout
every convolution reorders its operands, and max-pooling runs a much slower kernel (about 25x on
the small CNN's 64 x 28 x 28 maps, ``benchmarks/README.md``). A layout changes no value: the
same arithmetic runs, with float sums in another order. Torch follows the layout of a conv's
input or weight, so putting the 2-D conv weights in NHWC (for the duration of a computation, see
:func:`conv_weights_channels_last`) makes every value downstream of the first conv NHWC too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def prefer_channels_last(module: nn.Module, device: torch.device) -> bool:
    """The default: NHWC on the CPU for a module with a 2-D convolution."""
    return torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in module.modules())


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-D tensor laid out channels-last (NHWC), with the channel stride 1 (so
    that a (N, 1, H, W) tensor in NCHW, contiguous in both senses, does not count)."""
    return t.dim() == 4 and t.stride(1) == 1 and t.is_contiguous(memory_format=torch.channels_last)


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) in the NHWC layout, with strides that torch recognizes as NHWC also when
    ``C == 1`` (where ``contiguous(memory_format=...)`` keeps NCHW strides, so a conv would pick NCHW).
    Differentiable; other tensors are returned as they are."""
    if t.dim() != 4 or channels_last(t):
        return t
    n, c, h, w = t.shape
    if c == 1 and h * w > 1:
        return torch.empty_strided(t.shape, (h * w, 1, w, 1), dtype=t.dtype, device=t.device).copy_(t)
    return t.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def conv_weights_channels_last(module: nn.Module, enabled: bool = True):
    """Put the weights of the 2-D convolutions of ``module`` in the NHWC layout for the duration
    (the parameters keep their identity; their previous tensors are restored after)."""
    saved = []
    try:
        if enabled:
            for m in module.modules():
                w = getattr(m, "weight", None)
                if isinstance(m, nn.Conv2d) and isinstance(w, torch.Tensor) and w.dim() == 4:
                    saved.append((w, w.data))
                    w.data = to_channels_last(w.data)
        yield
    finally:
        for w, data in saved:
            w.data = data
