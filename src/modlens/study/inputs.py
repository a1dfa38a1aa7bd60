"""A network and its data by name, for ``modlens analyze`` and study specs alike.

Models are named as :mod:`modlens.nn.sources` reads them (a modlens model folder,
``pkg.module:factory``, ``timm:NAME``, ``torchvision:NAME``, ``hf:REPO_OR_FOLDER``) with
``weights``, ``model_args`` and ``init_seed``; data as :func:`modlens.data.load_data_files` reads
them (an image folder, a ``.npz``/``.safetensors`` file, a dataset name) with the image options.
:data:`INPUT_OPTIONS` is the one table of these options: the command line's flags
(``--test-data``, ``--image-size``, ...) and a spec's keys (``test_data``, ``image_size``, ...)
are made from it.

An image folder is preprocessed as the model's library says where it does (timm's pretrained
config, torchvision's transforms, a Hugging Face ``preprocessor_config.json``); an option given
explicitly wins. A modlens model folder given no data uses the dataset its manifest records.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modlens.data import IMAGE_OPTIONS, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, data_files_identity, load_data_files, source_kind
from modlens.nn.sources import ModelSource, resolve_model


@dataclass(frozen=True)
class InputOption:
    name: str
    kind: type
    help: str
    choices: tuple | None = None
    n: int | None = None  # a fixed number of values (mean, std)


#: The options of a network's model and data (command-line flags with dashes, spec keys as here).
INPUT_OPTIONS = (
    InputOption("init_seed", int, "seed of the random weights of a model given no weights (default 0)"),
    InputOption("test_data", str, "the lesion test set: an image folder (CLASS/IMAGE), a .npz/.safetensors file of "
                                  "arrays (x, y) or a dataset name (NAME or NAME:SPLIT)"),
    InputOption("activation_data", str, "held-out data for the activation graphs (as test_data; the same image folder "
                                        "is split per class, so no image is in both)"),
    InputOption("image_size", int, "image folders: centre crop size (default: the model's preprocessing, else the "
                                   "images as they are)"),
    InputOption("resize", int, "image folders: shorter side resized to this before the crop (default: the model's)"),
    InputOption("mean", float, "image folders: per-channel mean to subtract (default: the model's, else none)", n=3),
    InputOption("std", float, "image folders: per-channel std to divide by (default: the model's, else none)", n=3),
    InputOption("interpolation", str, "image folders: resize filter (default: the model's, else bilinear)",
                choices=INTERPOLATIONS),
    InputOption("channels", int, "image folders: 3 (RGB) or 1 (grayscale) (default: the model's, else 3)",
                choices=(1, 3)),
    InputOption("per_class", int, "image folders: test images per class (a seeded sample; default all, or half "
                                  "when the activation data is the same folder)"),
    InputOption("activation_per_class", int, "image folders: activation images per class (default: the rest)"),
    InputOption("classes", str, "image folders: a file listing the class folders in class-index order (default: "
                                "sorted folder names)"),
    InputOption("sample_seed", int, "seed of the per-class samples of image folders (default 0)"),
)
_PREPROCESSING = {"image_size": "size", "resize": "resize", "mean": "mean", "std": "std",
                  "interpolation": "interpolation", "channels": "channels"}


def parse_model_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--model-arg``: the value as JSON where it parses (10, 0.5, true, [1, 2]),
    else as the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"--model-arg takes KEY=VALUE (e.g. num_classes=10), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def model_sources(models, weights=None, *, model_args=None, init_seed: int = 0) -> list[ModelSource]:
    """One resolved source per network. ``weights`` is None, one entry per model, or several
    entries for one model (replicates: the same model with each weights file)."""
    models = [os.fspath(m) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    weights = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights or [])
    if not models:
        raise ValueError("give at least one model")
    if weights and len(models) == 1 and len(weights) > 1:
        models = models * len(weights)
    if weights and len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} models: give one weights entry per model, or "
                         "one model with several weights files (replicates)")
    pairs = zip(models, weights or [None] * len(models))
    return [resolve_model(m, w, model_args=model_args, init_seed=init_seed) for m, w in pairs]


def data_options(source: ModelSource | dict, options: dict | None) -> dict:
    """The image options of a network: those given, the rest from the model's preprocessing."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(IMAGE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown}; known: {', '.join(IMAGE_OPTIONS)}")
    record = source.record() if isinstance(source, ModelSource) else source
    pre = record.get("preprocessing") or {}
    merged = {k: pre.get(v) for k, v in _PREPROCESSING.items() if pre.get(v) is not None}
    merged.update(options)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in merged.items()}


