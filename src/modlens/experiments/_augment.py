"""Training-time regularizers of the CIFAR VGG recipe: random affine augmentation and the L2 penalty.

Augmentation reproduces Keras' ``ImageDataGenerator(rotation_range=15, width_shift_range=0.1,
height_shift_range=0.1, horizontal_flip=True)`` with torch ops: per image a rotation angle uniform
in [-15, 15] degrees, horizontal and vertical shifts uniform in [-10 %, 10 %] of the side, and a
horizontal flip with probability 1/2, applied with ``affine_grid``/``grid_sample`` (bilinear, border
pixels repeated as Keras' default ``fill_mode='nearest'``). All draws come from an explicit CPU
``torch.Generator``, so a seed fixes the augmented images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAPER_AUGMENT", "augment_images", "check_augment", "l2_penalty"]

#: The paper's CIFAR augmentation (appendix A.2): rotation in degrees, shift as a fraction of the side.
PAPER_AUGMENT: dict[str, Any] = {"rotation": 15.0, "shift": 0.1, "flip": True}
_KEYS = ("rotation", "shift", "flip")


def check_augment(augment: Any) -> dict[str, Any] | None:
    """Normalize an augmentation option: ``None``/``False`` -> ``None``; ``True`` -> the paper's settings;
    a dict with some of ``rotation`` (degrees, 0..180), ``shift`` (fraction, 0..<1), ``flip`` (bool) ->
    a complete dict (missing entries switched off)."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return dict(PAPER_AUGMENT)
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be None, True, False or a dict with keys {list(_KEYS)}, got {augment!r}")
    unknown = sorted(set(augment) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown augment key(s) {unknown}; allowed: {list(_KEYS)}")
    out = {"rotation": float(augment.get("rotation", 0.0)), "shift": float(augment.get("shift", 0.0)),
           "flip": augment.get("flip", False)}
    if not 0.0 <= out["rotation"] <= 180.0:
        raise ValueError(f"augment rotation must be in [0, 180] degrees, got {out['rotation']}")
    if not 0.0 <= out["shift"] < 1.0:
        raise ValueError(f"augment shift must be a fraction of the side in [0, 1), got {out['shift']}")
    if not isinstance(out["flip"], bool):
        raise ValueError(f"augment flip must be true or false, got {out['flip']!r}")
    return out


def augment_images(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    rotation: float = 15.0,
    shift: float = 0.1,
    flip: bool = True,
) -> torch.Tensor:
    """A randomly rotated, shifted and flipped copy of the image batch ``x`` ``(N, C, H, W)``.

    Four uniform numbers per image are always drawn from ``generator`` (a CPU generator) in the
    same order, whatever transforms are switched on: angle, x shift, y shift, flip. The grid is
    built on ``x``'s device. Rotation is about the image centre, in pixel space (correct for
    non-square images too).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"augment_images needs a float image batch of shape (N, C, H, W), got {shape}; "
                         "augmentation applies to image data only (switch it off for flat inputs)")
    n, _, h, w = x.shape
    u = torch.rand(4, n, generator=generator, dtype=torch.float64)
    angle = (2 * u[0] - 1) * math.radians(rotation)
    tx, ty = (2 * u[1] - 1) * shift, (2 * u[2] - 1) * shift
    sign = torch.where(u[3] < 0.5, -1.0, 1.0) if flip else torch.ones(n, dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output to input coordinates in [-1, 1]: input = R @ diag(sign, 1) @ output + 2 * shift.
    theta = torch.stack([
        torch.stack([cos * sign, -sin * (h / w), 2 * tx], dim=1),
        torch.stack([sin * (w / h) * sign, cos, 2 * ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared kernel weights of every Linear and Conv layer (no biases, no batch-norm scales).

    Multiplied by a coefficient and added to the loss this is Keras' ``kernel_regularizer=l2(c)``
    (``c * sum(w ** 2)``, no factor 1/2), unlike Adam's ``weight_decay``.
    """
    terms = [m.weight.pow(2).sum() for m in model.modules() if isinstance(m, _WEIGHTED)]
    if not terms:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to apply an L2 penalty to")
    return torch.stack(terms).sum()
