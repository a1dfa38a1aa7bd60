"""The stages of :func:`~modlens.analysis.analyze.analyze`: ``analyze`` is composed of these functions,
and a study runs and caches each one as a task of its own, so that a study's per-network result is
by construction what ``analyze`` gives with the same :class:`~modlens.analysis.config.AnalysisConfig`.

* :func:`test_data` / :func:`make_engine`: the test data as the task reads it (``task``: (inputs,
  labels), or next-token data) and its lesion engine (``engine``);
* :func:`network_adapter`: the model captured at the test inputs (``input_name``, ``output``);
* :func:`make_partitioner` / :func:`partition_one`: spectral partitionings (``n_clusters``,
  ``eigen_solver``, ``n_init``, ``conv_edge``, ``act_reduce``, ``bn_fold``, ``random_state``);
* :func:`lesion_one`: the lesion table of one partition (``n_random``, ``accuracy``,
  ``class_range``, ``max_fraction``, ``engine``);
* :func:`vis_problem` / :func:`vis_one`: the feature-visualization test of one partition
  (``n_random``, ``max_fraction``, ``vis_options``), skipped for discrete inputs; for the
  next-token task the top-activating-positions test in its place;
* :func:`clusterability_one` / :func:`clusterability_table`: the graphical clusterability test of a
  weight partitioning (the partitioning's fields and ``n_null``);
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
import torch

from modlens._version import __version__
from modlens.analysis.config import NOT_IN_KEY, AnalysisConfig
from modlens.analysis.diagnostics import add_diagnostics, clusterability_rows
from modlens.analysis.result import AnalysisResult
from modlens.analysis.statistics import TASK_METRICS, correct_by_family, subcluster_tests, summarize
from modlens.core.partition import Partition
from modlens.core.seeds import STREAM_POSITIONS, STREAM_RANDOM_SETS, as_generator, method_seed, seed_record
from modlens.experiments.feature_vis import (ORIGINAL, VisResult, continuous_input_problem, default_transforms,
                                             feature_vis_test)
from modlens.experiments.lesion_test import lesion_test
from modlens.experiments.partitioning import Partitioner, check_method, make_adapter
from modlens.experiments.token_lesion import token_lesion_test
from modlens.experiments.top_positions import MAX_POSITIONS, TOP_FRACTION, MIN_TOP, top_position_test
from modlens.nn import as_tensors, check_labels, lesion_engine
from modlens.nn.token_lesion import token_lesion_engine
from modlens.nn.tokens import TokenData, as_token_data

_CAPTURE = ("input_name", "output")
_PARTITION = ("n_clusters", "eigen_solver", "n_init", "conv_edge", "act_reduce", "bn_fold", "random_state", "task",
              "act_tokens", "max_positions", "vocab_nodes", *_CAPTURE)
#: The fields of :class:`AnalysisConfig` that each stage reads (a study hashes them into its task keys).
#: Lesion and visualization tasks also depend on their partition, through its digest.
STAGE_FIELDS = {
    "partition": _PARTITION,
    "lesion": ("task", "n_random", "accuracy", "class_range", "max_fraction", "random_state", *_CAPTURE),
    "vis": ("task", "feature_vis", "n_random", "max_fraction", "vis_options", "random_state", *_CAPTURE),
    "clusterability": (*_PARTITION, "n_null"),
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


def test_data(data, cfg: AnalysisConfig, *, token_classes=None, position_classes=None, name: str = "test data"):
    """The test data as ``cfg.task`` reads it: ``(inputs, labels)`` tensors for classification,
    :class:`~modlens.nn.tokens.TokenData` for the next-token task (``token_classes`` and
    ``position_classes`` classify its positions for coherence)."""
    if cfg.task == "next-token":
        return as_token_data(data, token_classes=token_classes, position_classes=position_classes, name=name)
    if token_classes is not None or position_classes is not None:
        raise ValueError("token_classes and position_classes classify the positions of next-token data; pass "
                         "task='next-token' (the classification task takes (inputs, labels))")
    return as_tensors(data, name=name)


def inputs_of(data):
    """The model inputs of prepared test data (the ids of next-token data or of a text dataset)."""
    if isinstance(data, TokenData):
        return data.ids
    if hasattr(data, "ids") and hasattr(data, "targets"):
        return torch.as_tensor(np.asarray(data.ids))
    return data[0] if isinstance(data, tuple) else data


def activation_inputs(data, cfg: AnalysisConfig):
    """Activation data as the partitioner reads it (next-token data keeps its mask)."""
    if data is None or cfg.task != "next-token":
        return data
    return as_token_data(data, name="activation data")


def network_adapter(model, x, cfg: AnalysisConfig, *, name: str = "test data"):
    """``model``'s adapter, captured at the test inputs ``x`` (or next-token data) as ``analyze`` captures it."""
    return make_adapter(model, inputs_of(x), input_name=cfg.input_name, output=cfg.output, name=name)


