"""timm, torchvision and Hugging Face models by name, for :mod:`modlens.nn.sources`: whether the
name exists, its preprocessing and input name as its library states them, where its pretrained
weights are cached, and building it. Nothing here downloads: Hugging Face is asked with
``local_files_only=True``, and pretrained files are looked up in the caches, never fetched."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch

_INSTALL = {"timm": "pip install timm", "torchvision": "pip install torchvision", "hf": "pip install transformers"}
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _library(kind: str):
    module = {"timm": "timm", "torchvision": "torchvision", "hf": "transformers"}[kind]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{kind}: models need {module} ({exc}); install it: {_INSTALL[kind]}") from None


def _unknown(kind: str, target: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(target, known, n=4, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else f"{len(known)} names are known"
    lister = {"timm": "timm.list_models()", "torchvision": "torchvision.models.list_models()"}[kind]
    return ValueError(f"{kind} has no model {target!r} ({hint}; all of them: {lister})")


def describe(kind: str, target: str, model_args: dict) -> dict:
    """Facts found without building the model: library versions, preprocessing, input name,
    number of classes; for ``hf`` the folder and its weights (their combined SHA-256)."""
    lib = _library(kind)
    facts = {"libraries": {"torch": torch.__version__, lib.__name__: getattr(lib, "__version__", "?")}}
    if kind == "timm":
        if not lib.is_model(target):
            raise _unknown(kind, target, lib.list_models())
        facts.update(_timm_facts(target, model_args))
    elif kind == "torchvision":
        names = lib.models.list_models()
        if target not in names:
            raise _unknown(kind, target, names)
        facts.update(_torchvision_facts(lib, target, model_args))
    else:
        facts.update(_hf_facts(lib, target))
    return facts


def _timm_facts(target: str, model_args: dict) -> dict:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(target)
    cfg = cfg.to_dict() if cfg is not None else {}
    out = {"n_classes": model_args.get("num_classes", cfg.get("num_classes"))}
    if cfg.get("input_size"):
        size = int(model_args.get("img_size", cfg["input_size"][-1]))
        crop = float(cfg.get("crop_pct") or 1.0)
        out["preprocessing"] = {"size": size, "resize": int(math.floor(size / crop)), "mean": list(cfg["mean"]),
                                "std": list(cfg["std"]), "interpolation": cfg.get("interpolation") or "bilinear",
                                "channels": int(model_args.get("in_chans", cfg["input_size"][0])),
                                "from": f"timm's pretrained config of {target}"}
    return out


def _torchvision_facts(tv, target: str, model_args: dict) -> dict:
    try:
        default = tv.models.get_model_weights(target).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return {"n_classes": model_args.get("num_classes", 1000)}
    t = default.transforms()
    out = {"n_classes": model_args.get("num_classes", len(default.meta.get("categories") or []) or 1000)}
    crop, resize = getattr(t, "crop_size", None), getattr(t, "resize_size", None)
    if crop:
        interpolation = getattr(getattr(t, "interpolation", None), "value", "bilinear")
        out["preprocessing"] = {"size": int(crop[0]), "resize": int(resize[0]) if resize else int(crop[0]),
                                "mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
                                "interpolation": str(interpolation), "channels": 3,
                                "from": f"torchvision's {default} transforms"}
    return out


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return os.path.expanduser("~/.cache/huggingface/hub")


def hf_folder(target: str) -> Path:
    """The local folder of ``hf:target``: the folder itself, or the cached snapshot of a hub id."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"hf:{target}: the folder has no config.json; save the model there with "
                                    "model.save_pretrained(FOLDER)")
        return path.resolve()
    found = None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", target) and not target.startswith("."):  # a hub id: namespace/name
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(target, "config.json")
        except ValueError:  # not a valid repo id after all
            found = None
    if not isinstance(found, str):
        raise FileNotFoundError(f"hf:{target} is neither a folder nor a hub id in the local Hugging Face cache "
                                f"(looked in {path.resolve()} and {_hf_cache_dir()}); modlens does not download: "
                                "fetch it where there is network (huggingface-cli download ID) or save_pretrained "
                                "it into a folder")
    return Path(found).parent


def _hf_weights(folder: Path, target: str) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        raise ValueError(f"hf:{target}: {folder} holds no .safetensors weights"
                         + (f", only the pickle {pickles[0]}; modlens never unpickles: convert it with "
                            "model.save_pretrained(FOLDER, safe_serialization=True) where you trust the file"
                            if pickles else "; save the model with model.save_pretrained(FOLDER)"))
    digest = hashlib.sha256()
    for p in [folder / "config.json", *files]:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return {"file": str(folder), "files": [p.name for p in files], "sha256": digest.hexdigest(), "built_in": True}


