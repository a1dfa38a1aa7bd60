"""Models by name: a modlens model folder, ``pkg.module:factory``, ``timm:NAME``,
``torchvision:NAME`` or ``hf:REPO_OR_FOLDER``, with weights from a file, the library's cache or a
seeded random initialization.

* :func:`resolve_model` checks a name and its weights without building anything (the module or
  library imports, the name exists, the weights file or the cached pretrained file is there) and
  returns a :class:`ModelSource` whose :meth:`~ModelSource.record` says where the model comes from
  (name, weights file and its SHA-256, init seed, library versions, the model's preprocessing and
  input name where its library says) and carries a ``digest`` that changes exactly when the
  weights do: study task keys are made from it.
* :meth:`ModelSource.build` / :func:`load_model` build the model in eval mode.
* :func:`read_state_dict` reads a weights file: safetensors, or a PyTorch state dict through
  ``torch.load(weights_only=True)``. Nothing is ever unpickled beyond tensors: a checkpoint that
  holds a whole pickled model is refused in one line that says how to convert it.

Nothing is downloaded: ``weights="pretrained"`` reads the library's weights only when they are
already in its local cache, and the error names the places that were looked in. Random weights
are drawn inside ``torch.random.fork_rng`` seeded with ``init_seed``, so they are repeatable and
the caller's global generator is left alone.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from modlens.nn import _zoo
from modlens.nn import io as _io

__all__ = ["KINDS", "PRETRAINED", "ModelSource", "parse_model_name", "resolve_model", "load_model",
           "source_from_record", "read_state_dict", "fit_weights"]

#: Where a model comes from: a modlens folder, a factory, or a library's model by name.
KINDS = ("folder", "factory", "timm", "torchvision", "hf")
#: ``weights=PRETRAINED``: the library's own pretrained weights, from its local cache only.
PRETRAINED = "pretrained"
_PREFIXES = ("timm", "torchvision", "hf")
_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*|.+\.py):(?P<attr>[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*)$")
_SHOWN = 3  # names listed in one line before "and N more"


def _listing(names) -> str:
    names = list(names)
    shown = ", ".join(map(str, names[:_SHOWN]))
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def parse_model_name(text: str | os.PathLike) -> tuple[str, str]:
    """``(kind, target)`` of a model name: ``timm:resnet18`` -> ``("timm", "resnet18")``;
    ``pkg.module:make`` or ``models.py:make`` -> ``("factory", ...)``; anything else is a modlens
    model folder (an existing folder always is, whatever its name)."""
    text = os.fspath(text)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in _PREFIXES:
        if not rest:
            raise ValueError(f"model name {text!r} names no model after '{prefix}:'; e.g. {prefix}:resnet18")
        return prefix, rest
    if Path(text).is_dir():
        return "folder", text
    if _FACTORY.match(text):
        return "factory", text
    return "folder", text


def _check_args(model_args) -> dict:
    args = dict(model_args or {})
    bad = [k for k in args if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ValueError(f"model_args keys must be keyword names, got {bad}")
    try:
        json.dumps(args, sort_keys=True)
    except (TypeError, ValueError):
        raise ValueError(f"model_args must be JSON values (numbers, strings, booleans, lists), got {args!r}") from None
    return args


@dataclass(frozen=True)
class ModelSource:
    """A model found by name, not yet built. ``weights`` is a file, :data:`PRETRAINED` or None
    (a folder's own weights, a Hugging Face folder's, or a random initialization)."""

    name: str
    kind: str
    target: str
    weights: str | None = None
    model_args: dict = field(default_factory=dict)
    init_seed: int = 0
    facts: dict = field(default_factory=dict, compare=False)  # found by resolve_model: files, digest, ...

    @property
    def digest(self) -> str:
        return self.facts["digest"]

    def record(self) -> dict:
        """Where the model comes from, JSON-able (the ``source`` of result manifests)."""
        weights = self.facts.get("weights")
        return {"name": self.name, "kind": self.kind, "target": self.target, "weights": weights,
                "model_args": dict(self.model_args), "init_seed": self.facts.get("init_seed"),
                "libraries": self.facts.get("libraries", {}), "input_name": self.facts.get("input_name"),
                "preprocessing": self.facts.get("preprocessing"), "n_classes": self.facts.get("n_classes"),
                "dataset": self.facts.get("dataset"), "module_root": self.facts.get("module_root"),
                "digest": self.digest}

    def build(self) -> nn.Module:
        """The model in eval mode, its weights loaded (or drawn from ``init_seed``)."""
        if self.kind == "folder":
            model, _ = _io.load_model(self.target)
            return model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.init_seed))
            if self.kind == "factory":
                model = _call_factory(self.target, self.model_args)
            else:
                model = _zoo.build(self.kind, self.target, self.model_args, self.facts)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name} returned an object of type {type(model).__name__}, not a torch.nn.Module; "
                            "the factory must return the network itself")
        weights = self.facts.get("weights")
        if isinstance(weights, dict) and weights.get("file") and not weights.get("built_in"):
            fit_weights(model, read_state_dict(weights["file"]), f"{self.name} with weights {weights['file']}")
        return model.eval()


def resolve_model(name: str | os.PathLike, weights: str | os.PathLike | None = None, *, model_args: dict | None = None,
                  init_seed: int = 0) -> ModelSource:
    """Check ``name`` and its ``weights`` without building the model; see the module docstring.
    Every failure is one line naming the model, what was looked for and the fix."""
    name = os.fspath(name)
    kind, target = parse_model_name(name)
    args = _check_args(model_args)
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0:
        raise ValueError(f"init_seed must be a non-negative int, got {init_seed!r}")
    weights = None if weights in (None, "") else os.fspath(weights)
    if kind == "folder":
        if weights is not None or args:
            raise ValueError(f"{name} is a modlens model folder: it holds its own weights and architecture; drop "
                             "--weights/model_args, or name the model as pkg.module:factory or timm:/torchvision:/hf:")
        return _folder_source(name)
    facts: dict[str, Any] = {"libraries": {"torch": torch.__version__}}
    if kind == "factory":
        facts["module_root"] = _module_root(_factory_object(target), target)  # imports it: a wrong name fails here
        if weights == PRETRAINED:
            raise ValueError(f"weights='pretrained' is for timm: and torchvision: models; give {name} a weights "
                             "file (safetensors or a state dict)")
    else:
        facts.update(_zoo.describe(kind, target, args))
        if weights == PRETRAINED:
            if kind == "hf":
                raise ValueError(f"{name} already holds its weights (from_pretrained); drop --weights pretrained")
            facts["weights"] = {"pretrained": True, "built_in": False, **_sha_of(_zoo.pretrained_file(kind, target))}
    if weights is not None and weights != PRETRAINED:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} for {name} does not exist; give a .safetensors file or a "
                                    "PyTorch state dict (torch.save(model.state_dict(), FILE))")
        facts["weights"] = _sha_of(path.resolve())
    if "weights" not in facts:  # drawn from the seed (or, for hf:, the folder's own files)
        facts["init_seed"] = int(init_seed)
    # an hf: model is its folder's files (config and weights), wherever the folder lies
    body = {"kind": kind, "target": facts.get("hf_sha256", target), "model_args": args,
            "weights": (facts.get("weights") or {}).get("sha256"), "init_seed": facts.get("init_seed")}
    if body["weights"] is None:  # random weights: the library's version draws them
        body["libraries"] = facts["libraries"]
    facts["digest"] = _digest(body)
    return ModelSource(name, kind, target, weights, args, int(init_seed), facts)


def load_model(name_or_folder: str | os.PathLike, weights: str | os.PathLike | None = None, *,
               model_args: dict | None = None, init_seed: int = 0) -> tuple[nn.Module, dict]:
    """``(model in eval mode, source record)`` for any model name (see the module docstring):
    ``load_model("timm:resnet18", "pretrained")``, ``load_model("mypkg.nets:make", "w.safetensors")``,
    ``load_model("hf:./vit-folder")``, ``load_model("runs/mlp-0")``."""
    source = resolve_model(name_or_folder, weights, model_args=model_args, init_seed=init_seed)
    return source.build(), source.record()


def source_from_record(record: dict) -> ModelSource:
    """The :class:`ModelSource` a :meth:`ModelSource.record` describes, resolved again (in a
    worker process, say); its digest says whether the files are still the same."""
    weights = record.get("weights") or {}
    given = PRETRAINED if weights.get("pretrained") else None if weights.get("built_in") or record["kind"] == "folder" \
        else weights.get("file")
    root = record.get("module_root")
    if record["kind"] == "factory" and root and root not in sys.path:
        sys.path.append(root)  # where the factory's module was found when the record was made
    name = record["target"] if record["kind"] == "folder" else record["name"]
    return resolve_model(name, given, model_args=record.get("model_args"), init_seed=record.get("init_seed") or 0)


def _sha_of(path: Path) -> dict:
    return {"file": str(path), "sha256": _io.sha256_file(path)}


def _folder_source(name: str) -> ModelSource:
    directory = _io.resolve_directory(name)
    manifest = _io.read_manifest(directory)
    facts = {"digest": manifest.get("sha256"), "weights": {"file": str((directory / _io.WEIGHTS_FILE).resolve()),
                                                           "sha256": manifest.get("sha256")},
             "dataset": manifest.get("dataset"), "libraries": {"modlens": manifest.get("modlens_version")},
             "manifest": manifest}
    return ModelSource(name, "folder", str(directory), None, {}, 0, facts)


# -- factories ----------------------------------------------------------------------------------------

def _factory_object(target: str):
    module_name, _, attr = target.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model factory {target}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"modlens_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ValueError(f"model factory {target}: cannot import {module_name!r} ({exc}); make it importable "
                             "(install it, or add its folder to PYTHONPATH) or give FILE.py:factory") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n)))
            close = difflib.get_close_matches(part, public, n=3)
            raise ValueError(f"model factory {target}: {module_name} has no {attr!r}; "
                             + (f"close names: {', '.join(close)}" if close else f"its callables: {_listing(public) or 'none'}"))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model factory {target}: {attr} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def _module_root(obj, target: str) -> str | None:
    """The folder on ``sys.path`` that the factory's top-level package was imported from."""
    module_name = target.rpartition(":")[0]
    if module_name.endswith(".py"):
        return None
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    folder = Path(path).resolve().parent
    for _ in range(module_name.count(".") + (Path(path).name == "__init__.py")):
        folder = folder.parent
    return str(folder)


