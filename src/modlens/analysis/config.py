"""One frozen, validated configuration of an analysis.

:class:`AnalysisConfig` holds every option of :func:`modlens.analyze` that changes its
numbers. It is checked when it is built (in milliseconds, before any graph, clustering or
lesion), written into the manifest (:meth:`AnalysisConfig.to_dict`), and its
:meth:`AnalysisConfig.key` (a SHA-256 of the canonical JSON) is what study caches are keyed by.

Each option has one name everywhere: the field name here is the keyword of ``analyze``, the key
of a study spec's ``[analysis]`` table and, with dashes, the option of ``modlens analyze``. The
command line and the spec are generated from :func:`options` (each field's help text and
choices); every choice list belongs to the function that uses the option and is read from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from modlens.analysis.statistics import COMBINE_RULES, EFFECT_RULES, TIE_RULES
from modlens.analysis.storage import canonical
from modlens.core import clustering, graph
from modlens.core.seeds import root_from_record, root_seed, seed_record
from modlens.experiments.feature_vis import OBJECTIVES, PARAMETERIZATIONS, TRANSFORMS, feature_vis_test
from modlens.experiments.lesion_test import ACCURACY_MODES, CLASS_RANGE_MODES
from modlens.experiments.partitioning import ACT_TOKENS, METHODS, VOCAB_NODES
from modlens.nn import ACT_REDUCTIONS, BN_FOLDS, ENGINES

#: What a model's output is scored against (``task``): class labels (the paper), or the next token.
TASKS = ("classification", "next-token")

#: Fields that change no number (left out of :meth:`AnalysisConfig.key` and of every stage's key):
#: both lesion engines give the same counts (the plain one is the oracle of the other).
NOT_IN_KEY = ("engine",)


def _opt(default, help: str, *, choices=None, kind=None, hash=True, **kw):
    """A config field with the help text and choices the command line and specs are made from.
    ``kind`` is the value type where the default does not say it (``None`` defaults)."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "kind": kind}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: default, metadata=meta, hash=hash, **kw)
    return field(default=default, metadata=meta, hash=hash, **kw)


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of :func:`modlens.analyze`; the defaults are the paper's.

    ``random_state`` accepts an int, a ``numpy.random.SeedSequence``, a
    ``numpy.random.Generator`` (a root is drawn from it once) or ``None`` (fresh entropy);
    it is stored as its root (:func:`modlens.core.seeds.root_seed`) and recorded in
    :meth:`to_dict`, so a run made with ``None`` can be repeated with
    ``AnalysisConfig.from_dict(manifest["config"]["options"])``. Each field's help text is
    :func:`options`' (and ``modlens analyze --help``'s).
    """

    task: str = _opt("classification", "what the output is scored against: class labels (the paper), or "
                                       "'next-token' for a language model (the prediction at position t against "
                                       "token t + 1; docs/language-models.md)", choices=TASKS)
    partitionings: tuple[str, ...] = _opt(METHODS, "which partitionings to test", choices=METHODS)
    n_clusters: int = _opt(16, "clusters per partitioning (k)")
    n_random: int = _opt(19, "random subclusters per true subcluster")
    random_state: Any = _opt(0, "seed of clustering and random draws (an int; in Python also a SeedSequence, "
                                "a Generator or None)", kind=int)
    accuracy: str = _opt("accuracy", "'balanced': the original code's mean per-class accuracy (notes row 9)",
                         choices=ACCURACY_MODES)
    class_range: str = _opt("range", "'normalized': the original code's range / |mean change| (notes row 10)",
                            choices=CLASS_RANGE_MODES)
    ties: str = _opt("mid", "tie rule of percentiles; 'original' counts ties in favour of modularity (notes row 11)",
                     choices=TIE_RULES)
    effect_rule: str = _opt("paper", "'paper': 2x/(x+mu) with negative x, mu taken as 0; 'original': a lesion "
                                     "effect is 0 unless true and random drops are both positive (notes row 14)",
                            choices=EFFECT_RULES)
    max_fraction: float | None = _opt(None, "largest subcluster tested, as a fraction of its layer (default: any "
                                            "but the whole layer; the original code: 0.99, notes row 7)", kind=float)
    engine: str = _opt("incremental", "lesion evaluation path; 'plain' is the slow one-lesion-per-pass reference "
                                      "(both give the same numbers)", choices=tuple(ENGINES))
    alpha: float = _opt(0.05, "false discovery rate of Benjamini-Hochberg (lesion and visualization metrics "
                              "corrected separately)")
    feature_vis: bool = _opt(False, "also run the feature-visualization test (vis score, softmax entropy; paper "
                                    "section 4.2)")
    vis_options: dict | None = _opt(None, "options of the feature visualization (see vis_options())", kind=dict,
                                    hash=False)
    eigen_solver: str = _opt("auto", "spectral clustering eigensolver; auto: ARPACK (the paper's) up to 5,000 nodes, "
                                     "LOBPCG above, Lanczos for sparse kNN graphs above 8,192 nodes",
                             choices=clustering.EIGEN_SOLVERS)
    n_init: int | str = _opt("auto", "k-means initializations; auto: 25, or 100 above 2,000 nodes (the original code)",
                             kind=int)
    clusterability: bool = _opt(False, "graphical clusterability test of the weight partitionings (n-cut vs "
                                       "shuffled weights)")
    n_null: int = _opt(50, "shuffled networks per clusterability test")
    combine: str = _opt("fisher", "per-network combination: 'fisher' (paper: chi2 null, Bates over replicates) or "
                                  "'exact' (exact permutation null of the same statistics)", choices=COMBINE_RULES)
    conv_edge: str = _opt("l1", "conv weight-graph edge: L1 norm of the kernel slice, or the original code's matrix "
                                "1-norm (notes row 1)", choices=graph.CONV_EDGE_NORMS)
    act_reduce: str = _opt("l1", "conv channel activation summary: L1 norm of the map, or the original's matrix "
                                 "1-norm (notes row 2)", choices=ACT_REDUCTIONS)
    bn_fold: str = _opt("paper", "batch-norm scale on the edges out of the normalized channel (paper), into it "
                                 "(original), or none (notes row 3)", choices=BN_FOLDS)
    act_tokens: str = _opt("auto", "transformer activation graph: one row per (sequence, position) ('positions') "
                                   "or per sequence, the L1 norm over tokens ('aggregate'); auto: positions for "
                                   "the next-token task, aggregate otherwise", choices=ACT_TOKENS)
    max_positions: int = _opt(4096, "per-position activation graph: at most this many (sequence, position) rows, "
                                    "drawn from the activation data with random_state")
    vocab_nodes: str = _opt("auto", "transformer weight graph: the embedding and unembedding as one node per token "
                                    "('tokens'), left out ('none'), or one node per group of token_groups "
                                    "('groups'); auto: tokens up to 4,096, none above, groups when token_groups "
                                    "is given", choices=VOCAB_NODES)
    input_name: str | None = _opt(None, "pass the inputs as this keyword argument (e.g. pixel_values)", kind=str)
    output: Any = _opt(None, "which output holds the logits: a key, an index (in Python also a function)", kind=str,
                       hash=False)

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
        set_("max_positions", _check_int("max_positions", self.max_positions, 2))
        for f in dataclasses.fields(self):
            if f.metadata.get("choices") and f.name not in ("partitionings", "eigen_solver"):
                _choice(f.name, getattr(self, f.name), f.metadata["choices"])
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
        d = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_KEY}
        return hashlib.sha256(canonical(d).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Option:
    """One option of the analysis, as the command line and study specs present it."""

    name: str
    default: Any
    kind: type | None
    choices: tuple | None
    help: str
    many: bool = False  # a list of values (partitionings)


def options() -> list[Option]:
    """The fields of :class:`AnalysisConfig` with their value type, choices and help text."""
    out = []
    for f in dataclasses.fields(AnalysisConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f.metadata.get("kind") or (type(default) if default is not None else str)
        many = isinstance(default, tuple)
        if many:
            kind = str
        out.append(Option(f.name, default, kind, f.metadata.get("choices"), f.metadata.get("help", ""), many))
    return out


# -- the visualization options ------------------------------------------------------------------

#: Arguments of ``feature_vis_test`` that are not options (the analysis supplies them).
_VIS_SUPPLIED = {"adapter", "partition", "input_shape", "n_random", "random_state", "name", "progress"}
_VIS_CHOICES = {"parameterization": PARAMETERIZATIONS, "transforms": TRANSFORMS, "objective": OBJECTIVES}
_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool}


def vis_options() -> list[Option]:
    """The keys of ``vis_options``: the keyword arguments of
    :func:`~modlens.experiments.feature_vis.feature_vis_test` (value types from its signature)
    and ``original`` (the original code's preset, rows 7, 15, 16). ``kind`` is None for values
    that only Python can give (a tuple, a function)."""
    out = [Option("original", False, bool, None, "the original code's visualization: Fourier/decorrelated/"
                                                  "sigmoid, 65 steps, |spatial mean| (notes rows 15-16)")]
    for name, p in inspect.signature(feature_vis_test).parameters.items():
        if name in _VIS_SUPPLIED:
            continue
        first = str(p.annotation).split("|")[0].strip()
        out.append(Option(name, p.default, _TYPE_NAMES.get(first), _VIS_CHOICES.get(name), f"feature_vis_test's {name}"))
    return out


def _check_vis_options(opts: Mapping | None) -> dict | None:
    if opts is None:
        return None
    if not isinstance(opts, Mapping):
        raise TypeError(f"AnalysisConfig: vis_options must be a dict, got {type(opts).__name__}")
    known = {o.name: o for o in vis_options()}
    bad = sorted(set(opts) - set(known))
    if bad:
        raise ValueError(f"AnalysisConfig: unknown vis_options {bad}; known: {', '.join(sorted(known))}")
    for key, value in opts.items():
        o = known[key]
        if o.choices and value not in o.choices and not (value is None and o.default is None):
            raise ValueError(f"AnalysisConfig: vis_options[{key!r}] must be one of {o.choices}, got {value!r}")
    if "steps" in opts and (isinstance(opts["steps"], bool) or not isinstance(opts["steps"], (int, np.integer)) or opts["steps"] < 0):
        raise ValueError(f"AnalysisConfig: vis_options['steps'] must be an int >= 0, got {opts['steps']!r}")
    if "lr" in opts and not (isinstance(opts["lr"], (int, float)) and opts["lr"] > 0):
        raise ValueError(f"AnalysisConfig: vis_options['lr'] must be > 0, got {opts['lr']!r}")
    if "value_range" in opts and opts["value_range"] is not None:
        lo, hi = (float(v) for v in opts["value_range"])
        if not lo < hi:
            raise ValueError(f"AnalysisConfig: vis_options['value_range'] must be (low, high) with low < high, got {opts['value_range']}")
    for key in ("min_size", "batch_size"):
        if opts.get(key) is not None and (isinstance(opts[key], bool) or not isinstance(opts[key], (int, np.integer))
                                          or opts[key] < 1):
            raise ValueError(f"AnalysisConfig: vis_options[{key!r}] must be a positive int, got {opts[key]!r}")
    if "max_fraction" in opts:
        _check_fraction("vis_options['max_fraction']", opts["max_fraction"])
    for key in ("original", "batched"):
        if key in opts and not isinstance(opts[key], bool):
            raise TypeError(f"AnalysisConfig: vis_options[{key!r}] must be True or False, got {opts[key]!r}")
    return dict(opts)


def _check_fraction(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"AnalysisConfig: {name} must be None or in (0, 1], got {value!r}")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"AnalysisConfig: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"AnalysisConfig: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


__all__ = ["AnalysisConfig", "NOT_IN_KEY", "Option", "options", "vis_options", "TASKS"]