def _hf_class(transformers, config, target: str):
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"hf:{target}: config.json names the architectures {names or 'none'}, none of them a class of "
                     f"transformers {transformers.__version__}; save the model with save_pretrained, or upgrade "
                     "transformers")


def _edge(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if isinstance(value.get(key), int):
                return value[key]
    return None


def hf_preprocessing(folder: Path, config) -> dict | None:
    """Size, resize, mean and std from ``preprocessor_config.json`` (the image processor's saved
    settings), read as JSON: a centre crop of ``crop_size`` after resizing to ``size``, or a
    resize to ``size / crop_pct`` then a crop of ``size``, or a plain resize to ``size``."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text(encoding="utf-8"))
    size, crop = _edge(c.get("size")), _edge(c.get("crop_size")) if c.get("do_center_crop") else None
    if size is None and crop is None:
        return None
    if crop is not None:
        out = {"size": crop, "resize": max(size or crop, crop)}
    elif c.get("crop_pct"):
        out = {"size": size, "resize": int(math.floor(size / float(c["crop_pct"])))}
    else:
        out = {"size": size, "resize": size}
    normalize = c.get("do_normalize", True)
    out.update(mean=list(c["image_mean"]) if normalize and c.get("image_mean") else None,
               std=list(c["image_std"]) if normalize and c.get("image_std") else None,
               interpolation=_PIL_FILTERS.get(c.get("resample"), "bilinear"),
               channels=int(getattr(config, "num_channels", 3) or 3), **{"from": str(path)})
    return out


def _hf_facts(transformers, target: str) -> dict:
    folder = hf_folder(target)
    weights = _hf_weights(folder, target)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = _hf_class(transformers, config, target)
    return {"hf_folder": str(folder), "weights": weights, "hf_sha256": weights["sha256"],
            "input_name": getattr(cls, "main_input_name", None), "hf_class": cls.__name__, "n_classes": getattr(config, "num_labels", None),
            "preprocessing": hf_preprocessing(folder, config)}


def pretrained_file(kind: str, target: str) -> Path:
    """The cached file of the library's pretrained weights of ``target``; a one-line
    ``FileNotFoundError`` listing where it was looked for when it is not cached."""
    lib = _library(kind)
    looked, candidates = [], []
    if kind == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(target)
        cfg = cfg.to_dict() if cfg is not None else {}
        if cfg.get("hf_hub_id"):
            from huggingface_hub import try_to_load_from_cache

            for name in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(cfg["hf_hub_id"], name)
                looked.append(f"{_hf_cache_dir()} ({cfg['hf_hub_id']}, {name})")
                if isinstance(found, str):
                    return Path(found)
        urls = [cfg.get("url")]
        how = f"timm.create_model({target!r}, pretrained=True)"
    else:
        try:
            urls = [lib.models.get_model_weights(target).DEFAULT.url]
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"torchvision has no pretrained weights for {target}; use random weights or --weights FILE") from None
        how = f"torchvision.models.get_model({target!r}, weights='DEFAULT')"
    for url in urls:
        if url:
            candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path))
    for path in candidates:
        looked.append(str(path))
        if path.is_file():
            return path
    raise FileNotFoundError(f"{kind}:{target}: the library's pretrained weights are not in the local cache (looked in "
                            f"{'; '.join(looked) or 'nowhere: the library names no file'}); modlens never downloads: "
                            f"run {how} where there is network and copy the cache here (or set TORCH_HOME/HF_HOME), "
                            "or pass a weights file")


def build(kind: str, target: str, model_args: dict, facts: dict):
    """The model with the library's random initialization (the caller seeds it), or for ``hf`` the
    folder's weights through ``from_pretrained`` (local files and safetensors only)."""
    lib = _library(kind)
    try:
        if kind == "timm":
            return lib.create_model(target, pretrained=False, **model_args)
        if kind == "torchvision":
            return lib.models.get_model(target, weights=None, **model_args)
        cls = getattr(lib, facts["hf_class"])
        bars = lib.utils.logging.is_progress_bar_enabled()
        lib.utils.logging.disable_progress_bar()  # one line per model on the command line, not a bar per file
        try:
            return cls.from_pretrained(facts["hf_folder"], local_files_only=True, use_safetensors=True, **model_args)
        finally:
            if bars:
                lib.utils.logging.enable_progress_bar()
    except TypeError as exc:
        raise TypeError(f"{kind}:{target} with model_args {model_args}: {exc}") from None