def _call_factory(target: str, model_args: dict) -> nn.Module:
    factory = _factory_object(target)
    try:
        return factory(**model_args)
    except TypeError as exc:
        raise TypeError(f"model factory {target}({', '.join(f'{k}={v!r}' for k, v in model_args.items())}) failed: "
                        f"{exc}; pass the factory's keyword arguments as model_args (--model-arg KEY=VALUE)") from None


# -- weights files ------------------------------------------------------------------------------------

def _pickle_only(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is a pickled checkpoint holding {what}, not a state dict of tensors; modlens reads "
                      "weights with torch.load(weights_only=True) or safetensors and never unpickles objects. Where "
                      "you trust the file: torch.save(torch.load(FILE, weights_only=False).state_dict(), "
                      "'weights.pt'), or safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a PyTorch state dict (also one nested
    under ``"state_dict"``, ``"model"`` or ``"model_state_dict"``, as training checkpoints keep
    it) read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise _pickle_only(path, found.group(1) if found else "Python objects") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is neither safetensors nor a PyTorch state dict ({first})") from None
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [state[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(state.get(k), dict)]
        if nested:
            state = nested[0]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = type(state).__name__ if not isinstance(state, dict) else f"a dict with keys {_listing(sorted(map(str, state)))}"
        raise ValueError(f"{path} holds {what}, not a state dict of tensors; save model.state_dict()")
    return dict(state)


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is one ``ValueError`` naming the missing,
    unexpected and differently shaped tensors. A ``module.`` prefix (DataParallel) is dropped and a
    missing batch-norm ``num_batches_tracked`` counter is allowed."""
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} where the model has {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{len(missing)} missing ({_listing(missing)})" if missing else "",
                f"{len(unexpected)} unexpected ({_listing(unexpected)})" if unexpected else "",
                f"{len(shapes)} of another shape ({_listing(shapes)})" if shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model: tensors " + "; ".join(problems)
                         + "; check that the file belongs to this model and its model_args (e.g. num_classes)")
    model.load_state_dict(state, strict=True)
