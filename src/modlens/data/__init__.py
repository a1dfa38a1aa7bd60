"""Image datasets for modlens: MNIST, Fashion-MNIST, scikit-learn's digits and two-image variants.

``load_dataset(name, split)`` returns a :class:`Dataset` with float32 images in [0, 1] of shape
``(N, C, H, W)`` and int64 labels. Base names: ``"mnist"``, ``"fashion-mnist"``, ``"digits"``.
Derived names put a prefix on a base name (paper, appendix A.4):

* ``"halves-"``: image i and a random image of the same split, each resized to half width, side by
  side; label = (left + right) mod 10.
* ``"halves-same-"``: the right half is a random image of the left one's class; label = that class.
* ``"stack-diff-"``: image i and a random image as two channels; label = sum mod 10.
* ``"stack-same-"``: the second channel is a random image of the same class; label = that class.

MNIST and Fashion-MNIST are read from the standard gzipped IDX files in ``<root>/mnist/`` and
``<root>/fashion-mnist/``; ``root`` is ``data_dir``, else ``$MODLENS_DATA``, else
``~/.cache/modlens/data``. Files are md5-checked and downloaded from public mirrors if missing.
Uses numpy and the standard library only (scikit-learn for the digits).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

from ._derived import make_halves, make_stack, partner_indices, resize_half_width
from ._digits import load_digits_split
from ._errors import DataCorruptError, DataError, DataUnavailableError
from ._sources import ENV_VAR, data_root, load_idx_split

__all__ = [
    "BASE_DATASETS",
    "DATASETS",
    "ENV_VAR",
    "DataCorruptError",
    "DataError",
    "DataUnavailableError",
    "Dataset",
    "VARIANTS",
    "data_root",
    "derived_rng",
    "load_dataset",
    "make_halves",
    "make_stack",
    "partner_indices",
    "resize_half_width",
]

BASE_DATASETS = ("mnist", "fashion-mnist", "digits")
VARIANTS = ("halves", "halves-same", "stack-diff", "stack-same")
N_CLASSES = 10

_SPECS: dict[str, tuple[str | None, str]] = {b: (None, b) for b in BASE_DATASETS}
_SPECS.update({f"{v}-{b}": (v, b) for v in VARIANTS for b in BASE_DATASETS})

DATASETS: list[str] = list(_SPECS)
"""Every valid dataset name."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset: ``x`` float32 ``(N, C, H, W)`` in [0, 1], ``y`` int64 ``(N,)``."""

    name: str
    split: str
    x: np.ndarray
    y: np.ndarray
    n_classes: int

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Dataset {self.name!r}: x must be (N, C, H, W) and y (N,), got {self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, split={self.split!r}, x={self.x.shape}, n_classes={self.n_classes})"


def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def derived_rng(name: str, split: str, seed: int = 0) -> np.random.Generator:
    """The generator that :func:`load_dataset` uses to pair images for a derived dataset.

    Its stream depends on ``seed``, ``name`` and ``split`` only (no Python ``hash()``).
    """
    return np.random.default_rng(np.random.SeedSequence([seed, _stable_int(name), _stable_int(split)]))


def _check_args(name: str, split: str, seed: int) -> tuple[str | None, str]:
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    variant, base = _SPECS[name]
    splits = ("train", "val", "test") if base == "digits" else ("train", "test")
    if split == "val" and base != "digits":
        raise ValueError(
            f"{name!r} has no 'val' split in this loader; load 'train' and carve a validation set from it yourself"
        )
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {name!r}; use one of: {', '.join(splits)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return variant, base


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load one split of a dataset as fresh arrays (callers may modify them).

    ``split`` is ``"train"`` or ``"test"`` (digits and its variants also have ``"val"``).
    ``seed`` only matters for derived datasets: it fixes how the second images are drawn.
    ``data_dir`` and ``download`` only matter for MNIST and Fashion-MNIST based names.
    Raises ``ValueError`` for an unknown name or split, :class:`DataUnavailableError` when files
    are missing and cannot be downloaded, :class:`DataCorruptError` for damaged files.
    """
    variant, base = _check_args(name, split, seed)
    if base == "digits":
        x, y = load_digits_split(split)
    else:
        images, labels = load_idx_split(base, split, data_dir, download)
        x = images.astype(np.float32)[:, None, :, :]
        x /= np.float32(255.0)
        y = labels.astype(np.int64)
    if variant is not None:
        rng = derived_rng(name, split, int(seed))
        make = make_halves if variant.startswith("halves") else make_stack
        x, y = make(x, y, rng, same=variant.endswith("-same"), n_classes=N_CLASSES)
    return Dataset(name=name, split=split, x=x, y=y, n_classes=N_CLASSES)
