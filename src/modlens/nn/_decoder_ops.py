"""Modules and functions that capture puts in place of operation patterns of decoder language models.

Decoder families write some operations out as several ATen operations that modlens would not
follow one by one (docs/language-models.md, section 1). :mod:`modlens.nn._decoder_capture` finds
those patterns in the exported graph and replaces each by one node of the kinds defined here, so
the operation registry (:mod:`modlens.nn._registry`) has one handler for each:

* :class:`Elementwise`: a channel-wise function of one value written as several element-wise
  operations whose graph branches and joins again (GPT-2's and Phi's ``gelu_new``,
  ``0.5 x (1 + tanh(...))``; a hand-written SiLU ``x * sigmoid(x)``). The registry's kind is
  ``unary``; it counts as an activation function when it holds a nonlinear operation.
* :class:`WrittenNorm`: an RMS normalization over the last dimension written out
  (``x * rsqrt(mean(x^2, -1) + eps) * w``, with casts; Gemma's scale is ``1 + w``). Kind ``norm``;
  its :attr:`WrittenNorm.weight` is the scale the stream is multiplied by (``w``, or ``1 + w``).
* :func:`take_tokens`: a value ``(B, T, ...)`` read at one position per sequence (the last-token
  head of Hugging Face sequence classifiers, ``logits[arange(B), last]``). Kind ``take_tokens``:
  a reduction over tokens after the output layer, like pooling.

Each module runs the very operations it replaces (its ``body`` is the captured subgraph), so a
captured model computes exactly what the user's model computes.
"""

from __future__ import annotations

import torch
from torch import fx, nn


class Elementwise(nn.Module):
    """A channel-wise function of one value, written as several element-wise operations.

    ``body`` maps the value to the result with the captured operations (``ops`` names them, in
    order); ``nonlinear`` says whether one of them is nonlinear (then it is an activation function
    for modlens: the input of the body is a pre-activation)."""

    def __init__(self, body: fx.GraphModule, ops: tuple[str, ...], nonlinear: bool):
        super().__init__()
        self.body = body
        self.ops = tuple(ops)
        self.nonlinear = bool(nonlinear)

    def forward(self, x):
        return self.body(x)

    def extra_repr(self) -> str:
        return f"{' -> '.join(self.ops)}, nonlinear={self.nonlinear}"


class WrittenNorm(nn.Module):
    """An RMS normalization over the last dimension written out as operations.

    ``body`` computes it from the input exactly as the model does (casts included); ``scale_body``
    (no inputs) computes the per-channel scale from the model's parameters (``w``, or Gemma's
    ``1 + w``), or is None for a normalization without a learned scale."""

    def __init__(self, body: fx.GraphModule, scale_body: fx.GraphModule | None, eps: float):
        super().__init__()
        self.body = body
        self.scale_body = scale_body
        self.eps = float(eps)

    def forward(self, x):
        return self.body(x)

    @property
    def weight(self) -> torch.Tensor | None:
        """The per-channel scale the normalized stream is multiplied by (read-only, detached)."""
        if self.scale_body is None:
            return None
        with torch.no_grad():
            return self.scale_body().detach()

    def extra_repr(self) -> str:
        return f"rms over the last dimension, eps={self.eps:g}, scale={'none' if self.scale_body is None else 'learned'}"


def take_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b]]`` for every sequence ``b``: one position per sequence of a ``(B, T, ...)``
    value (the positions may depend on the input ids, e.g. the last token that is not padding)."""
    return values[torch.arange(values.shape[0], device=values.device), index.to(values.device)]


__all__ = ["Elementwise", "WrittenNorm", "take_tokens"]
