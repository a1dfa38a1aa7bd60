"""Random transforms applied to the inputs during feature visualization, by kind of input.

Which kind an input is follows from one input's shape (no batch dimension):

* ``(C, H, W)`` - an image: ``"jitter-scale"`` (the paper's default, A.5) or ``"lucid"``;
* ``(T, D)`` - a sequence of T continuous D-vectors (time first): ``"noise-shift"``;
* ``(D,)`` - a vector (tabular features, an MLP's flat input): ``"noise"``.

Every kind also takes ``"none"``. Jitter, scaling and rotation mean nothing for a vector whose
coordinates have no neighbours, so vectors and sequences get the analogue that keeps the
optimized input robust instead of tuned to one exact point:

* ``"noise"``: Gaussian noise with standard deviation ``NOISE_SD`` (2 %) of the value range,
  added to every coordinate, fresh at every step;
* ``"noise-shift"``: that noise, then a circular shift along T (``torch.roll`` per input) by a
  whole number of positions drawn uniformly from [-s, s], s = :func:`max_shift` (T // 16, at
  least 1; no shift for T < 4). The shift plays the role of the images' 2-pixel jitter; a
  circular roll rather than pad-and-crop keeps every optimized position in view and needs no
  fill value.

A 2-D input is read as (T, D); a channel-less image (H, W) is thus shifted along its rows. Pass
``transforms="noise"`` for 2-D inputs whose first axis is not time.

All random numbers of an input come from that input's own generator, drawn in a fixed order
(uniforms for all steps first, then the noise of each step), so batching does not change them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Transforms allowed for each kind of input; the first one listed is the default.
TRANSFORMS_BY_KIND = {
    "image": ("jitter-scale", "lucid", "none"),
    "sequence": ("noise-shift", "noise", "none"),
    "vector": ("noise", "none"),
}
TRANSFORMS = ("none", "jitter-scale", "lucid", "noise", "noise-shift")
NOISE_SD = 0.02  # additive noise of vector and sequence inputs, as a fraction of the value range
#: Uniform numbers drawn per input per step.
N_UNIFORMS = {"none": 0, "jitter-scale": 3, "lucid": 6, "noise": 0, "noise-shift": 1}
NEEDS_NOISE = ("noise", "noise-shift")

_LUCID_SCALES = [1 + (i - 5) / 50.0 for i in range(11)]
_LUCID_ANGLES = list(range(-10, 11)) + 5 * [0]  # degrees


def input_kind(input_shape: tuple[int, ...]) -> str:
    """``"vector"``, ``"sequence"`` or ``"image"`` for one input's shape (D,), (T, D), (C, H, W)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 2, 3) or min(shape) < 1:
        raise ValueError(
            f"input_shape must be one input's shape without the batch dimension: (D,) for a vector, "
            f"(T, D) for a sequence or (C, H, W) for an image; got {shape}"
        )
    return ("vector", "sequence", "image")[len(shape) - 1]


def default_transforms(input_shape: tuple[int, ...]) -> str:
    """Paper, appendix A.5: jitter and scaling for small images; padding, jitter, rotation and
    scaling (``"lucid"``) for ImageNet-sized ones (128 pixels a side or more); additive noise
    for vectors, and noise with a shift along T for sequences (see the module docstring)."""
    kind = input_kind(input_shape)
    if kind == "image":
        return "lucid" if min(input_shape[1:]) >= 128 else "jitter-scale"
    return TRANSFORMS_BY_KIND[kind][0]


def check_transforms(transforms: str, input_shape: tuple[int, ...]) -> None:
    kind = input_kind(input_shape)
    if transforms not in TRANSFORMS:
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
    if transforms not in TRANSFORMS_BY_KIND[kind]:
        raise ValueError(
            f"transforms={transforms!r} does not apply to {kind} inputs of shape {tuple(input_shape)}; "
            f"choose one of {TRANSFORMS_BY_KIND[kind]}"
        )


