"""Study specifications: what networks to train or load, and how to analyse them.

A spec is a TOML file (or one of the built-in studies, :mod:`modlens.study.builtin`)::

    name = "my-study"
    description = "MLPs on MNIST, two partitionings"

    [analysis]                      # every key optional; defaults are the paper's
    n_clusters = [16]               # k; several values: one analysis each
    n_random = 19                   # random sets per true subcluster
    partitionings = ["weights/global", "activations/global"]
    feature_vis = true              # vis_score + softmax_entropy beside the lesion metrics
    accuracy = "accuracy"           # and every other option of `modlens analyze`, by the same name:
                                    #   the fields of AnalysisConfig (modlens.analysis.config.options())
    random_state = 0                # enters every network's analysis seed
    figures = false                 # true: PNG grids of every network's visualizations (networks/<id>/figures/;
                                    #   slow: minutes per network at k = 16 on 2 cores)
    bh_scope = "table"              # Benjamini-Hochberg per table family (or "joint": Tables 4 and 5 together)
    [analysis.vis_options]          # options of the feature visualization (steps, lr, original, ...)
    steps = 100

    [[networks]]                    # a group of identically configured replicates, trained here
    group = "mlp-mnist"
    label = "MLP, MNIST"            # the paper's name of the network (tables)
    arch = "mlp"                    # mlp | cnn | vgg | gpt (the language model, dataset = "text")
    dataset = "mnist"
    replicates = 5                  # seeds 0..4 (or seeds = [...])
    epochs = 20                     # and batch_size, l2, augment, regularize, n_val, data_seed (gpt: steps)

    [[networks]]                    # or saved model folders (relative to the spec file)
    group = "mine"
    models = ["runs/a", "runs/b"]

    [[networks]]                    # or models by name, with their data (modlens.study.inputs)
    group = "resnets"
    models = ["timm:resnet18", "torchvision:resnet18", "mypkg.nets:make", "hf:./vit-folder"]
    weights = ["pretrained", "ckpt/tv.pth", "ckpt/mine.safetensors", ""]  # one per model ("": its own/random)
    model_args = { num_classes = 10 }           # keyword arguments of every model's constructor
    test_data = "data/val"          # an image folder, a .npz/.safetensors file, or a dataset name
    activation_data = "data/val"    # the same folder: split per class (per_class, activation_per_class)
    per_class = 10                  # and image_size, resize, mean, std, interpolation, channels, classes,
                                    #   sample_seed, init_seed: the options of `modlens analyze`

``{data_dir}`` in a path stands for the study's data folder (``--data-dir``). ImageNet networks
name their validation folder: ``imagenet = {folder = "{data_dir}/imagenet/val", per_class = 10}``
(the same as ``test_data`` and ``activation_data`` that folder, with ImageNet's preprocessing).
Several weights files for one model are replicates (``models = ["mypkg.nets:make"]``,
``weights = ["a.safetensors", "b.safetensors"]``).
Every key is checked when the spec is loaded (the analysis options by
:class:`~modlens.analysis.config.AnalysisConfig`); an unknown key, a wrong type or a wrong value is an
error that names it, before any task runs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from modlens.analysis.config import AnalysisConfig, Option, options, vis_options
from modlens.experiments.train import ARCHS
from modlens.report.paper import BH_SCOPES
from modlens.study.inputs import INPUT_OPTIONS, imagenet_data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Keys of [analysis] that are the study's own (not options of one network's analysis).
_STUDY_KEYS = {"figures": bool, "bh_scope": str}
#: Earlier names of analysis keys: a spec that uses one is told the current name.
_RENAMED = {"k": "n_clusters", "seed": "random_state", "metrics": "feature_vis", "vis": "vis_options"}
_RECIPE_KEYS = {"epochs": int, "batch_size": int, "l2": (float, int), "augment": bool, "regularize": bool,
                "n_val": int, "data_seed": int, "steps": int}
#: Keys of a group of models given by name (not trained here): their weights and data.
_SOURCE_KEYS = {"weights": (str, list), "model_args": dict,
                **{o.name: (list,) if o.n else (float, int) if o.kind is float else (o.kind,) for o in INPUT_OPTIONS}}
_NETWORK_KEYS = {"group": str, "label": str, "arch": str, "dataset": str, "replicates": int, "seeds": list,
                 "models": list, "imagenet": dict, **_RECIPE_KEYS, **_SOURCE_KEYS}
_IMAGENET_KEYS = {"folder": str, "per_class": int, "activation_per_class": int, "classes": str, "seed": int}


class SpecError(ValueError):
    """A study spec that cannot be run; the message names the spec, the key and the fix."""


@dataclass(frozen=True)
class Analysis:
    """The analysis of every network of a study: ``config`` (validated when the spec is loaded) for
    each k in ``n_clusters``, its ``random_state`` derived per network from the study's
    ``random_state`` and the network's weights (:meth:`network_config`). ``figures`` and
    ``bh_scope`` are the study's own. The config's other fields read as attributes
    (``analysis.n_random``)."""

    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    n_clusters: tuple[int, ...] = (16,)
    figures: bool = False
    bh_scope: str = "table"

    def __getattr__(self, name: str):
        if name.startswith("_") or "config" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["config"], name)

    def network_config(self, k: int, random_state: int) -> AnalysisConfig:
        """The config of one network's analysis at ``k`` clusters."""
        return dataclasses.replace(self.config, n_clusters=int(k), random_state=random_state)

    def record(self) -> dict:
        """JSON form (study.json's resolved analysis): the config's fields, with every k of the study
        in ``n_clusters``, and the study's own keys."""
        return {**self.config.to_dict(), "n_clusters": list(self.n_clusters), "figures": self.figures,
                "bh_scope": self.bh_scope}