def make_engine(adapter, data, cfg: AnalysisConfig, *, engine: str | None = None):
    """The lesion engine (``engine``, default ``cfg.engine``) of the task on prepared test data."""
    name = engine or cfg.engine
    if cfg.task == "next-token":
        return token_lesion_engine(name, adapter, data)
    x, y = data
    check_labels(y, adapter.n_classes, name="test data")
    return lesion_engine(name, adapter, x, y)


def test_facts(engine, data, cfg: AnalysisConfig) -> dict:
    """What the manifest records about the test data and the intact model on it."""
    if cfg.task != "next-token":
        n = int(len(data[1]))
        return {"n_test": n, "test_accuracy": float(engine.baseline.sum() / n),
                "baseline_counts": [int(v) for v in engine.baseline], "class_sizes": [int(v) for v in engine.class_sizes]}
    n = int(engine.class_sizes.sum())
    return {"n_test": int(len(data)), "n_test_positions": n, "context": int(data.ids.shape[1]),
            "test_accuracy": float(engine.baseline.sum() / n), "test_cross_entropy": float(engine.baseline_ce.sum() / n),
            "token_classes": list(data.class_names), "position_labels": list(data.label_names),
            "baseline_counts": [int(v) for v in engine.baseline], "class_sizes": [int(v) for v in engine.class_sizes]}


def make_partitioner(adapter, cfg: AnalysisConfig, *, activation_data=None, token_groups=None) -> Partitioner:
    """The :class:`Partitioner` of ``analyze`` (graphs built once, every method clusters them)."""
    return Partitioner(adapter, activation_data=activation_inputs(activation_data, cfg), n_clusters=cfg.n_clusters,
                       random_state=cfg.random_state, conv_edge=cfg.conv_edge, act_reduce=cfg.act_reduce,
                       bn_fold=cfg.bn_fold, eigen_solver=cfg.eigen_solver, n_init=cfg.n_init, task=cfg.task,
                       act_tokens=cfg.act_tokens, max_positions=cfg.max_positions, vocab_nodes=cfg.vocab_nodes,
                       token_groups=token_groups)


def partition_one(adapter, method: str, cfg: AnalysisConfig, *, activation_data=None, token_groups=None) -> Partition:
    """One spectral partitioning of ``adapter``'s hidden neurons (as ``analyze`` makes it)."""
    check_method(method)
    return make_partitioner(adapter, cfg, activation_data=activation_data, token_groups=token_groups).partition(method)


