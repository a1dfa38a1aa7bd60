"""The stages of :func:`~modlens.analysis.analyze.analyze`: ``analyze`` is composed of these functions,
and a study runs and caches each one as a task of its own, so that a study's per-network result is
by construction what ``analyze`` gives with the same :class:`~modlens.analysis.config.AnalysisConfig`.

* :func:`network_adapter`: the model captured at the test inputs (``input_name``, ``output``);
* :func:`make_partitioner` / :func:`partition_one`: spectral partitionings (``n_clusters``,
  ``eigen_solver``, ``n_init``, ``conv_edge``, ``act_reduce``, ``bn_fold``, ``random_state``);
* :func:`lesion_one`: the lesion table of one partition (``n_random``, ``accuracy``,
  ``class_range``, ``max_fraction``, ``engine``);
* :func:`vis_problem` / :func:`vis_one`: the feature-visualization test of one partition
  (``n_random``, ``max_fraction``, ``vis_options``), skipped for discrete inputs;
* :func:`assemble`: tests, summary (``ties``, ``effect_rule``, ``alpha``, ``combine``), diagnostics.

:data:`STAGE_FIELDS` names the fields of the config each stage reads; a study keys its tasks by
them. Seeds: ``method_seed(random_state, method)`` for clustering, stream
:data:`~modlens.core.seeds.STREAM_RANDOM_SETS` of it for the random sets (lesions and
visualizations share them), whatever order the stages run in.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from modlens._version import __version__
from modlens.analysis.config import NOT_IN_KEY, AnalysisConfig
from modlens.analysis.diagnostics import add_diagnostics, clusterability_rows
from modlens.analysis.result import AnalysisResult
from modlens.analysis.statistics import LESION_METRICS, VIS_METRICS, correct_by_family, subcluster_tests, summarize
from modlens.core.partition import Partition
from modlens.core.seeds import STREAM_RANDOM_SETS, as_generator, method_seed, seed_record
from modlens.experiments.feature_vis import ORIGINAL, continuous_input_problem, default_transforms, feature_vis_test
from modlens.experiments.lesion_test import lesion_test
from modlens.experiments.partitioning import Partitioner, check_method, make_adapter

_CAPTURE = ("input_name", "output")
_PARTITION = ("n_clusters", "eigen_solver", "n_init", "conv_edge", "act_reduce", "bn_fold", "random_state", *_CAPTURE)
#: The fields of :class:`AnalysisConfig` that each stage reads (a study hashes them into its task keys).
#: Lesion and visualization tasks also depend on their partition, through its digest.
STAGE_FIELDS = {
    "partition": _PARTITION,
    "lesion": ("n_random", "accuracy", "class_range", "max_fraction", "random_state", *_CAPTURE),
    "vis": ("feature_vis", "n_random", "max_fraction", "vis_options", "random_state", *_CAPTURE),
    "stats": None,  # all of them: the per-network result records the whole config (and its key)
}


def config_subset(cfg: AnalysisConfig, stage: str) -> dict:
    """The JSON record of the fields of ``cfg`` that ``stage`` reads (for ``"stats"`` every field
    that changes a number, :data:`~modlens.analysis.config.NOT_IN_KEY` left out)."""
    record = cfg.to_dict()
    names = STAGE_FIELDS[stage]
    if names is None:
        return {k: v for k, v in record.items() if k not in NOT_IN_KEY}
    return {k: record[k] for k in names}


def stage_config(record: dict) -> AnalysisConfig:
    """The config a task runs with, from its (possibly partial) record: the fields the stage does not
    read keep their defaults."""
    return AnalysisConfig.from_dict(record)


def network_adapter(model, x, cfg: AnalysisConfig, *, name: str = "test data"):
    """``model``'s adapter, captured at the test inputs ``x`` as ``analyze`` captures it."""
    return make_adapter(model, x, input_name=cfg.input_name, output=cfg.output, name=name)


def make_partitioner(adapter, cfg: AnalysisConfig, *, activation_data=None) -> Partitioner:
    """The :class:`Partitioner` of ``analyze`` (graphs built once, every method clusters them)."""
    return Partitioner(adapter, activation_data=activation_data, n_clusters=cfg.n_clusters, random_state=cfg.random_state,
                       conv_edge=cfg.conv_edge, act_reduce=cfg.act_reduce, bn_fold=cfg.bn_fold,
                       eigen_solver=cfg.eigen_solver, n_init=cfg.n_init)


def partition_one(adapter, method: str, cfg: AnalysisConfig, *, activation_data=None) -> Partition:
    """One spectral partitioning of ``adapter``'s hidden neurons (as ``analyze`` makes it)."""
    check_method(method)
    return make_partitioner(adapter, cfg, activation_data=activation_data).partition(method)