def max_shift(length: int) -> int:
    """Largest shift along T of ``"noise-shift"``: T // 16, at least 1; 0 for T < 4."""
    return 0 if length < 4 else max(1, length // 16)


def roll_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``torch.roll(x[b], shifts[b], dims=0)`` for every b of a (B, T, D) batch, differentiably."""
    t = x.shape[1]
    src = torch.remainder(torch.arange(t, device=x.device)[None, :] - shifts.long()[:, None], t)
    return x.gather(1, src[..., None].expand(-1, -1, x.shape[2]))


def reflect_resample(length: int, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bilinear resampling matrices along one axis: zoom by ``scale`` about the centre,
    shift by ``shift`` pixels, reflecting at the border. Row i holds the weights of the input
    pixels read by output pixel i; the same numbers as ``grid_sample(..., padding_mode=
    "reflection", align_corners=False)`` along that axis."""
    i = torch.arange(length, dtype=scale.dtype, device=scale.device)
    out = (2 * i + 1) / length - 1  # normalized output coordinates
    src = ((out[None, :] / scale[:, None] - 2 * shift[:, None] / length + 1) * length - 1) / 2
    t = (src + 0.5).abs()  # reflect over [-0.5, L - 0.5], then clip to [0, L - 1]
    flips, extra = torch.floor(t / length), torch.remainder(t, length)
    src = torch.where(torch.remainder(flips, 2) == 0, extra - 0.5, length - extra - 0.5).clamp(0, length - 1)
    lo = torch.floor(src)
    frac = src - lo
    hi = (lo + 1).clamp(max=length - 1)
    mat = torch.zeros(scale.shape[0], length, length, dtype=dtype, device=scale.device)
    mat.scatter_add_(2, lo.long()[..., None], (1 - frac)[..., None].to(dtype))
    return mat.scatter_add_(2, hi.long()[..., None], torch.where(lo + 1 <= length - 1, frac, 0)[..., None].to(dtype))


def apply_transform(x: torch.Tensor, u: torch.Tensor, transforms: str, value_range: tuple[float, float],
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """Random differentiable transform of the batch ``x`` from per-input uniforms ``u`` (B, k)
    and, for the noise transforms, standard normal ``noise`` of ``x``'s shape."""
    if transforms == "none":
        return x
    lo, hi = value_range
    if transforms in NEEDS_NOISE:
        x = x + NOISE_SD * (hi - lo) * noise
        if transforms == "noise-shift":
            s = max_shift(x.shape[1])
            if s:
                x = roll_rows(x, torch.floor(u[:, 0] * (2 * s + 1)) - s)
        return x
    h, w = x.shape[-2:]
    if transforms == "jitter-scale":  # integer jitter of up to 2 px, scale in [0.9, 1.1]
        # separable (no rotation): two small matrix products instead of grid_sample
        dx, dy = torch.floor(u[:, 0] * 5) - 2, torch.floor(u[:, 1] * 5) - 2
        scale = 0.9 + 0.2 * u[:, 2]
        rows = reflect_resample(h, scale, dy, x.dtype)[:, None]
        cols = reflect_resample(w, scale, dx, x.dtype)[:, None]
        return rows @ x @ cols.transpose(-1, -2)
    # Lucid's defaults, keeping the input size: pad 12 (mid value), jitter 8, scale, rotate, jitter 4
    dx = torch.floor(u[:, 0] * 8) + torch.floor(u[:, 1] * 4) - 5
    dy = torch.floor(u[:, 2] * 8) + torch.floor(u[:, 3] * 4) - 5
    scale = torch.as_tensor(_LUCID_SCALES, dtype=u.dtype, device=u.device)[torch.floor(u[:, 4] * 11).long()]
    angle = torch.as_tensor(_LUCID_ANGLES, dtype=u.dtype, device=u.device)[torch.floor(u[:, 5] * 26).long()]
    angle = angle * math.pi / 180
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, sin, -2 * dx / w], 1),
        torch.stack([-sin, cos, -2 * dy / h], 1),
    ], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = 0.5 * (lo + hi)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
