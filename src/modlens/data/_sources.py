"""MNIST and Fashion-MNIST: where the files live, checksums, download and cached decoding.

The data root, ``_fetch`` and ``_short`` are shared with the CIFAR-10 loader.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from ._errors import DataCorruptError, DataUnavailableError
from ._idx import check_pair, gunzip, read_idx_images, read_idx_labels

logger = logging.getLogger(__name__)

ENV_VAR = "MODLENS_DATA"
DEFAULT_ROOT = "~/.cache/modlens/data"
DOWNLOAD_TIMEOUT_S = 15.0

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Reference checksums of the standard distribution files (as in torchvision and the shared MD5SUMS).
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# Public mirrors, tried in order. MNIST: the PyTorch (ossci) S3 mirror that torchvision uses first,
# then the Google CVDF mirror. Fashion-MNIST: Zalando Research's S3 bucket (torchvision's source).
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
IMAGE_SHAPE = (28, 28)
N_CLASSES = 10


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds ``mnist/``, ``fashion-mnist/`` and ``cifar-10-batches-py/``.

    ``data_dir`` if given, else the ``MODLENS_DATA`` environment variable if set and non-empty,
    else ``~/.cache/modlens/data``.
    """
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(data_dir).expanduser().resolve()


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def load_idx_split(
    base: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(N, 28, 28)`` uint8 images and ``(N,)`` uint8 labels of one split.

    Missing files are downloaded when ``download`` is true; every file's md5 is checked before use.
    """
    root = data_root(data_dir)
    folder = root / base
    names = SPLIT_FILES[split]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        reason = "download=False" if not download else _download(base, folder, missing)
        if reason is not None:
            raise DataUnavailableError(_missing_message(base, root, folder, missing, reason))
    images = _read_verified(folder / names[0], MD5[base][names[0]], "images")
    labels = _read_verified(folder / names[1], MD5[base][names[1]], "labels")
    check_pair(images, labels, source=str(folder), image_shape=IMAGE_SHAPE, n_classes=N_CLASSES)
    return images, labels


def _missing_message(base: str, root: Path, folder: Path, missing: list[str], reason: str) -> str:
    hint = ""
    if any((root / n).is_file() for n in missing):
        hint = f" (they are directly in {root}: point at its parent instead)"
    return (
        f"{_TITLES[base]} files missing from {folder}: {', '.join(missing)} ({reason}){hint}. "
        f"Put the standard gzipped IDX files in {folder}, or point to a folder that holds {base}/ "
        f"with load_dataset(..., data_dir=...) or the {ENV_VAR} environment variable."
    )


def _read_verified(path: Path, expected_md5: str, kind: str) -> np.ndarray:
    st = path.stat()
    # The key includes size and mtime, so a file replaced on disk is read and checked again.
    return _read_cached(str(path), st.st_size, st.st_mtime_ns, expected_md5, kind)


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, size: int, mtime_ns: int, expected_md5: str, kind: str) -> np.ndarray:
    raw = Path(path).read_bytes()
    actual = md5_of(raw)
    if actual != expected_md5:
        raise DataCorruptError(
            f"{path}: md5 is {actual}, expected {expected_md5}; the file is damaged or not the standard "
            "distribution file: delete it and download it again (load_dataset(..., download=True)) "
            "or copy in a good one"
        )
    data = gunzip(raw, path)
    del raw
    return read_idx_images(data, path) if kind == "images" else read_idx_labels(data, path)


def _download(base: str, folder: Path, names: list[str]) -> str | None:
    """Fetch ``names`` into ``folder``; None on success, else a short reason for the failure."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"download impossible: cannot create the folder: {exc.strerror or exc}"
    for name in names:
        errors = []
        for mirror in MIRRORS[base]:
            url = mirror + name
            try:
                _fetch(url, folder / name, MD5[base][name])
                break
            except (OSError, ValueError, http.client.HTTPException) as exc:
                errors.append(f"{url}: {_short(exc)}")
        else:
            return "download failed: " + "; ".join(errors)
    return None


def _short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return " ".join(text.split())


def _fetch(url: str, dest: Path, expected_md5: str) -> None:
    """Download ``url`` to a temporary file next to ``dest``; rename it there only if the md5 matches."""
    logger.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": "modlens"})
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != expected_md5:
            raise ValueError(f"md5 of the download is {actual}, expected {expected_md5}")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
