"""The stages of :func:`~modlens.study.analyze.analyze`: ``analyze`` is composed of these functions,
and a study runs and caches each one as a task of its own, so that a study's per-network result is
by construction what ``analyze`` gives with the same :class:`~modlens.study.config.AnalysisConfig`.

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

import hashlib
import json
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from modlens._version import __version__
from modlens.core.partition import Partition
from modlens.core.seeds import STREAM_RANDOM_SETS, as_generator, method_seed, seed_record
from modlens.experiments.lesion_test import lesion_test
from modlens.experiments.partitioning import Partitioner, check_method, make_adapter
from modlens.study.analyze import (AnalysisResult, _add_partition_facts, _vis_input_problem, _with_clusterability,
                                   default_vis_transforms)
from modlens.study.config import AnalysisConfig
from modlens.study.diagnostics import add_diagnostics
from modlens.study.summary import LESION_METRICS, VIS_METRICS, subcluster_tests, summarize

_CAPTURE = ("input_name", "output")
_PARTITION = ("n_clusters", "eigen_solver", "n_init", "conv_edge", "act_reduce", "bn_fold", "random_state", *_CAPTURE)
#: The fields of :class:`AnalysisConfig` that each stage reads (a study hashes them into its task keys).
#: Lesion and visualization tasks also depend on their partition, through its digest.
STAGE_FIELDS = {
    "partition": _PARTITION,
    "lesion": ("n_random", "accuracy", "class_range", "max_fraction", "engine", "random_state", *_CAPTURE),
    "vis": ("feature_vis", "n_random", "max_fraction", "vis_options", "random_state", *_CAPTURE),
    "stats": None,  # all of them: the per-network result records the whole config (and its key)
}


def config_subset(cfg: AnalysisConfig, stage: str) -> dict:
    """The JSON record of the fields of ``cfg`` that ``stage`` reads (all of them for ``"stats"``)."""
    record = cfg.to_dict()
    names = STAGE_FIELDS[stage]
    return record if names is None else {k: record[k] for k in names}


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


def lesion_one(adapter, part: Partition, x, y, cfg: AnalysisConfig, *, name: str, evaluator=None,
               progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The lesion table of one partition, its random sets drawn from stream 1 of its method seed."""
    table = lesion_test(adapter, part, x, y, n_random=cfg.n_random,
                        random_state=as_generator(method_seed(cfg.random_state, name, STREAM_RANDOM_SETS)),
                        accuracy=cfg.accuracy, class_range=cfg.class_range, max_fraction=cfg.max_fraction,
                        engine=cfg.engine, evaluator=evaluator, name=name, progress=progress)
    table.insert(0, "network", "0")
    return table


def vis_problem(adapter, x, cfg: AnalysisConfig) -> str | None:
    """Why the test inputs cannot be visualized (discrete inputs, one line), or None."""
    return _vis_input_problem(adapter, x, cfg.vis_options)


def vis_options(x, cfg: AnalysisConfig) -> dict:
    """The arguments of ``feature_vis_test`` for ``cfg`` and test inputs ``x``."""
    from modlens.experiments.feature_vis import ORIGINAL

    opts = dict(cfg.vis_options or {})
    if opts.pop("original", False):
        opts = {**ORIGINAL, **opts}
    opts.setdefault("value_range", (float(x.min()), float(x.max())))
    opts.setdefault("transforms", default_vis_transforms(tuple(x.shape[1:])))
    opts.setdefault("max_fraction", cfg.max_fraction)
    return opts


def n_vis_images(part: Partition, x, cfg: AnalysisConfig) -> int:
    opts = vis_options(x, cfg)
    return len(part.subclusters(min_size=opts.get("min_size", 2), max_fraction=opts["max_fraction"])) * (cfg.n_random + 1)


def vis_one(adapter, part: Partition, x, cfg: AnalysisConfig, *, name: str,
            progress: Callable[[int], None] | None = None):
    """The feature-visualization test of one partition (a ``VisResult``), same random sets as its lesions."""
    from modlens.experiments.feature_vis import feature_vis_test

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
        summary = _with_clusterability(summary, clusterability, list(partitions), cfg.alpha)
    _add_partition_facts(summary, partitions)
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


# -- serialization of partitions (the format of partitions.json in a saved result) -------------

def partition_to_dict(p: Partition) -> dict:
    return {"method": p.method, "n_clusters": p.n_clusters, "ncut": p.ncut, "layer_names": list(p.layer_names),
            "labels": [l.tolist() for l in p.labels], "info": p.info}


def partition_from_dict(d: dict) -> Partition:
    labels = [np.asarray(l, dtype=np.int64) for l in d["labels"]]
    return Partition.from_labels(labels, d["layer_names"], [len(l) for l in labels], method=d["method"],
                                 n_clusters=d["n_clusters"], ncut=d["ncut"], info=d.get("info") or {})


def partition_digest(p: Partition) -> str:
    """A hash of what the partition says (method, layers, labels), not of how long it took."""
    body = {"method": p.method, "n_clusters": p.n_clusters, "layer_names": list(p.layer_names),
            "labels": [l.tolist() for l in p.labels]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


__all__ = ["STAGE_FIELDS", "config_subset", "stage_config", "network_adapter", "make_partitioner", "partition_one",
           "lesion_one", "vis_problem", "vis_options", "n_vis_images", "vis_one", "assemble", "partition_to_dict",
           "partition_from_dict", "partition_digest"]