@dataclass(frozen=True)
class NetworkGroup:
    """Identically configured replicates: trained from a recipe (``arch``/``dataset``/``seeds``)
    or loaded from saved ``models``."""

    group: str
    label: str
    arch: str | None = None
    dataset: str | None = None
    seeds: tuple[int, ...] = ()
    models: tuple[str, ...] = ()
    recipe: dict = field(default_factory=dict)
    imagenet: dict | None = None
    weights: tuple[str | None, ...] = ()  # one per model, or empty
    model_args: dict = field(default_factory=dict)
    init_seed: int = 0
    data: dict | None = None  # {"test_data", "activation_data", "options"} of models given with data

    @property
    def trained(self) -> bool:
        return not self.models


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    analysis: Analysis
    networks: tuple[NetworkGroup, ...]
    source: str = "<dict>"
    raw: dict = field(default_factory=dict, compare=False, repr=False)


def _check_keys(where: str, table: dict, allowed: dict) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}")
        want = allowed[key]
        kinds = want if isinstance(want, tuple) else (want,)
        if isinstance(value, bool) and bool not in kinds:
            raise SpecError(f"{where}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise SpecError(f"{where}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def _positive(where: str, key: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise SpecError(f"{where}: {key} must be at least {minimum}, got {value}")
    return value


def _toml_kinds(option: Option) -> tuple:
    """The TOML value types an option takes: its type (an int where a float is, a list of strings
    for several values, any string or int where the default is a string such as n_init's "auto")."""
    if option.many:
        return (list,)
    if option.kind is float:
        return (float, int)
    if option.kind is int and isinstance(option.default, str):
        return (int, str)
    return (option.kind,)


def _analysis(table: dict, where: str) -> Analysis:
    for old, new in _RENAMED.items():
        if old in table:
            raise SpecError(f"{where}: unknown key {old!r}; the option is called {new!r} (the same name as "
                            f"analyze's keyword and modlens analyze's --{new.replace('_', '-')})")
    fields = {o.name: o for o in options()}
    allowed = {**{name: _toml_kinds(o) for name, o in fields.items()}, "n_clusters": (int, list), **_STUDY_KEYS}
    _check_keys(where, table, allowed)
    a = dict(table)
    ks = a.pop("n_clusters", 16)
    ks = [ks] if isinstance(ks, int) else ks
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in ks):
        raise SpecError(f"{where}: n_clusters must be an integer >= 2 or a non-empty list of them, got {ks!r}")
    study = {"n_clusters": tuple(dict.fromkeys(ks))}
    for key in _STUDY_KEYS:
        if key in a:
            study[key] = a.pop(key)
    if study.get("bh_scope", "table") not in BH_SCOPES:
        raise SpecError(f"{where}: bh_scope must be one of {', '.join(BH_SCOPES)}, got {study['bh_scope']!r}")
    if "partitionings" in a:
        a["partitionings"] = tuple(dict.fromkeys(a["partitionings"]))
    if "vis_options" in a:
        vis = {o.name: (o.kind,) for o in vis_options() if o.kind is not None}
        _check_keys(f"{where}.vis_options", a["vis_options"], {k: (float, int) if t == (float,) else t
                                                               for k, t in vis.items()})
        a["vis_options"] = a["vis_options"] or None
    try:
        config = AnalysisConfig(n_clusters=study["n_clusters"][0], **a)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: {exc}") from None
    if not isinstance(config.random_state, int):
        raise SpecError(f"{where}: random_state must be an integer, got {table.get('random_state')!r}")
    return Analysis(config=config, **study)


def _network(table: dict, where: str, base: Path, data_dir: Path | None) -> NetworkGroup:
    _check_keys(where, table, _NETWORK_KEYS)
    if "group" not in table:
        raise SpecError(f"{where}: every [[networks]] entry needs a group name, e.g. group = \"mlp-mnist\"")
    group = table["group"]
    if not group or any(c in group for c in "/\\ ") or group.startswith("."):
        raise SpecError(f"{where}: group {group!r} must be a non-empty name without '/', '\\' or spaces")
    label = table.get("label", group)
    recipe = {k: table[k] for k in _RECIPE_KEYS if k in table}
    imagenet = table.get("imagenet")
    if imagenet is not None:
        _check_keys(f"{where}.imagenet", imagenet, _IMAGENET_KEYS)
        if "folder" not in imagenet:
            raise SpecError(f"{where}.imagenet: name the validation folder, e.g. folder = \"{{data_dir}}/imagenet/val\"")
        imagenet = dict(imagenet, folder=str(_path(imagenet["folder"], base, data_dir)))
    if "models" in table:
        clash = [k for k in ("arch", "dataset", "replicates", "seeds", *recipe) if k in table]
        if clash:
            raise SpecError(f"{where}: a group of saved models takes no training keys ({', '.join(clash)}); "
                            "drop them or drop 'models'")
        if not table["models"] or not all(isinstance(m, str) for m in table["models"]):
            raise SpecError(f"{where}: models must be a non-empty list of model folders or names")
        return _named_group(table, where, group, label, imagenet, base, data_dir)
    given = sorted(k for k in _SOURCE_KEYS if k in table)
    if given:
        raise SpecError(f"{where}: {', '.join(given)} go with models = [...] (models given by name or folder); a "
                        "trained group reads its dataset")
    if imagenet is not None:
        raise SpecError(f"{where}: imagenet data goes with saved models (models = [...]); modlens does not train ImageNet networks")
    for key in ("arch", "dataset"):
        if key not in table:
            raise SpecError(f"{where}: a trained group needs {key} (or give saved model folders as models = [...])")
    if table["arch"] not in ARCHS:
        raise SpecError(f"{where}: arch must be one of {', '.join(ARCHS)}, got {table['arch']!r}")
    from modlens.data import DATASETS, TEXT_DATASETS

    if table["dataset"] not in (*DATASETS, *TEXT_DATASETS):
        raise SpecError(f"{where}: unknown dataset {table['dataset']!r}; valid: {', '.join((*DATASETS, *TEXT_DATASETS))}")
    if (table["arch"] == "gpt") != (table["dataset"] in TEXT_DATASETS):
        raise SpecError(f"{where}: arch gpt (the reference language model) trains on dataset text, and text trains "
                        f"arch gpt; got arch {table['arch']!r} with dataset {table['dataset']!r}")
    wrong = [k for k in (("epochs", "l2", "augment", "n_val") if table["arch"] == "gpt" else ("steps",)) if k in table]
    if wrong:
        raise SpecError(f"{where}: {', '.join(wrong)} do(es) not apply to arch {table['arch']!r} (the language model "
                        "trains for a number of steps; the image networks for epochs)")
    if "seeds" in table and "replicates" in table:
        raise SpecError(f"{where}: give seeds or replicates, not both")
    if "seeds" in table:
        seeds = table["seeds"]
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise SpecError(f"{where}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise SpecError(f"{where}: seeds repeat: {seeds!r}")
    else:
        seeds = list(range(_positive(where, "replicates", table.get("replicates", 5))))
    if recipe.get("regularize") is False and table["arch"] != "vgg":
        raise SpecError(f"{where}: regularize = false applies to the VGG only (the MLP and CNN have no dropout or L2)")
    return NetworkGroup(group, label, arch=table["arch"], dataset=table["dataset"], seeds=tuple(seeds), recipe=recipe)


def _named_group(table: dict, where: str, group: str, label: str, imagenet, base: Path, data_dir) -> NetworkGroup:
    models = [_model_name(m, base, data_dir) for m in table["models"]]
    weights = table.get("weights", [])
    weights = [weights] if isinstance(weights, str) else weights
    if not all(isinstance(w, str) for w in weights):
        raise SpecError(f"{where}: weights must be a file name, 'pretrained', or a list of them (\"\" for none)")
    if weights and len(models) == 1 and len(weights) > 1:
        models = models * len(weights)
    if weights and len(weights) != len(models):
        raise SpecError(f"{where}: {len(weights)} weights for {len(models)} models; give one entry per model (\"\" for "
                        "none), or one model with several weights files (replicates)")
    weights = [None if w in ("", None) else w if w == "pretrained" else str(_path(w, base, data_dir)) for w in weights]
    options = {o.name: table[o.name] for o in INPUT_OPTIONS if o.name in table and o.name not in
               ("init_seed", "test_data", "activation_data")}
    for key in ("mean", "std"):
        if key in options and not (len(options[key]) in (1, 3) and all(isinstance(v, (int, float)) and
                                                                         not isinstance(v, bool) for v in options[key])):
            raise SpecError(f"{where}: {key} must list 1 or 3 numbers, got {options[key]!r}")
    data = None
    if imagenet is not None:
        if "test_data" in table or "activation_data" in table:
            raise SpecError(f"{where}: give imagenet = {{...}} or test_data/activation_data, not both")
        data = imagenet_data(imagenet)
        data["options"].update(options)
    elif "test_data" in table:
        data = {"test_data": _data_name(table["test_data"], base, data_dir),
                "activation_data": _data_name(table["activation_data"], base, data_dir) if "activation_data" in table
                else None, "options": options}
    elif options or "activation_data" in table:
        raise SpecError(f"{where}: {', '.join(sorted(options) or ['activation_data'])} without test_data; name the "
                        "test data too")
    init_seed = table.get("init_seed", 0)
    if init_seed < 0:
        raise SpecError(f"{where}: init_seed must be a non-negative integer, got {init_seed}")
    return NetworkGroup(group, label, models=tuple(models), imagenet=imagenet, weights=tuple(weights),
                        model_args=dict(table.get("model_args", {})), init_seed=init_seed, data=data)


def _model_name(text: str, base: Path, data_dir) -> str:
    """A model name with its paths made absolute (relative to the spec file): folders, ``FILE.py:factory``
    and ``hf:FOLDER``; library names and importable factories stay as they are."""
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("timm", "torchvision"):
        return text
    if sep and prefix == "hf":
        folder = _path(rest, base, data_dir)
        return f"hf:{folder}" if folder.is_dir() or rest.startswith((".", "/", "~", "{")) else text
    factory = re.match(r"^(.+\.py|[A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$", text)
    if factory:
        return f"{_path(factory.group(1), base, data_dir)}:{factory.group(2)}" if factory.group(1).endswith(".py") else text
    return str(_path(text, base, data_dir))


def _data_name(text: str, base: Path, data_dir) -> str:
    """A data path made absolute, or a dataset name left as it is."""
    p = _path(text, base, data_dir)
    return str(p) if p.exists() or "/" in text or "{data_dir}" in text or Path(text).suffix else text


def _path(text: str, base: Path, data_dir: Path | None) -> Path:
    if "{data_dir}" in text:
        from modlens.data import data_root

        text = text.replace("{data_dir}", str(data_root(data_dir)))
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else base / p


def spec_from_dict(raw: dict, *, source: str = "<dict>", base: str | os.PathLike = ".",
                   data_dir=None, replicates: int | None = None, groups=None) -> StudySpec:
    """Check ``raw`` (a parsed TOML document) and build the spec. ``replicates`` overrides the number
    of replicates of every trained group (seeds 0..n-1); ``groups`` keeps only the named groups."""
    raw = copy.deepcopy(raw)
    keep = None if groups is None else list(groups)
    _check_keys(source, raw, {"name": str, "description": str, "analysis": dict, "networks": list})
    if not raw.get("networks"):
        raise SpecError(f"{source}: no networks; add at least one [[networks]] table")
    analysis = _analysis(raw.get("analysis", {}), f"{source} [analysis]")
    base = Path(base)
    dd = Path(data_dir) if data_dir is not None else None
    groups = []
    for i, table in enumerate(raw["networks"]):
        if not isinstance(table, dict):
            raise SpecError(f"{source}: networks[{i}] must be a table ([[networks]])")
        g = _network(table, f"{source} networks[{i}]", base, dd)
        if replicates is not None and g.trained:
            g = dataclasses.replace(g, seeds=tuple(range(_positive(source, "--replicates", replicates))))
        groups.append(g)
    names = [g.group for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{source}: group names repeat: {', '.join(dup)}; every [[networks]] needs its own group")
    if keep is not None:
        unknown = [n for n in keep if n not in names]
        if unknown or not keep:
            raise SpecError(f"{source}: no group {', '.join(unknown) or '(none given)'}; its groups are {', '.join(names)}")
        groups = [g for g in groups if g.group in keep]
    return StudySpec(raw.get("name", Path(source).stem), raw.get("description", ""), analysis, tuple(groups), source, raw)


def load_spec(name_or_path: str | os.PathLike, *, data_dir=None, replicates: int | None = None, groups=None) -> StudySpec:
    """A built-in study by name, or a TOML spec file."""
    from modlens.study.builtin import BUILTIN

    text = str(name_or_path)
    if text in BUILTIN:
        raw = tomllib.loads(BUILTIN[text].toml)
        return spec_from_dict(raw, source=f"built-in study {text!r}", base=".", data_dir=data_dir, replicates=replicates, groups=groups)
    path = Path(text)
    if not path.is_file():
        raise SpecError(f"no built-in study and no spec file called {text!r}; built-in studies: {', '.join(BUILTIN)} "
                        "(`modlens study list`)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    return spec_from_dict(raw, source=str(path), base=path.parent, data_dir=data_dir, replicates=replicates, groups=groups)


__all__ = ["SpecError", "Analysis", "NetworkGroup", "StudySpec", "spec_from_dict", "load_spec", "ARCHS"]
