"""Image datasets for modlens: MNIST, Fashion-MNIST, CIFAR-10, scikit-learn's digits, two-image
variants, and ImageNet validation folders.

``load_dataset(name, split)`` returns a :class:`Dataset` with float32 images in [0, 1] of shape
``(N, C, H, W)`` and int64 labels. Base names: ``"mnist"``, ``"fashion-mnist"``, ``"digits"``,
``"cifar10"``. Derived names put a prefix on an MNIST-like base name (paper, appendix A.4):

* ``"halves-"``: image i and a random image of the same split, each resized to half width, side by
  side; label = (left + right) mod 10.
* ``"halves-same-"``: the right half is a random image of the left one's class; label = that class.
* ``"stack-diff-"``: image i and a random image as two channels; label = sum mod 10.
* ``"stack-same-"``: the second channel is a random image of the same class; label = that class.

MNIST and Fashion-MNIST are read from the standard gzipped IDX files in ``<root>/mnist/`` and
``<root>/fashion-mnist/``, CIFAR-10 from the python batches in ``<root>/cifar-10-batches-py/``
(extracted from ``<root>/cifar-10-python.tar.gz`` when needed); ``root`` is ``data_dir``, else
``$MODLENS_DATA``, else ``~/.cache/modlens/data``. Files are md5-checked and downloaded from public
mirrors (CIFAR-10: the official archive) if missing.

:func:`load_data_files` reads test and activation data from an image folder (``<class>/<image>``, with
a model's preprocessing), a ``.npz``/``.safetensors`` file of arrays or a dataset name;
:func:`data_files_identity` says what identifies them without reading them.

:func:`load_imagenet_folder` / :func:`iter_imagenet_folder` read an ImageNet validation folder
(``root/<wnid>/<image>.JPEG``) with the standard resize / centre-crop / normalize preprocessing and
an optional seeded per-class subsample; they need Pillow.

:func:`load_text` reads the two-genre text corpus (``<root>/text/``: English prose and Python
source) for language models: byte-level tokens (:func:`encode`, :func:`decode`, 128 ASCII
symbols), byte classes (:func:`byte_classes`), a held-out split by contiguous chunks and
fixed-length contexts with next-token targets and the genre of each sequence
(:class:`TextDataset`; see :mod:`modlens.data._text`).
Uses numpy and the standard library only (scikit-learn for the digits, Pillow for ImageNet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from modlens.core.seeds import as_generator, tagged_sequence

from ._cifar import CLASSES as CIFAR10_CLASSES
from ._cifar import load_cifar10_split
from ._derived import make_halves, make_stack, partner_indices, resize_half_width
from ._digits import load_digits_split
from ._errors import DataCorruptError, DataError, DataUnavailableError
from ._files import (
    IMAGE_OPTIONS,
    data_files_identity,
    folder_digest,
    load_data_files,
    read_arrays,
    source_kind,
)
from ._imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    ImageFolderIndex,
    index_image_folder,
    iter_imagenet_folder,
    preprocess_image,
    read_class_list,
)
from ._imagenet import check_sizes as _check_sizes
from ._imagenet import image_batches
from ._sources import ENV_VAR, data_root, load_idx_split
from ._text import (
    BYTE_CLASSES,
    GENRES,
    TextDataset,
    byte_classes,
    decode,
    encode,
    load_text,
    make_text_split,
    read_genre,
)

__all__ = [
    "BASE_DATASETS",
    "BYTE_CLASSES",
    "CIFAR10_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderIndex",
    "DATASETS",
    "TEXT_DATASETS",
    "held_out_text",
    "ENV_VAR",
    "DataCorruptError",
    "DataError",
    "DataUnavailableError",
    "Dataset",
    "GENRES",
    "TextDataset",
    "VARIANTS",
    "byte_classes",
    "data_root",
    "decode",
    "derived_rng",
    "encode",
    "held_out_data",
    "image_batches",
    "IMAGE_OPTIONS",
    "INTERPOLATIONS",
    "data_files_identity",
    "folder_digest",
    "load_data_files",
    "read_arrays",
    "source_kind",
    "index_image_folder",
    "iter_imagenet_folder",
    "load_dataset",
    "load_imagenet_folder",
    "load_text",
    "make_halves",
    "make_stack",
    "make_text_split",
    "partner_indices",
    "preprocess_image",
    "read_class_list",
    "read_genre",
    "resize_half_width",
    "split_validation",
]

BASE_DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10")
VARIANTS = ("halves", "halves-same", "stack-diff", "stack-same")
_VARIANT_BASES = ("mnist", "fashion-mnist", "digits")  # the two-image variants need grayscale digits-like data
N_CLASSES = 10

_SPECS: dict[str, tuple[str | None, str]] = {b: (None, b) for b in BASE_DATASETS}
_SPECS.update({f"{v}-{b}": (v, b) for v in VARIANTS for b in _VARIANT_BASES})

DATASETS: list[str] = list(_SPECS)
"""Every valid image dataset name."""

TEXT_DATASETS = ("text",)
"""Datasets of token sequences for language models: ``"text"``, the two-genre corpus (:func:`load_text`)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset: ``x`` float32 ``(N, C, H, W)``, ``y`` int64 ``(N,)``.

    ``x`` is in [0, 1], except for ImageNet folders loaded with ``normalize=True`` (mean/std scaled).
    """

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


def derived_rng(name: str, split: str, seed: int = 0) -> np.random.Generator:
    """The generator that :func:`load_dataset` uses to pair images for a derived dataset.

    Its stream depends on ``seed``, ``name`` and ``split`` only (no Python ``hash()``).
    """
    return np.random.default_rng(tagged_sequence(seed, name, split))


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
    ``data_dir`` and ``download`` only matter for MNIST, Fashion-MNIST and CIFAR-10 based names.
    ``"cifar10"`` gives ``(N, 3, 32, 32)`` images (50000 train, 10000 test), classes
    :data:`CIFAR10_CLASSES`.
    Raises ``ValueError`` for an unknown name or split, :class:`DataUnavailableError` when files
    are missing and cannot be downloaded, :class:`DataCorruptError` for damaged files.
    """
    variant, base = _check_args(name, split, seed)
    if base == "digits":
        x, y = load_digits_split(split)
    elif base == "cifar10":
        images, labels = load_cifar10_split(split, data_dir, download)
        x = images.astype(np.float32)
        x /= np.float32(255.0)
        y = labels.astype(np.int64)
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


