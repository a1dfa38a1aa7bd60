"""Save and load models as ``model.safetensors`` + ``manifest.json``, never unpickling anything.

The manifest carries the architecture (a dict for :func:`modlens.nn.models.build_model`), so a
model is rebuilt from declared data, and the SHA-256 of the weights file, checked before reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modlens._version import __version__
from modlens.nn.models import build_model

__all__ = ["save_model", "load_model", "read_manifest", "resolve_directory", "sha256_file", "WEIGHTS_FILE", "MANIFEST_FILE",
           "FORMAT", "FORMAT_VERSION"]

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "modlens-model"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(architecture: Any) -> nn.Module:
    # A throwaway generator: the weights are overwritten, and torch's global RNG stays untouched.
    return build_model(architecture, generator=torch.Generator().manual_seed(0))


def _check_tensors(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise a one-line ValueError on missing/unexpected tensors or shape mismatches."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected}")
    for name in sorted(set(expected) & set(found)):
        want, got = tuple(expected[name].shape), tuple(found[name].shape)
        if want != got:
            problems.append(f"tensor {name!r} has shape {got} in the weights but {want} in the architecture")
    if problems:
        raise ValueError(f"{where}: weights do not match the manifest's architecture: " + "; ".join(problems))


def _tied(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names of tensors that share memory with an earlier one (tied weights, such as a decoder's
    unembedding and token embedding), mapped to that earlier name."""
    first: dict[tuple, str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def save_model(model: nn.Module, directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` into ``directory`` (created if needed).

    ``manifest`` must hold ``architecture`` (the dict ``build_model`` rebuilds ``model`` from) and may
    hold anything JSON-able (dataset, seed, accuracies...). ``format``, ``format_version``,
    ``modlens_version`` and ``sha256`` are added. Files are written under temporary names and renamed
    at the end, so a failure leaves no partial output. Returns the directory.
    """
    directory = Path(directory)
    architecture = manifest.get("architecture") if isinstance(manifest, Mapping) else None
    if not isinstance(architecture, dict):
        raise ValueError("save_model: manifest must contain 'architecture', a dict such as "
                         "{'type': 'mlp', 'sizes': [784, 256, 10], 'activation': 'relu'}")
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    _check_tensors(_build(architecture).state_dict(), state, f"save_model({str(directory)!r})")
    for name in _tied(model.state_dict()):  # tied weights are stored once; the architecture ties them again
        del state[name]
    out = dict(manifest)
    out.update(format=FORMAT, format_version=FORMAT_VERSION, modlens_version=__version__)
    out.pop("sha256", None)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_model: manifest is not JSON-serializable ({exc})") from None

    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    tmp_manifest = directory / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    placed = False
    try:
        save_file(state, str(tmp_weights))
        out["sha256"] = sha256_file(tmp_weights)
        tmp_manifest.write_text(json.dumps(out, sort_keys=True, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
        placed = True
        os.replace(tmp_manifest, directory / MANIFEST_FILE)
    except BaseException:
        # Weights without their manifest are partial output (an old manifest would not match them).
        for tmp in (tmp_weights, tmp_manifest, *([directory / WEIGHTS_FILE] if placed else [])):
            tmp.unlink(missing_ok=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    return directory


def _pickle_error(path: Path) -> ValueError:
    return ValueError(
        f"{path} looks like a PyTorch checkpoint, not a modlens model folder ({WEIGHTS_FILE} + {MANIFEST_FILE}); "
        f"name the model's code and pass the file as its weights: modlens analyze pkg.module:factory --weights {path} "
        "(a state dict is read with torch.load(weights_only=True); modlens never unpickles objects), or convert it: "
        f"state = torch.load({str(path)!r}, weights_only=True); model = build_model(arch); "
        f"model.load_state_dict(state); modlens.nn.io.save_model(model, 'out_dir', {{'architecture': arch}})"
    )


def resolve_directory(directory: str | os.PathLike) -> Path:
    """The model folder ``directory`` names (or the folder of its weights or manifest file); a one-line
    error when there is none, or when a pickled checkpoint is given instead."""
    path = Path(directory)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, MANIFEST_FILE):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"load_model: {path} is not a directory holding {WEIGHTS_FILE} + {MANIFEST_FILE}"
                                + ("" if path.exists() else "; a model is a modlens model folder, pkg.module:factory, "
                                   "timm:NAME, torchvision:NAME or hf:REPO_OR_FOLDER"))
    if not (path / MANIFEST_FILE).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(path / pickles[0])
        raise FileNotFoundError(f"load_model: no {MANIFEST_FILE} in {path}; save models with modlens.nn.io.save_model")
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a model folder, its format and version checked (the weights are not read)."""
    manifest_path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{manifest_path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{manifest_path}: format is {got!r}, expected {FORMAT!r}; not a modlens model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {version!r} is not supported by modlens "
                         f"{__version__} (reads version {FORMAT_VERSION}); upgrade modlens or re-save the model")
    return manifest


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model in eval mode, manifest)``.

    Checks the manifest's format and version, the weights' SHA-256, tensor names and shapes
    against the architecture, and that every weight is finite; each failure is a ``ValueError``
    naming the file or tensor.
    """
    directory = resolve_directory(directory)
    manifest = read_manifest(directory)
    manifest_path, weights_path = directory / MANIFEST_FILE, directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"load_model: {weights_path} is missing (the manifest is there)")
    actual = sha256_file(weights_path)
    if actual != manifest.get("sha256"):
        raise ValueError(f"{weights_path}: SHA-256 {actual} does not match the manifest's {manifest.get('sha256')!r}; "
                         "the file is corrupted or was replaced. Re-copy it, or re-save the model with save_model")
    try:
        model = _build(manifest.get("architecture"))
    except ValueError as exc:
        raise ValueError(f"{manifest_path}: bad architecture: {exc}") from None
    tensors = load_file(str(weights_path))
    for name, source in _tied(model.state_dict()).items():  # weights the architecture ties were stored once
        if name not in tensors and source in tensors:
            tensors[name] = tensors[source]
    _check_tensors(model.state_dict(), tensors, str(weights_path))
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{weights_path}: tensor {name!r} contains NaN or infinite values")
    model.load_state_dict(tensors, strict=True)
    return model.eval(), manifest