def lesion_one(engine, part: Partition, cfg: AnalysisConfig, *, name: str,
               progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The lesion table of one partition on ``engine`` (:func:`modlens.nn.lesion_engine`), its
    random sets drawn from stream 1 of its method seed."""
    table = lesion_test(engine, part, n_random=cfg.n_random,
                        random_state=as_generator(method_seed(cfg.random_state, name, STREAM_RANDOM_SETS)),
                        accuracy=cfg.accuracy, class_range=cfg.class_range, max_fraction=cfg.max_fraction,
                        name=name, progress=progress)
    table.insert(0, "network", "0")
    return table


def vis_problem(adapter, x, cfg: AnalysisConfig) -> str | None:
    """Why the test inputs cannot be visualized (discrete inputs such as token ids), as one
    line, or None."""
    problem = continuous_input_problem(adapter, x, (cfg.vis_options or {}).get("preprocess"))
    return None if problem is None else (f"{problem}; skipping vis_score and softmax_entropy "
                                         "(the lesion tests ran as usual)")


def vis_options(x, cfg: AnalysisConfig) -> dict:
    """The arguments of ``feature_vis_test`` for ``cfg`` and test inputs ``x``: the value range
    defaults to the inputs' range, the transforms to the paper's for the input's shape
    (:func:`~modlens.experiments.feature_vis.default_transforms`, appendix A.5)."""
    opts = dict(cfg.vis_options or {})
    if opts.pop("original", False):
        opts = {**ORIGINAL, **opts}
    opts.setdefault("value_range", (float(x.min()), float(x.max())))
    opts.setdefault("transforms", default_transforms(tuple(x.shape[1:])))
    opts.setdefault("max_fraction", cfg.max_fraction)
    return opts


def n_vis_images(part: Partition, x, cfg: AnalysisConfig) -> int:
    opts = vis_options(x, cfg)
    return len(part.subclusters(min_size=opts.get("min_size", 2), max_fraction=opts["max_fraction"])) * (cfg.n_random + 1)


def vis_one(adapter, part: Partition, x, cfg: AnalysisConfig, *, name: str,
            progress: Callable[[int], None] | None = None):
    """The feature-visualization test of one partition (a ``VisResult``), same random sets as its lesions."""
    res = feature_vis_test(adapter, part, tuple(x.shape[1:]), n_random=cfg.n_random, name=name,
                           random_state=as_generator(method_seed(cfg.random_state, name, STREAM_RANDOM_SETS)),
                           progress=progress, **vis_options(x, cfg))
    res.table.insert(0, "network", "0")
    return res


def assemble(partitions: dict[str, Partition], lesion_tables: Sequence[pd.DataFrame], vis_results: Sequence = (),
             cfg: AnalysisConfig | None = None, *, vis_skipped: str | None = None, clusterability=None,
             facts: dict | None = None) -> AnalysisResult:
    """The per-network :class:`AnalysisResult` from its partitions, lesion tables, visualization
    results (``cfg.feature_vis``) and clusterability table: what ``analyze`` returns. ``facts`` are
    added to the result's config (the test set's facts, timings)."""
    cfg = cfg if cfg is not None else AnalysisConfig()
    table = pd.concat(list(lesion_tables), ignore_index=True)
    tests = subcluster_tests(table, ties=cfg.ties, effect_rule=cfg.effect_rule)
    vis_results = list(vis_results)
    visualized = cfg.feature_vis and not vis_skipped
    vis_table = None
    if visualized:
        vis_table = pd.concat([r.table for r in vis_results], ignore_index=True)
        if len(vis_table):
            tests = pd.concat([tests, subcluster_tests(vis_table, metrics=VIS_METRICS, ties=cfg.ties,
                                                       effect_rule=cfg.effect_rule)], ignore_index=True)
    metrics = list(LESION_METRICS) + (list(VIS_METRICS) if visualized else [])
    summary = summarize(tests, partitionings=list(partitions), metrics=metrics, alpha=cfg.alpha, combine=cfg.combine,
                        random_state=cfg.random_state)
    if clusterability is not None:
        summary = with_clusterability(summary, clusterability, list(partitions), cfg.alpha)
    add_partition_facts(summary, partitions)
    add_diagnostics(summary, table, vis_table, tests)
    config = {
        "modlens_version": __version__, "options": cfg.to_dict(), "config_key": cfg.key(),
        "n_clusters": cfg.n_clusters, "n_random": cfg.n_random, "random_state": seed_record(cfg.random_state),
        **{k: getattr(cfg, k) for k in ("accuracy", "class_range", "ties", "effect_rule", "max_fraction", "engine",
                                        "alpha", "combine", "conv_edge", "act_reduce", "bn_fold")},
        "partitionings": list(partitions), **(facts or {}),
    }
    if visualized and vis_results:
        config["feature_vis"] = vis_results[0].config | {"partitioning": None}
    if vis_skipped:
        config["feature_vis"] = {"skipped": vis_skipped}
    return AnalysisResult(summary, table, tests, partitions, config, vis_table, vis_results if visualized else [],
                          clusterability)


def with_clusterability(summary, cl_table, partitionings, alpha) -> pd.DataFrame:
    """Summary rows of the clusterability test, placed before each partitioning's other rows."""
    if cl_table is None or not len(cl_table):
        return summary
    rows = clusterability_rows(cl_table)
    out = pd.concat([rows, summary], ignore_index=True)
    order = {p: i for i, p in enumerate(partitionings)}
    out = out.iloc[np.lexsort((out["family"] != "clusterability", out["partitioning"].map(order).fillna(len(order))))]
    return correct_by_family(out.reset_index(drop=True), alpha=alpha)


def add_partition_facts(summary: pd.DataFrame, partitions: dict[str, Partition]) -> None:
    """n-cut and the number of neurons left unclustered (no edges) of each partitioning."""
    summary["ncut"] = [partitions[p].ncut for p in summary["partitioning"]]
    summary["n_unclustered"] = [int(sum((l < 0).sum() for l in partitions[p].labels)) for p in summary["partitioning"]]


__all__ = ["STAGE_FIELDS", "config_subset", "stage_config", "network_adapter", "make_partitioner", "partition_one",
           "lesion_one", "vis_problem", "vis_options", "n_vis_images", "vis_one", "assemble", "with_clusterability",
           "add_partition_facts"]