def data_description(source: ModelSource, test_data=None, activation_data=None, options: dict | None = None,
                     base: Path | None = None) -> dict:
    """What a network's data are, JSON-able: the dataset its modlens folder's manifest records
    (when no data are named), or ``{"files": {...}}`` naming the sources and their options. Paths
    are made absolute (relative to ``base``)."""
    if test_data is None:
        if activation_data is not None or any(v is not None for v in (options or {}).values()):
            raise ValueError(f"{source.name}: data options without test data; name the test set (test_data)")
        dataset = source.facts.get("dataset")
        if source.kind != "folder" or not isinstance(dataset, dict):
            raise ValueError(f"{source.name}: name its test data (--test-data / test_data: an image folder, a "
                             ".npz/.safetensors file or a dataset name) and, for activation partitionings, its "
                             "activation data; only modlens model folders record their dataset")
        return dataset

    def where(text):
        if text is None:
            return None
        path = Path(os.path.expanduser(str(text)))
        if not path.is_absolute() and (path.exists() or base is not None and (base / path).exists()):
            path = path if path.exists() else base / path
        return str(path.resolve()) if path.exists() else str(text)

    test, act = where(test_data), where(activation_data)
    if act is not None and act == test and source_kind(test) == "arrays":
        raise ValueError(f"the activation data {activation_data} are the test data; give held-out data (only an "
                         "image folder is split per class between the two)")
    return {"files": {"test": test, "activation": act, "options": data_options(source, options)}}


def imagenet_data(table: dict) -> dict:
    """A spec's ``imagenet = {folder, per_class, activation_per_class, classes, seed}`` table as named
    data: the folder split per class into test and activation images, with ImageNet's
    preprocessing (224 px centre crop of the 256 px resize, ImageNet mean and std)."""
    options = {"per_class": int(table.get("per_class", 10)), "activation_per_class": int(table.get("activation_per_class", 5)),
               "sample_seed": int(table.get("seed", 0)), "image_size": 224, "resize": 256, "mean": list(IMAGENET_MEAN),
               "std": list(IMAGENET_STD), "interpolation": "bilinear", "channels": 3}
    if table.get("classes") is not None:
        options["classes"] = table["classes"]
    return {"test_data": table["folder"], "activation_data": table["folder"], "options": options}


def resolve_networks(models, weights=(), *, model_args=None, init_seed: int = 0, data: dict | None = None,
                     build: bool = False) -> list[tuple[ModelSource, dict]]:
    """``(source, data description)`` of each network of a group of models given by name or folder;
    ``data`` is ``{"test_data", "activation_data", "options"}`` or None (the folders' datasets).
    With ``build``, every model not in a modlens folder is built once and its weights loaded, so a
    file that does not fit fails here, before any work."""
    out = []
    data = data or {}
    for source in model_sources(list(models), [w or "" for w in weights] or None, model_args=model_args,
                                init_seed=init_seed):
        description = data_description(source, data.get("test_data"), data.get("activation_data"), data.get("options"))
        data_identity(description)  # the files are there and readable as named
        if build and source.kind != "folder":
            source.build()
        out.append((source, description))
    return out


def network_name(source: ModelSource) -> str:
    """A short name of a network: its folder's name, its weights file's stem, or its model's name."""
    weights = source.facts.get("weights") or {}
    if source.kind == "folder":
        return Path(source.target).name
    if weights.get("file") and not weights.get("built_in") and not weights.get("pretrained"):
        return Path(weights["file"]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", source.name.rstrip("/").split("/")[-1]).strip("-") or "model"


def network_names(sources) -> list[str]:
    """:func:`network_name` of each source, numbered when two would be the same."""
    names = [network_name(s) for s in sources]
    return names if len(set(names)) == len(names) else [f"{i}-{n}" for i, n in enumerate(names)]


def data_identity(data: dict) -> dict:
    """What identifies a network's data in task keys: named datasets by their record (they are read
    from md5-checked files), files by their digests (:func:`modlens.data.data_files_identity`)."""
    if "files" not in data:
        return data
    f = data["files"]
    return {"files": data_files_identity(f["test"], f["activation"], **f["options"])}


def load_files(data: dict, data_dir=None, *, require_labels: bool = True):
    """``((x_test, y_test), x_activation or None)`` as torch tensors for a ``{"files": ...}`` data
    description (a dataset record is read by :func:`modlens.study.commands.model_data`);
    ``require_labels=False`` (the next-token task reads token ids only) lets ``y_test`` be None."""
    import torch

    f = data["files"]
    (x, y), act, _ = load_data_files(f["test"], f["activation"], data_dir=data_dir, require_labels=require_labels,
                                     **f["options"])
    as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return (as_t(x), as_t(y)), as_t(act)


__all__ = ["INPUT_OPTIONS", "InputOption", "parse_model_arg", "model_sources", "data_options", "data_description",
           "data_identity", "load_files", "imagenet_data", "resolve_networks", "network_name", "network_names"]