def load_imagenet_folder(
    root: str | os.PathLike,
    *,
    per_class: int | None = None,
    seed: int = 0,
    size: int = 224,
    resize: int = 256,
    classes: str | os.PathLike | Sequence[str] | None = None,
    normalize: bool = True,
) -> Dataset:
    """An ImageNet validation folder ``root/<wnid>/<image>.JPEG`` as one :class:`Dataset` (``split="val"``).

    Preprocessing: RGB, shorter side resized to ``resize`` (bilinear), centre crop ``size`` x ``size``,
    values in [0, 1], then normalized with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` unless
    ``normalize=False``. Class indices follow ``classes`` (a list of wnids, a one-wnid-per-line text
    file such as ``LOC_synset_mapping.txt``, or Keras' ``imagenet_class_index.json``) or else the
    sorted folder names; ``n_classes`` is the number of classes of that list. ``per_class`` keeps a
    seeded random subsample of that many images per class (the paper analysed a per-class subsample
    of the validation set). All images are held in memory (50000 images at 224 px take 30 GB): use
    :func:`iter_imagenet_folder` to stream batches instead.
    """
    _check_sizes(size, resize)
    index = index_image_folder(root, per_class=per_class, seed=seed, classes=classes)
    x = np.empty((len(index), 3, size, size), dtype=np.float32)
    start = 0
    for xb, _ in image_batches(index, batch_size=64, size=size, resize=resize, normalize=normalize):
        x[start:start + len(xb)] = xb
        start += len(xb)
    return Dataset(name="imagenet", split="val", x=x, y=index.labels.copy(), n_classes=len(index.classes))


def split_validation(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted, disjoint ``(train_idx, val_idx)`` with
    ``len(val_idx) == n_val``: the training examples held out for the activation graph."""
    n, n_val = int(n), int(n_val)
    if not 0 <= n_val < n:
        raise ValueError(f"split_validation: need 0 <= n_val < n, got n_val={n_val}, n={n}")
    perm = as_generator(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def held_out_text(record: dict, *, data_dir: str | os.PathLike | None = None) -> tuple[TextDataset, TextDataset]:
    """``(test, activation)`` contexts of a language model trained on the text corpus, from the
    ``dataset`` record of its manifest (``{"name": "text", "data_seed", "context", "n_test",
    "n_activation"}``): at most ``n_test`` sequences of the test split and ``n_activation`` of the
    held-out "val" split (never trained on), each balanced between the genres
    (:meth:`TextDataset.balanced`, seeded by ``data_seed``)."""
    if not isinstance(record, dict) or record.get("name") not in TEXT_DATASETS:
        raise ValueError(f"held_out_text needs a text dataset record, got {record!r}")
    seed, context = int(record.get("data_seed", 0)), int(record.get("context", 128))
    test = load_text("test", context=context, seed=seed, data_dir=data_dir)
    act = load_text("val", context=context, seed=seed, data_dir=data_dir)
    if record.get("n_test"):
        test = test.balanced(int(record["n_test"]), seed)
    if record.get("n_activation"):
        act = act.balanced(int(record["n_activation"]), seed)
    return test, act


def held_out_data(record: dict, *, data_dir: str | os.PathLike | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x_test, y_test, x_activation)`` of a trained model, from the ``dataset`` record of its
    manifest (``{"name", "data_seed", "activation_split"}``): the test split, and the held-out
    examples that were never trained on (digits: its "val" split; otherwise the training examples
    :func:`split_validation` held out), so activation graphs are never computed on the test set."""
    if not isinstance(record, dict) or "name" not in record:
        raise ValueError("the model's manifest names no dataset; pass test and activation data through the Python API")
    name, data_seed = record["name"], int(record.get("data_seed", 0))
    test = load_dataset(name, "test", data_dir=data_dir, seed=data_seed)
    split = record.get("activation_split", {})
    if split.get("split") == "val":
        act = load_dataset(name, "val", data_dir=data_dir, seed=data_seed).x
    else:
        train = load_dataset(name, "train", data_dir=data_dir, seed=data_seed)
        if len(train) != int(split["n_total"]):
            raise ValueError(f"the manifest expects {split['n_total']} training examples of {name}, found {len(train)}")
        _, val_idx = split_validation(int(split["n_total"]), int(split["n_val"]), int(split["val_seed"]))
        act = train.x[val_idx]
    return test.x, test.y, act
