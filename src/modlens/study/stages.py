"""The stages of :func:`~modlens.study.analyze.analyze` as separate steps, so that a study can run
and cache each one on its own: partition one method, lesion-test one partition, visualize one
partition, and assemble the per-network result from the pieces.

Each stage draws from the same seed streams as ``analyze`` (``method_seed(random_state, method)``
for clustering, stream 1 of it for the random sets), so composing them gives the tables that
``analyze(model, ..., random_state=random_state)`` gives; ``tests/test_study_stages.py`` checks it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from modlens._version import __version__
from modlens.core.partition import Partition
from modlens.core.rng import as_generator
from modlens.experiments.lesion_test import lesion_test
from modlens.experiments.partitioning import Partitioner, check_method, method_seed
from modlens.study.analyze import AnalysisResult, _add_partition_facts, default_vis_transforms
from modlens.study.summary import LESION_METRICS, VIS_METRICS, subcluster_tests, summarize


def partition_one(adapter, method: str, *, activation_data, n_clusters: int, random_state: int) -> Partition:
    """One spectral partitioning of ``adapter``'s hidden neurons (as ``analyze`` makes it)."""
    check_method(method)
    return Partitioner(adapter, activation_data=activation_data, n_clusters=n_clusters,
                       random_state=random_state).partition(method)


def lesion_one(adapter, part: Partition, x, y, *, name: str, n_random: int, random_state: int,
               accuracy: str = "accuracy", class_range: str = "range", max_fraction: float | None = None,
               engine: str = "incremental", evaluator=None, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The lesion table of one partition, its random sets drawn from stream 1 of its method seed."""
    table = lesion_test(adapter, part, x, y, n_random=n_random,
                        random_state=as_generator(method_seed(random_state, name, stream=1)),
                        accuracy=accuracy, class_range=class_range, max_fraction=max_fraction,
                        engine=engine, evaluator=evaluator, name=name, progress=progress)
    table.insert(0, "network", "0")
    return table


def vis_options(x, *, max_fraction: float | None, options: dict | None) -> dict:
    """The arguments of ``feature_vis_test`` that ``analyze`` passes for ``options`` and test inputs ``x``."""
    from modlens.experiments.feature_vis import ORIGINAL

    opts = dict(options or {})
    if opts.pop("original", False):
        opts = {**ORIGINAL, **opts}
    opts.setdefault("value_range", (float(x.min()), float(x.max())))
    opts.setdefault("transforms", default_vis_transforms(tuple(x.shape[1:])))
    opts.setdefault("max_fraction", max_fraction)
    return opts


def vis_one(adapter, part: Partition, x, *, name: str, n_random: int, random_state: int,
            max_fraction: float | None = None, options: dict | None = None,
            progress: Callable[[int], None] | None = None):
    """The feature-visualization test of one partition (a ``VisResult``), same random sets as its lesions."""
    from modlens.experiments.feature_vis import feature_vis_test

    opts = vis_options(x, max_fraction=max_fraction, options=options)
    res = feature_vis_test(adapter, part, tuple(x.shape[1:]), n_random=n_random, name=name,
                           random_state=as_generator(method_seed(random_state, name, stream=1)),
                           progress=progress, **opts)
    res.table.insert(0, "network", "0")
    return res


def assemble(partitions: dict[str, Partition], lesion_tables: Sequence[pd.DataFrame], vis_results: Sequence = (), *,
             ties: str = "mid", effect_rule: str = "paper", alpha: float = 0.05, config: dict | None = None) -> AnalysisResult:
    """The per-network :class:`AnalysisResult` from its partitions, lesion tables and (optionally)
    visualization results, summarized as ``analyze`` summarizes them."""
    table = pd.concat(list(lesion_tables), ignore_index=True)
    tests = subcluster_tests(table, ties=ties, effect_rule=effect_rule)
    vis_results = list(vis_results)
    vis_table = None
    if vis_results:
        vis_table = pd.concat([r.table for r in vis_results], ignore_index=True)
        if len(vis_table):
            tests = pd.concat([tests, subcluster_tests(vis_table, metrics=VIS_METRICS, ties=ties, effect_rule=effect_rule)],
                              ignore_index=True)
    metrics = list(LESION_METRICS) + (list(VIS_METRICS) if vis_results else [])
    summary = summarize(tests, partitionings=list(partitions), metrics=metrics, alpha=alpha)
    _add_partition_facts(summary, partitions)
    config = dict(config or {}, modlens_version=__version__, partitionings=list(partitions))
    if vis_results:
        config["feature_vis"] = vis_results[0].config | {"partitioning": None}
    return AnalysisResult(summary, table, tests, partitions, config, vis_table, vis_results)


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


__all__ = ["partition_one", "lesion_one", "vis_options", "vis_one", "assemble", "partition_to_dict",
           "partition_from_dict", "partition_digest"]
