"""Two-image datasets built from one split of a base dataset (paper, appendix A.4).

Example ``i`` always uses image ``i`` of the base split as its first (left) image and a second
image of the same split drawn with the given generator:

* halves: both images resized to half width (anti-aliased) and put side by side;
* stack: both full images as two channels.

With ``same=False`` the second image is uniform over the split and the label is the sum of the
two labels modulo ``n_classes``; with ``same=True`` it is uniform over the images of the first
image's class and the label is that class.
"""

from __future__ import annotations

import numpy as np


def resize_half_width(x: np.ndarray) -> np.ndarray:
    """Resize images ``(..., H, W)`` with even ``W`` to ``(..., H, W // 2)`` as float32.

    Each output column is the mean of a pair of adjacent input columns, which for a factor-2
    shrink is exactly the area-averaging (anti-aliased) resize.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"need images of shape (..., H, W), got shape {x.shape}")
    w = x.shape[-1]
    if w % 2:
        raise ValueError(f"image width {w} is odd; half-width resizing needs an even width")
    pairs = x.astype(np.float32, copy=False).reshape(*x.shape[:-1], w // 2, 2)
    return (pairs[..., 0] + pairs[..., 1]) * np.float32(0.5)


def partner_indices(y: np.ndarray, rng: np.random.Generator, *, same: bool = False) -> np.ndarray:
    """For each example, the index of its second image (int64, shape ``(N,)``).

    ``same=False``: uniform over all ``N`` examples. ``same=True``: uniform over the examples
    with the same label (classes are visited in sorted order, so the draw is deterministic).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    y = np.asarray(y)
    n = y.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if not same:
        return rng.integers(0, n, size=n, dtype=np.int64)
    idx = np.empty(n, dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        idx[members] = members[rng.integers(0, members.size, size=members.size)]
    return idx


def _check(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    return x, y.astype(np.int64, copy=False)


def _labels(y: np.ndarray, j: np.ndarray, same: bool, n_classes: int) -> np.ndarray:
    return y.copy() if same else (y + y[j]) % n_classes


def make_halves(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    same: bool = False,
    n_classes: int = 10,
    return_indices: bool = False,
):
    """Halves dataset: ``(N, C, H, W)`` float32 with image ``i`` (half width) on the left.

    Returns ``(x, y)``, or ``(x, y, j)`` with ``return_indices`` where ``j[i]`` is the index of
    the right-hand image. Labels: ``(y[i] + y[j[i]]) % n_classes``, or ``y[i]`` with ``same``.
    """
    x, y = _check(x, y)
    j = partner_indices(y, rng, same=same)
    half = resize_half_width(x)
    out = np.concatenate([half, half[j]], axis=-1)
    labels = _labels(y, j, same, n_classes)
    return (out, labels, j) if return_indices else (out, labels)


def make_stack(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    same: bool = False,
    n_classes: int = 10,
    return_indices: bool = False,
):
    """Stacked dataset: ``(N, 2C, H, W)`` with image ``i`` in the first ``C`` channels.

    Returns ``(x, y)``, or ``(x, y, j)`` with ``return_indices`` where ``j[i]`` is the index of
    the second image. Labels as in :func:`make_halves`. The dtype of ``x`` is kept.
    """
    x, y = _check(x, y)
    j = partner_indices(y, rng, same=same)
    out = np.concatenate([x, x[j]], axis=1)
    labels = _labels(y, j, same, n_classes)
    return (out, labels, j) if return_indices else (out, labels)