def lesion_one(engine, part: Partition, cfg: AnalysisConfig, *, name: str,
               progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The lesion table of one partition on ``engine`` (:func:`make_engine`), its random sets drawn
    from stream 1 of its method seed."""
    test = token_lesion_test if cfg.task == "next-token" else lesion_test
    table = test(engine, part, n_random=cfg.n_random,
                 random_state=as_generator(method_seed(cfg.random_state, name, STREAM_RANDOM_SETS)),
                 accuracy=cfg.accuracy, class_range=cfg.class_range, max_fraction=cfg.max_fraction,
                 name=name, progress=progress)
    table.insert(0, "network", "0")
    return table


def vis_problem(adapter, x, cfg: AnalysisConfig) -> str | None:
    """Why the test inputs cannot be visualized (discrete inputs such as token ids), as one
    line, or None. The next-token task has its own coherence test for token inputs
    (:func:`vis_one`), so nothing is skipped there."""
    if cfg.task == "next-token":
        return None
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
    if cfg.task == "next-token":
        return len(part.subclusters(max_fraction=cfg.max_fraction)) * (cfg.n_random + 1)
    opts = vis_options(x, cfg)
    return len(part.subclusters(min_size=opts.get("min_size", 2), max_fraction=opts["max_fraction"])) * (cfg.n_random + 1)


def vis_one(adapter, part: Partition, x, cfg: AnalysisConfig, *, name: str,
            progress: Callable[[int], None] | None = None):
    """The feature-visualization test of one partition (a ``VisResult``), same random sets as its lesions;
    for the next-token task (``x``: next-token data) the top-activating-positions test, as a
    ``VisResult`` without images."""
    if cfg.task == "next-token":
        table = top_position_test(adapter, part, x, n_random=cfg.n_random, name=name, max_fraction=cfg.max_fraction,
                                  random_state=as_generator(method_seed(cfg.random_state, name, STREAM_RANDOM_SETS)),
                                  positions_seed=method_seed(cfg.random_state, "test-positions", STREAM_POSITIONS),
                                  progress=progress)
        table.insert(0, "network", "0")
        config = {"test": "top_positions", "top_fraction": TOP_FRACTION, "min_top": MIN_TOP,
                  "max_positions": MAX_POSITIONS, "partitioning": name}
        return VisResult(table, np.zeros((0,), dtype=np.float32), config)
    res = feature_vis_test(adapter, part, tuple(x.shape[1:]), n_random=cfg.n_random, name=name,
                           random_state=as_generator(method_seed(cfg.random_state, name, STREAM_RANDOM_SETS)),
                           progress=progress, **vis_options(x, cfg))
    res.table.insert(0, "network", "0")
    return res


def clusterability_one(partitioner: Partitioner, method: str, cfg: AnalysisConfig) -> dict:
    """The clusterability test of the weight partitioning ``method`` (n-cut against ``cfg.n_null``
    networks with shuffled weights), seeded from the partitioner's root as ``analyze`` seeds it."""
    from modlens.experiments.clusterability import clusterability_test

    return clusterability_test(partitioner, method, n_null=cfg.n_null)


def clusterability_table(rows: Sequence[dict]) -> pd.DataFrame:
    """The result's ``clusterability`` table from :func:`clusterability_one`'s rows."""
    table = pd.DataFrame(list(rows))
    table.insert(0, "network", "0")
    return table


def assemble(partitions: dict[str, Partition], lesion_tables: Sequence[pd.DataFrame], vis_results: Sequence = (),
             cfg: AnalysisConfig | None = None, *, vis_skipped: str | None = None, clusterability=None,
             facts: dict | None = None) -> AnalysisResult:
    """The per-network :class:`AnalysisResult` from its partitions, lesion tables, visualization
    results (``cfg.feature_vis``) and clusterability table: what ``analyze`` returns. ``facts`` are
    added to the result's config (the test set's facts, timings)."""
    cfg = cfg if cfg is not None else AnalysisConfig()
    table = pd.concat(list(lesion_tables), ignore_index=True)
    task_metrics = TASK_METRICS[cfg.task]
    # a class or label range needs two classes with enough positions; a metric without values has no row
    lesion_metrics = [m for m in task_metrics["lesion"] if m in table.columns and np.isfinite(
        table[m].to_numpy(dtype=float)).any()] if len(table) else list(task_metrics["lesion"])
    tests = subcluster_tests(table, metrics=lesion_metrics, ties=cfg.ties, effect_rule=cfg.effect_rule)
    vis_results = list(vis_results)
    visualized = cfg.feature_vis and not vis_skipped
    vis_metrics = list(task_metrics["visualization"])
    vis_table = None
    if visualized:
        vis_table = pd.concat([r.table for r in vis_results], ignore_index=True)
        if len(vis_table):
            tests = pd.concat([tests, subcluster_tests(vis_table, metrics=vis_metrics, ties=cfg.ties,
                                                       effect_rule=cfg.effect_rule)], ignore_index=True)
    metrics = lesion_metrics + (vis_metrics if visualized else [])
    summary = summarize(tests, partitionings=list(partitions), metrics=metrics, alpha=cfg.alpha, combine=cfg.combine,
                        random_state=cfg.random_state)
    if clusterability is not None:
        summary = with_clusterability(summary, clusterability, list(partitions), cfg.alpha)
    add_partition_facts(summary, partitions, max_fraction=cfg.max_fraction)
    add_diagnostics(summary, table, vis_table, tests)
    config = {
        "modlens_version": __version__, "options": cfg.to_dict(), "config_key": cfg.key(),
        "n_clusters": cfg.n_clusters, "n_random": cfg.n_random, "random_state": seed_record(cfg.random_state),
        **{k: getattr(cfg, k) for k in ("task", "accuracy", "class_range", "ties", "effect_rule", "max_fraction", "engine",
                                        "alpha", "combine", "conv_edge", "act_reduce", "bn_fold")},
        "partitionings": list(partitions), **(facts or {}),
    }
    if visualized and vis_results:
        config["feature_vis"] = vis_results[0].config | {"partitioning": None}
    if vis_skipped:
        config["feature_vis"] = {"skipped": vis_skipped}
    images = visualized and cfg.task != "next-token"   # the top-positions test has a table, no images
    return AnalysisResult(summary, table, tests, partitions, config, vis_table, vis_results if images else [],
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


def add_partition_facts(summary: pd.DataFrame, partitions: dict[str, Partition], *, max_fraction=None) -> None:
    """n-cut and the number of neurons left unclustered (no edges) of each partitioning; for global
    weight partitions the share of squared weight inside clusters (``weight_share``) beside its
    ``1/k`` baseline (``weight_share_uniform``) and its size-matched one (``weight_share_expected``);
    where no subcluster qualifies, why and what to try (``no_subclusters``, else "")."""
    summary["ncut"] = [partitions[p].ncut for p in summary["partitioning"]]
    summary["no_subclusters"] = [partitions[p].no_subclusters_reason(max_fraction=max_fraction) or ""
                                 for p in summary["partitioning"]]
    summary["n_unclustered"] = [int(sum((l < 0).sum() for l in partitions[p].labels)) for p in summary["partitioning"]]
    for column, key in (("weight_share", "share"), ("weight_share_uniform", "uniform"),
                        ("weight_share_expected", "expected")):
        summary[column] = [float((partitions[p].info or {}).get("weight_share", {}).get(key, np.nan))
                           for p in summary["partitioning"]]


__all__ = ["STAGE_FIELDS", "config_subset", "stage_config", "test_data", "inputs_of", "activation_inputs", "make_engine",
           "test_facts", "network_adapter", "make_partitioner", "partition_one", "lesion_one", "vis_problem",
           "vis_options", "n_vis_images", "vis_one", "clusterability_one", "clusterability_table", "assemble",
           "with_clusterability",
           "add_partition_facts"]
