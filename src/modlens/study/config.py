"""One frozen, validated configuration of an analysis.

:class:`AnalysisConfig` holds every option of :func:`modlens.analyze` that changes its
numbers. It is checked when it is built (in milliseconds, before any graph, clustering or
lesion), written into the manifest (:meth:`AnalysisConfig.to_dict`), and its
:meth:`AnalysisConfig.key` (a SHA-256 of the canonical JSON) is what study caches are keyed by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from modlens.core import clustering
from modlens.core.seeds import root_from_record, root_seed, seed_record
from modlens.experiments.partitioning import METHODS, check_graph_options
from modlens.study.summary import COMBINE_RULES

ACCURACY = ("accuracy", "balanced")
CLASS_RANGE = ("range", "normalized")
TIES = ("mid", "original")
EFFECT_RULES = ("paper", "original")
ENGINES = ("incremental", "plain")
# fields that do not change any number (kept out of key())
_NOT_IN_KEY = ("engine",)


def _vis_keys() -> set[str]:
    from modlens.experiments.feature_vis import feature_vis_test

    skip = {"adapter", "partition", "input_shape", "n_random", "random_state", "name", "progress"}
    return {p for p in inspect.signature(feature_vis_test).parameters if p not in skip} | {"original"}


def _check_vis_options(opts: Mapping | None) -> dict | None:
    if opts is None:
        return None
    if not isinstance(opts, Mapping):
        raise TypeError(f"AnalysisConfig: vis_options must be a dict, got {type(opts).__name__}")
    from modlens.experiments.feature_vis import OBJECTIVES, PARAMETERIZATIONS, TRANSFORMS

    known = _vis_keys()
    bad = sorted(set(opts) - known)
    if bad:
        raise ValueError(f"AnalysisConfig: unknown vis_options {bad}; known: {', '.join(sorted(known))}")
    for key, choices in (("parameterization", PARAMETERIZATIONS), ("transforms", TRANSFORMS), ("objective", OBJECTIVES)):
        if key in opts and opts[key] not in choices:
            raise ValueError(f"AnalysisConfig: vis_options[{key!r}] must be one of {choices}, got {opts[key]!r}")
    if "steps" in opts and (isinstance(opts["steps"], bool) or not isinstance(opts["steps"], (int, np.integer)) or opts["steps"] < 0):
        raise ValueError(f"AnalysisConfig: vis_options['steps'] must be an int >= 0, got {opts['steps']!r}")
    if "lr" in opts and not (isinstance(opts["lr"], (int, float)) and opts["lr"] > 0):
        raise ValueError(f"AnalysisConfig: vis_options['lr'] must be > 0, got {opts['lr']!r}")
    if "value_range" in opts and opts["value_range"] is not None:
        lo, hi = (float(v) for v in opts["value_range"])
        if not lo < hi:
            raise ValueError(f"AnalysisConfig: vis_options['value_range'] must be (low, high) with low < high, got {opts['value_range']}")
    if "min_size" in opts and (not isinstance(opts["min_size"], (int, np.integer)) or opts["min_size"] < 1):
        raise ValueError(f"AnalysisConfig: vis_options['min_size'] must be a positive int, got {opts['min_size']!r}")
    if "max_fraction" in opts:
        _check_fraction("vis_options['max_fraction']", opts["max_fraction"])
    if "original" in opts and not isinstance(opts["original"], bool):
        raise TypeError(f"AnalysisConfig: vis_options['original'] must be True or False, got {opts['original']!r}")
    return dict(opts)


def _check_fraction(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"AnalysisConfig: {name} must be None or in (0, 1], got {value!r}")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"AnalysisConfig: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"AnalysisConfig: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of :func:`modlens.analyze`; the defaults are the paper's.

    ``random_state`` accepts an int, a ``numpy.random.SeedSequence``, a
    ``numpy.random.Generator`` (a root is drawn from it once) or ``None`` (fresh entropy);
    it is stored as its root (:func:`modlens.core.seeds.root_seed`) and recorded in
    :meth:`to_dict`, so a run made with ``None`` can be repeated with
    ``AnalysisConfig.from_dict(manifest["config"]["options"])``.

    ``combine`` is the per-network combination (``"fisher"``, the paper's, or ``"exact"``);
    ``conv_edge``, ``act_reduce`` and ``bn_fold`` are rows 1-3 of the notes; ``input_name``
    and ``output`` say how the model takes its input and where its logits are.

    ``clusterability`` adds the graphical clusterability test (Filan et al., 2021) of each
    weight partitioning with ``n_null`` shuffled networks. ``eigen_solver``/``n_init`` go to
    spectral clustering (``"auto"``: see :func:`modlens.core.clustering.choose_eigen_solver`).
    """

    partitionings: tuple[str, ...] = METHODS
    n_clusters: int = 16
    n_random: int = 19
    random_state: Any = 0
    accuracy: str = "accuracy"
    class_range: str = "range"
    ties: str = "mid"
    effect_rule: str = "paper"
    max_fraction: float | None = None
    engine: str = "incremental"
    alpha: float = 0.05
    feature_vis: bool = False
    vis_options: dict | None = field(default=None, hash=False)
    eigen_solver: str = "auto"
    n_init: int | str = "auto"
    clusterability: bool = False
    n_null: int = 50
    combine: str = "fisher"
    conv_edge: str = "l1"
    act_reduce: str = "l1"
    bn_fold: str = "paper"
    input_name: str | None = None
    output: Any = field(default=None, hash=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen)
        parts = (self.partitionings,) if isinstance(self.partitionings, str) else self.partitionings
        parts = tuple(parts)
        bad = [p for p in parts if p not in METHODS]
        if bad or not parts:
            raise ValueError(f"AnalysisConfig: unknown partitionings {bad or list(parts)}; choose from {', '.join(METHODS)}")
        set_("partitionings", parts)
        set_("n_clusters", _check_int("n_clusters", self.n_clusters, 2))
        set_("n_random", _check_int("n_random", self.n_random, 1))
        set_("n_null", _check_int("n_null", self.n_null, 1))
        _choice("accuracy", self.accuracy, ACCURACY)
        _choice("class_range", self.class_range, CLASS_RANGE)
        _choice("ties", self.ties, TIES)
        _choice("effect_rule", self.effect_rule, EFFECT_RULES)
        _choice("engine", self.engine, ENGINES)
        _check_fraction("max_fraction", self.max_fraction)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1 or math.isnan(self.alpha):
            raise ValueError(f"AnalysisConfig: alpha must lie in (0, 1), got {self.alpha!r}")
        set_("alpha", float(self.alpha))
        for flag in ("feature_vis", "clusterability"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"AnalysisConfig: {flag} must be True or False, got {getattr(self, flag)!r}")
            set_(flag, bool(getattr(self, flag)))
        set_("vis_options", _check_vis_options(self.vis_options))
        try:
            set_("eigen_solver", clustering.check_eigen_solver(self.eigen_solver))
            set_("n_init", clustering.check_n_init(self.n_init))
        except ValueError as exc:
            raise ValueError(f"AnalysisConfig: {exc}") from None
        _choice("combine", self.combine, COMBINE_RULES)
        try:
            check_graph_options(conv_edge=self.conv_edge, bn_fold=self.bn_fold, act_reduce=self.act_reduce)
        except ValueError as exc:
            raise ValueError(f"AnalysisConfig: {exc}") from None
        if self.input_name is not None and not isinstance(self.input_name, str):
            raise TypeError(f"AnalysisConfig: input_name must be a str or None, got {self.input_name!r}")
        set_("random_state", root_seed(self.random_state))

    @classmethod
    def build(cls, config: "AnalysisConfig | None" = None, **kwargs) -> "AnalysisConfig":
        """``config`` with the keyword arguments replaced (or a new config from them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kwargs) - names)
        if bad:
            raise TypeError(f"AnalysisConfig: unknown options {bad}; known: {', '.join(sorted(names))}")
        if config is None:
            return cls(**kwargs)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an AnalysisConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **kwargs) if kwargs else config

    def to_dict(self) -> dict:
        """Canonical JSON-able form (the manifest's record; :meth:`from_dict` inverts it)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "random_state":
                v = seed_record(v)
            elif f.name == "partitionings":
                v = list(v)
            elif f.name == "vis_options" and v is not None:
                v = {k: (list(x) if isinstance(x, tuple) else x) for k, x in sorted(v.items())}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, record: Mapping) -> "AnalysisConfig":
        rec = dict(record)
        if "random_state" in rec:
            rec["random_state"] = root_from_record(rec["random_state"])
        return cls(**rec)

    def key(self) -> str:
        """Stable hash of the options that change results (SHA-256 of canonical JSON, 16 hex)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_KEY}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=_json_default)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if callable(obj):  # e.g. a preprocess function in vis_options: keyed by its name
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    raise TypeError(f"AnalysisConfig.key: not JSON-serializable: {type(obj).__name__}")
