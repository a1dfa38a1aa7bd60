"""Test and activation data from files: an image folder (``<class>/<image>``), a ``.npz`` or
``.safetensors`` file of arrays, or a built-in dataset by name (``NAME`` or ``NAME:SPLIT``).

Image folders are read with :func:`~modlens.data.index_image_folder` and
:func:`~modlens.data.preprocess_image` (the ImageNet reader, with the size, mean, std, channels
and interpolation given), so a class index is the position of its folder among the sorted class
folders (or in ``classes``). When the test and the activation data are the same folder, each
class's images are split: the first ``per_class`` of a seeded sample for the test set, the next
``activation_per_class`` for the activation graph, so the two never overlap.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ._imagenet import IMAGE_SUFFIXES, ImageFolderIndex, image_batches, index_image_folder

#: Array names read from a ``.npz`` / ``.safetensors`` file, in order of preference.
INPUT_KEYS = ("x", "inputs", "images", "pixel_values", "input_ids")
LABEL_KEYS = ("y", "labels", "targets")
ARRAY_SUFFIXES = (".npz", ".safetensors")
#: Options of image folders (``None``: the model's preprocessing where known, else the default).
IMAGE_OPTIONS = {"image_size": None, "resize": None, "mean": None, "std": None, "interpolation": "bilinear",
                 "channels": 3, "per_class": None, "activation_per_class": None, "classes": None, "sample_seed": 0}


def source_kind(source: str | os.PathLike) -> str:
    """``"images"`` (a folder), ``"arrays"`` (``.npz``/``.safetensors``) or ``"dataset"`` (a name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return "images"
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return "arrays"
    return "dataset"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(root: str | os.PathLike) -> str:
    """SHA-256 of the relative paths and sizes of the images under ``root/<class>/`` (what identifies
    an image folder in study task keys without reading every image)."""
    root = Path(root)
    digest = hashlib.sha256()
    for p in sorted(root.glob("*/*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            digest.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return digest.hexdigest()


def _pick(names, keys):
    return next((k for k in keys if k in names), None)


def read_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``(inputs, labels or None)`` from a ``.npz`` (read without pickles) or ``.safetensors`` file;
    inputs are the first of :data:`INPUT_KEYS` in it, labels the first of :data:`LABEL_KEYS`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as exc:  # numpy, zipfile and safetensors raise their own types
        raise ValueError(f"{path} cannot be read as {path.suffix} arrays ({type(exc).__name__}: {exc})") from None
    xk, yk = _pick(arrays, INPUT_KEYS), _pick(arrays, LABEL_KEYS)
    if xk is None:
        raise ValueError(f"{path} holds the arrays {sorted(arrays)}; name the inputs one of {', '.join(INPUT_KEYS)} "
                         f"and the labels one of {', '.join(LABEL_KEYS)}")
    x, y = arrays[xk], arrays.get(yk) if yk else None
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise ValueError(f"{path}: labels {yk!r} must be one integer per input, got shape {y.shape} for "
                         f"inputs of shape {x.shape}")
    if y is not None and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: labels {yk!r} must be integers, got dtype {y.dtype}")
    x = x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x.astype(np.int64)
    return np.ascontiguousarray(x), None if y is None else y.astype(np.int64)


def _dataset_name(source: str) -> tuple[str, str]:
    from . import DATASETS  # the package's names (late: the package imports this module)

    name, _, split = str(source).partition(":")
    if name not in DATASETS:
        raise ValueError(f"data {source!r} is neither a folder of class folders, a .npz/.safetensors file, nor a "
                         f"dataset name ({', '.join(DATASETS)}, optionally NAME:SPLIT)")
    return name, split


def _dataset(source: str, role: str, data_dir, seed: int):
    from . import load_dataset

    name, split = _dataset_name(source)
    if not split:
        split = "test" if role == "test" else ("val" if name.endswith("digits") else "train")
    data = load_dataset(name, split, data_dir=data_dir, seed=seed)
    return data.x, data.y, {"kind": "dataset", "name": name, "split": split, "seed": seed}


def _read_index(index: ImageFolderIndex, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    mean, std = opts.get("mean"), opts.get("std")
    normalize = mean is not None or std is not None
    if normalize and (mean is None or std is None):
        raise ValueError(f"give both mean and std for the images of {index.root}, or neither (values in [0, 1])")
    extra = {"mean": mean, "std": std} if normalize else {}
    xs, ys = [], []
    for x, y in image_batches(index, batch_size=64, size=opts.get("image_size"), resize=opts.get("resize"),
                              normalize=normalize, channels=int(opts.get("channels") or 3),
                              interpolation=opts.get("interpolation") or "bilinear", **extra):
        xs.append(x)
        ys.append(y)
    shapes = sorted({x.shape[1:] for x in xs})
    if len(shapes) > 1:
        raise ValueError(f"images of {index.root} differ in size ({shapes[0]} and {shapes[-1]}); give an image "
                         "size (--image-size N) to resize and centre-crop them alike")
    return np.concatenate(xs), np.concatenate(ys)


def _split_positions(index: ImageFolderIndex, n_test: int | None) -> np.ndarray:
    """True for the images of each class that go to the test set: the first ``n_test`` (default: half,
    rounded up) in the index's order."""
    keep = np.zeros(len(index), dtype=bool)
    for c in np.unique(index.labels):
        members = np.flatnonzero(index.labels == c)
        cut = n_test if n_test is not None else (len(members) + 1) // 2
        if len(members) < 2 or cut >= len(members):
            raise ValueError(f"class {index.classes[c]!r} of {index.root} has {len(members)} image(s), too few to give "
                             "both test and activation images; add images or lower per_class")
        keep[members[:cut]] = True
    return keep


def _sub_index(index: ImageFolderIndex, mask: np.ndarray) -> ImageFolderIndex:
    return ImageFolderIndex(index.root, tuple(p for p, m in zip(index.paths, mask) if m), index.labels[mask],
                            index.classes)


def _images_record(index: ImageFolderIndex, opts: dict, part: str) -> dict:
    return {"kind": "images", "path": str(index.root), "part": part, "n": len(index), "n_classes": len(index.classes),
            "files": folder_digest(index.root)}


def load_data_files(test, activation=None, *, data_dir=None, require_labels: bool = True, **options):
    """``((x_test, y_test), x_activation or None, record)`` from data sources (see the module
    docstring); ``options`` are :data:`IMAGE_OPTIONS` for image folders. The record says what was
    read (paths, splits, numbers of images, a digest of the files) and with which options.
    ``require_labels=False`` (token ids for the next-token task) lets ``y_test`` be None."""
    unknown = sorted(set(options) - set(IMAGE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown}; known: {', '.join(IMAGE_OPTIONS)}")
    opts = {k: options.get(k, v) for k, v in IMAGE_OPTIONS.items()}
    seed = int(opts["sample_seed"])
    same = activation is not None and source_kind(test) == "images" and \
        Path(test).expanduser().resolve() == Path(activation).expanduser().resolve()
    record = {"options": opts}
    if same:
        p, a = opts["per_class"], opts["activation_per_class"]
        index = index_image_folder(Path(test).expanduser(), per_class=None if p is None or a is None else p + a,
                                   seed=seed, classes=opts["classes"])
        mask = _split_positions(index, p)
        if a is not None and p is None:
            raise ValueError("activation_per_class needs per_class (the test images per class) beside it")
        parts = [_sub_index(index, mask), _sub_index(index, ~mask)]
        (x, y), (act, _) = (_read_index(i, opts) for i in parts)
        record.update(test=_images_record(parts[0], opts, "test"), activation=_images_record(parts[1], opts, "activation"))
        return (x, y), act, record
    out = []
    for role, source, per_class in (("test", test, opts["per_class"]), ("activation", activation, opts["activation_per_class"])):
        if source is None:
            out.append((None, None))
            record[role] = None
            continue
        kind = source_kind(source)
        if kind == "images":
            index = index_image_folder(Path(source).expanduser(), per_class=per_class, seed=seed, classes=opts["classes"])
            x, y = _read_index(index, opts)
            record[role] = _images_record(index, opts, "all" if per_class is None else "sample")
        elif kind == "arrays":
            x, y = read_arrays(source)
            path = Path(source).expanduser().resolve()
            record[role] = {"kind": "arrays", "path": str(path), "n": int(len(x)), "sha256": _file_sha256(path)}
        else:
            x, y, record[role] = _dataset(source, role, data_dir, seed)
            record[role]["n"] = int(len(x))
        if role == "test" and y is None and require_labels:
            raise ValueError(f"test data {source} has no labels; the lesion test needs them "
                             f"(an array named one of {', '.join(LABEL_KEYS)}, or class folders)")
        out.append((x, y))
    (x, y), (act, _) = out
    return (x, y), act, record


def data_files_identity(test, activation=None, **options) -> dict:
    """What identifies the data that :func:`load_data_files` would read, without reading it: the
    options, and per role the kind and a digest of the files (an image folder's relative paths and
    sizes, an array file's bytes) or the dataset's name and split; paths are left out, so a moved
    folder keeps its identity."""
    opts = {k: options.get(k, v) for k, v in IMAGE_OPTIONS.items()}
    out = {"options": opts}
    for role, source in (("test", test), ("activation", activation)):
        if source is None:
            out[role] = None
            continue
        kind, path = source_kind(source), Path(source).expanduser()
        if kind == "images":
            out[role] = {"kind": kind, "files": folder_digest(path)}
        elif kind == "arrays":
            if not path.is_file():
                raise FileNotFoundError(f"data file {path} does not exist")
            out[role] = {"kind": kind, "sha256": _file_sha256(path)}
        else:
            name, split = _dataset_name(source)
            out[role] = {"kind": kind, "name": name, "split": split or None, "seed": int(opts["sample_seed"])}
    out["same_folder"] = bool(activation is not None and out["test"]["kind"] == "images"
                              and path.resolve() == Path(test).expanduser().resolve())
    return out
