"""How modlens writes files: canonical JSON, and writes that leave either the old file (or
folder) or the complete new one, never a partial one.

Every writer above the torch boundary uses these: the saved analysis result, the study's task
cache and its outputs. A write goes to a temporary name beside its target (``.<name>.tmp-<pid>``)
and is renamed onto it when complete, so a run killed at any moment leaves at most a temporary
name, which :func:`is_temporary` recognizes for clean-up.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


def json_default(obj):
    """JSON form of the values modlens records that ``json`` does not know: numpy scalars and
    arrays, sets (sorted), and callables (by qualified name, e.g. a preprocessing function in the
    visualization options)."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if callable(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def canonical(obj) -> str:
    """Compact JSON with sorted keys: the same value always gives the same text (what keys hash)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def pretty(obj) -> str:
    """Indented JSON with sorted keys, for files people read (manifests, study.json)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default)


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def is_temporary(path: Path) -> bool:
    """A name :func:`atomic_folder` or the ``atomic_write_*`` functions write to before renaming."""
    name = Path(path).name
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_frame(frame, path_stem: str | os.PathLike) -> list[Path]:
    """``<stem>.parquet`` and ``<stem>.csv`` of a pandas frame, each written whole or not at all."""
    path_stem = Path(path_stem)
    out = []
    for ext in ("parquet", "csv"):
        final = path_stem.with_name(f"{path_stem.name}.{ext}")
        tmp = _temporary(final)
        try:
            if ext == "parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        out.append(final)
    return out


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block ends without an exception it replaces
    ``target`` (an existing folder is moved aside first and removed after the rename), otherwise
    it is removed. ``overwrite=False`` refuses a non-empty ``target`` before anything is written."""
    target = Path(target)
    if not overwrite and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"output folder {target} is not empty; choose another folder or pass overwrite=True "
                              "(--overwrite)")
    tmp = _temporary(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(src: Path, target: Path) -> None:
    """Rename the complete folder ``src`` onto ``target``; an existing ``target`` is moved aside
    first and removed afterwards, so ``target`` is always either the old or the new folder."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(src, target)
    shutil.rmtree(old, ignore_errors=True)


def copy_folder(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Replace ``target`` by a copy of ``src``, through a temporary folder and a rename."""
    with atomic_folder(target) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


__all__ = ["json_default", "canonical", "pretty", "is_temporary", "atomic_write_text", "atomic_write_frame",
           "atomic_folder", "replace_folder", "copy_folder"]
