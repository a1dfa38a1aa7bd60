"""Layers that see positions folded into the batch dimension.

Some models move part of each sample's positions into the batch: timm's MobileViT cuts a map into
patches and runs its transformer on ``(B * P, N, C)``, one row per sample and pixel within a patch.
A layer there computes ``k = P`` rows per sample. Recorded activations are one row per sample, so
the rows of each sample are summed: the L1 reduction (:func:`~modlens.nn._conv.reduce_l1`) sums
``|value|`` over a channel's positions, and a sum over a sample's rows of per-row sums is the sum over
all of its positions. Which rows belong to which sample is read from the model itself: swapping two
samples swaps their rows, sample-major (row ``r`` of sample ``r // k``) or position-major (row ``r`` of
sample ``r % n``).
"""

from __future__ import annotations

import torch

from modlens.nn._ops import UnsupportedModelError


def fold_order(values, x: torch.Tensor) -> str:
    """``"sample"`` or ``"position"``: how a layer's rows (``values``: a module giving them for a batch)
    follow the samples of ``x`` (at least two different samples)."""
    with torch.no_grad():
        a, b = values(x[:2]), values(x[:2].flip(0))
    k = a.shape[0] // 2

    def close(u):
        return bool(torch.allclose(u, b, rtol=1e-4, atol=1e-6 * max(1.0, float(a.abs().max()))))

    if close(torch.cat([a[k:], a[:k]])):
        return "sample"
    if close(a.reshape(k, 2, *a.shape[1:]).flip(1).reshape(a.shape)):
        return "position"
    raise UnsupportedModelError(
        f"a layer computes {a.shape[0]} rows for 2 samples, and swapping the samples does not swap whole "
        "groups of rows: modlens cannot tell which rows belong to which sample")


def per_sample(z: torch.Tensor, n: int, order: str, layer: str, reduce: str) -> torch.Tensor:
    """``(k * n, C)`` reduced rows of a layer with folded positions summed into ``(n, C)``."""
    if reduce != "l1":
        raise UnsupportedModelError(
            f"layer '{layer}' sees each sample's positions folded into the batch ({z.shape[0]} rows for {n} "
            f"samples); its activations can be summarized with reduce='l1' only, not {reduce!r}")
    k = z.shape[0] // n
    if order == "sample":
        return z.reshape(n, k, *z.shape[1:]).sum(1)
    return z.reshape(k, n, *z.shape[1:]).sum(0)
