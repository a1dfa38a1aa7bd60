"""scikit-learn's bundled 8x8 digits (1797 images), with a fixed stratified train/val/test split."""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from ._errors import DataUnavailableError

SPLIT_FRACTIONS = {"train": 0.60, "val": 0.15, "test": 0.25}
SPLIT_SEED = 0  # fixed on purpose: the test set must never change between runs


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataUnavailableError(
            f"the digits dataset needs scikit-learn ({exc}); install it with: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float64) / 16.0).astype(np.float32)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _order_key(i: int) -> int:
    # A hash of (seed, index): stable across numpy and scikit-learn versions, unlike their RNG streams.
    digest = hashlib.blake2b(f"modlens-digits-split:{SPLIT_SEED}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_indices(y: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified split of ``range(len(y))`` into sorted int64 index arrays "train", "val", "test".

    Within each class the examples are ordered by a seeded hash of their index; the first
    ``round(0.25 n_c)`` go to test, the next ``round(0.15 n_c)`` to val and the rest to train.
    """
    y = np.asarray(y)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        members = sorted(np.flatnonzero(y == c).tolist(), key=_order_key)
        n_test = int(np.floor(SPLIT_FRACTIONS["test"] * len(members) + 0.5))
        n_val = int(np.floor(SPLIT_FRACTIONS["val"] * len(members) + 0.5))
        parts["test"] += members[:n_test]
        parts["val"] += members[n_test : n_test + n_val]
        parts["train"] += members[n_test + n_val :]
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in parts.items()}


@functools.lru_cache(maxsize=1)
def _cached_split() -> dict[str, np.ndarray]:
    out = split_indices(_digits_arrays()[1])
    for v in out.values():
        v.flags.writeable = False
    return out


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fresh copies of ``(x, y)`` for one split: x float32 ``(n, 1, 8, 8)`` in [0, 1], y int64."""
    x, y = _digits_arrays()
    idx = _cached_split()[split]
    return x[idx], y[idx]  # fancy indexing copies
