"""Identically shaped networks evaluated as one: stacked parameters, one batched product per layer.

:class:`StackedNet` holds the parameters of ``R`` replicates of one ``nn.Sequential`` as leaf
tensors with a leading replicate axis and runs all of them on ``R`` different batches at once:

* dense part: activations ``(R, B, F)``; a Linear layer is one ``torch.baddbmm`` (R products);
* conv part: activations ``(B, R * C, H, W)``; a Conv2d layer is one grouped convolution with
  ``groups = R`` (``conv="grouped"``) or R plain convolutions (``conv="loop"``); pools and
  elementwise activations act on that layout unchanged; ``Flatten`` turns it into ``(R, B, C*H*W)``
  in the order a single network's ``Flatten`` uses.

Supported layers: Linear, Conv2d (ungrouped, zero padding), MaxPool2d, AvgPool2d, Flatten,
elementwise activations, Identity and Dropout with ``p = 0``. Anything else (batch norm, active
dropout, residual joins) is rejected by :func:`stackable`, and the caller trains one by one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StackedNet", "stackable", "CONV_MODES"]

CONV_MODES = ("grouped", "loop")
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of a (possibly nested) ``nn.Sequential`` in order."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{type(model).__name__} is not an nn.Sequential")
    out: list[nn.Module] = []
    for child in model.children():
        out.extend(_layers(child) if isinstance(child, nn.Sequential) else [child])
    return out


def _why_not(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Linear) or isinstance(layer, _ELEMENTWISE) or isinstance(layer, _POOLS):
        return None
    if isinstance(layer, nn.Flatten):
        return None if (layer.start_dim, layer.end_dim) == (1, -1) else "a Flatten other than Flatten(1, -1)"
    if isinstance(layer, nn.Conv2d):
        return None if layer.groups == 1 and layer.padding_mode == "zeros" else "a grouped or non-zero-padded Conv2d"
    if isinstance(layer, nn.Dropout):
        return None if layer.p == 0 else f"dropout (p={layer.p}): its masks come from torch's global generator"
    return f"a {type(layer).__name__} layer"


def stackable(model: nn.Module) -> str | None:
    """``None`` if replicates of ``model`` can be trained as a :class:`StackedNet`, else the reason."""
    try:
        layers = _layers(model)
    except TypeError as exc:
        return str(exc)
    for layer in layers:
        reason = _why_not(layer)
        if reason is not None:
            return reason
    if next(model.buffers(), None) is not None:
        return "buffers (running statistics or similar)"
    return None


class _StackedLinear(torch.autograd.Function):
    """``x (R, B, in) -> x @ W^T + b`` per replicate, with each product ordered as ``F.linear`` and
    its autograd order them for one replicate (``addmm`` forward; weight gradient ``g^T @ x``, which
    autograd's ``bmm`` rule would compute as ``(x^T @ g)^T``, summing in another order)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        wt = weight.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class StackedNet:
    """``R`` replicates of one Sequential with stacked parameters (see the module docstring).

    ``params`` are new leaf tensors ``(R, *shape)`` in the order of ``models[0].parameters()``;
    the models are not touched until :meth:`write_back`.
    """

    def __init__(self, models: Sequence[nn.Module], *, conv: str = "grouped"):
        if not models:
            raise ValueError("StackedNet: need at least one model")
        if conv not in CONV_MODES:
            raise ValueError(f"StackedNet: conv must be one of {CONV_MODES}, got {conv!r}")
        reason = stackable(models[0])
        if reason is not None:
            raise ValueError(f"StackedNet: cannot stack {type(models[0]).__name__}: it has {reason}; "
                             "train its replicates one by one")
        self.conv = conv
        self.R = len(models)
        self.layers = _layers(models[0])
        names = [n for n, _ in models[0].named_parameters()]
        for i, m in enumerate(models[1:], 1):
            other = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
            if other != [(n, tuple(p.shape)) for n, p in models[0].named_parameters()]:
                raise ValueError(f"StackedNet: replicate {i} has parameters {other[:3]}... unlike replicate 0; "
                                 "replicates must share one architecture")
        self._names = names
        self.params = [torch.stack([dict(m.named_parameters())[n].detach() for m in models]).clone().requires_grad_()
                       for n in names]
        index = {id(p): i for i, p in enumerate(models[0].parameters())}
        # For each layer, the positions of its weight and bias in self.params (or None).
        self._slots = [(index.get(id(getattr(l, "weight", None))), index.get(id(getattr(l, "bias", None))))
                       for l in self.layers]

    def _p(self, slot: int | None) -> torch.Tensor | None:
        return None if slot is None else self.params[slot]

    def _to_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, B, C, H, W)`` -> ``(B, R * C, H, W)``."""
        r, b, c, h, w = x.shape
        return x.transpose(0, 1).reshape(b, r * c, h, w)

    def _conv(self, layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        if self.conv == "grouped":
            b = None if bias is None else bias.reshape(-1)
            return F.conv2d(x, weight.reshape(-1, *weight.shape[2:]), b, groups=self.R, **kwargs)
        chunks = x.chunk(self.R, dim=1)
        return torch.cat([F.conv2d(chunks[r], weight[r], None if bias is None else bias[r], **kwargs)
                          for r in range(self.R)], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(R, B, K)`` of replicate r on ``x[r]``; ``x`` is ``(R, B, ...)``."""
        if x.shape[0] != self.R:
            raise ValueError(f"StackedNet: input has {x.shape[0]} replicate slices (shape {tuple(x.shape)}), "
                             f"expected {self.R}")
        grouped = False  # False: (R, B, ...); True: (B, R * C, H, W)
        for layer, (w_slot, b_slot) in zip(self.layers, self._slots):
            weight, bias = self._p(w_slot), self._p(b_slot)
            if isinstance(layer, nn.Linear):
                if grouped or x.ndim != 3:
                    raise ValueError(f"StackedNet: Linear layer gets input of shape {tuple(x.shape)}; "
                                     "put a Flatten before it")
                x = _StackedLinear.apply(x, weight, bias)
            elif isinstance(layer, nn.Conv2d):
                if not grouped:
                    x, grouped = self._to_grouped(x), True
                x = self._conv(layer, x, weight, bias)
            elif isinstance(layer, _POOLS):
                if not grouped:
                    x, grouped = self._to_grouped(x), True
                x = layer(x)
            elif isinstance(layer, nn.Flatten):
                if grouped:
                    x, grouped = x.reshape(x.shape[0], self.R, -1).transpose(0, 1), False
                else:
                    x = x.reshape(x.shape[0], x.shape[1], -1)
            elif isinstance(layer, nn.Dropout):
                continue
            else:  # elementwise activation
                x = layer(x)
        if grouped:
            raise ValueError("StackedNet: the network ends in a conv/pool layer; its output must be logits (N, K)")
        return x

    def l2_penalty(self) -> torch.Tensor:
        """Per replicate, the sum of squared Linear/Conv kernels ``(R,)`` (as :func:`l2_penalty`)."""
        terms = [self.params[w].pow(2).flatten(1).sum(1) for l, (w, _) in zip(self.layers, self._slots)
                 if isinstance(l, (nn.Linear, nn.Conv2d)) and w is not None]
        if not terms:
            raise ValueError("StackedNet: no Linear or Conv layer to apply an L2 penalty to")
        return torch.stack(terms).sum(0)

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy replicate r's parameters into ``models[r]``."""
        with torch.no_grad():
            for r, m in enumerate(models):
                own = dict(m.named_parameters())
                for name, stacked in zip(self._names, self.params):
                    own[name].copy_(stacked[r])
