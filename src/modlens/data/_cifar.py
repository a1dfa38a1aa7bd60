"""CIFAR-10, python version: md5-checked batch files, a restricted unpickler, download and safe extraction.

The files are ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}``, each a pickle (written
by Python 2) of a dict with ``b'data'`` (10000x3072 uint8, rows of 1024 red, 1024 green and 1024
blue values of a 32x32 image) and ``b'labels'``. Every file's md5 is checked against the published
value before it is unpickled, and unpickling resolves only the numpy globals an array needs.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import logging
import os
import pickle
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import DataCorruptError, DataUnavailableError
from ._sources import ENV_VAR, _fetch, _short, data_root

logger = logging.getLogger(__name__)

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# Published checksums of the files inside the archive (tests replace this table for their fake files).
MD5 = {
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_VALUES = 3 * 32 * 32
_FIX = "delete it and extract it again from the official cifar-10-python.tar.gz"


def _reconstruct():
    # numpy's array-unpickling helper, found without naming numpy.core / numpy._core (renamed in numpy 2).
    return np.ndarray((0,), dtype=np.uint8).__reduce__()[0]


# The only globals a CIFAR batch refers to: module and name as written in the pickle -> the object.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code can run)."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return factory()


def unpickle_batch(raw: bytes, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR batch into read-only ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` uint8 labels.

    Only dicts, lists, bytes, ints and numpy uint8 arrays are accepted; anything else is a
    :class:`DataCorruptError` naming ``source``.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged or hostile pickle raises all sorts of errors
        raise DataCorruptError(f"{source}: not a CIFAR-10 python batch ({type(exc).__name__}: {_short(exc)}); "
                               f"{_FIX}") from None
    if not isinstance(obj, dict):
        raise DataCorruptError(f"{source}: holds a {type(obj).__name__}, expected a dict with 'data' and 'labels'; "
                               f"{_FIX}")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataCorruptError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), got {got}; {_FIX}")
    try:
        y = np.asarray(labels)
    except Exception:  # pragma: no cover - asarray of unpickled plain data
        y = np.empty(0, dtype=object)
    if y.ndim != 1 or y.shape[0] != data.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataCorruptError(f"{source}: 'labels' must be a list of {data.shape[0]} ints (one per image), got "
                               f"{type(labels).__name__} of shape {y.shape} and dtype {y.dtype}; {_FIX}")
    bad = y[(y < 0) | (y >= len(CLASSES))]
    if bad.size:
        raise DataCorruptError(f"{source}: label {int(bad[0])} is out of range 0..{len(CLASSES) - 1}; {_FIX}")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))
    y = y.astype(np.uint8)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _read_batch(path: str, size: int, mtime_ns: int, expected_md5: str) -> tuple[np.ndarray, np.ndarray]:
    raw = Path(path).read_bytes()
    actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if actual != expected_md5:
        raise DataCorruptError(f"{path}: md5 is {actual}, expected {expected_md5}; the file is damaged or not the "
                               f"standard CIFAR-10 file: {_FIX} (or load_dataset('cifar10', ..., download=True))")
    return unpickle_batch(raw, path)


def read_batch(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """md5-check then decode ``path`` (the file ``name`` of the archive); cached while the file is unchanged."""
    st = path.stat()
    return _read_batch(str(path), st.st_size, st.st_mtime_ns, MD5[name])


def load_cifar10_split(split: str, data_dir: str | os.PathLike | None = None,
                       download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` uint8 labels of ``"train"`` or ``"test"``.

    Missing batch files are extracted from ``<root>/cifar-10-python.tar.gz`` if it is there, else
    (with ``download``) the archive is downloaded from the official URL, md5-checked and extracted.
    """
    root = data_root(data_dir)
    folder = root / FOLDER
    names = SPLIT_FILES[split]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        archive = root / ARCHIVE
        if not archive.is_file():
            reason = "download=False" if not download else _download_archive(root)
            if reason is not None:
                raise DataUnavailableError(
                    f"CIFAR-10 files missing from {folder}: {', '.join(missing)} ({reason}). Put {ARCHIVE} "
                    f"({URL}) or its extracted {FOLDER}/ folder in {root}, or point to the folder that holds "
                    f"them with load_dataset(..., data_dir=...) or the {ENV_VAR} environment variable.")
        extract_archive(archive, root)
        still = [n for n in names if not (folder / n).is_file()]
        if still:
            raise DataCorruptError(f"{archive} does not contain {FOLDER}/{still[0]}; delete it and download it "
                                   f"again from {URL}")
    parts = [read_batch(folder / n, n) for n in names]
    if len(parts) == 1:
        return parts[0]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _download_archive(root: Path) -> str | None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"download impossible: cannot create the folder: {exc.strerror or exc}"
    try:
        _fetch(URL, root / ARCHIVE, ARCHIVE_MD5)
    except Exception as exc:  # network, HTTP and md5 errors alike
        return f"download failed: {URL}: {_short(exc)}"
    return None


def extract_archive(archive: Path, root: Path) -> None:
    """md5-check ``archive`` and extract only the known regular files of ``cifar-10-batches-py/``.

    Links, devices, absolute or ``..`` paths and unknown names are skipped, so nothing can be
    written outside ``root/cifar-10-batches-py``. Each file is written under a temporary name and
    renamed when complete.
    """
    actual = _md5_file(archive)
    if actual != ARCHIVE_MD5:
        raise DataCorruptError(f"{archive}: md5 is {actual}, expected {ARCHIVE_MD5}; the archive is damaged or not "
                               f"the official one: delete it and download it again from {URL}")
    folder = root / FOLDER
    wanted = {f"{FOLDER}/{name}": name for name in MD5}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():
                    continue
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isfile() members always have data
                    continue
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out, src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    os.replace(tmp, folder / name)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataCorruptError(f"{archive}: cannot extract it ({_short(exc)}); delete it and download it again "
                               f"from {URL}") from None
    logger.info("extracted %s into %s", archive, folder)
