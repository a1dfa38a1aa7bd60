"""``analyze``: partition a model four ways, lesion-test every partition, summarize."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from modlens.core.partition import Partition
from modlens.nn.adapter import MLPAdapter
from modlens.nn.inputs import as_tensors, check_labels
from modlens.nn.lesion import LesionEvaluator
from modlens.study.config import AnalysisConfig
from modlens.study.diagnostics import add_diagnostics, clusterability_rows
from modlens.study.summary import correct_by_family, summarize


@dataclass
class AnalysisResult:
    """What :func:`analyze` found.

    summary:     one row per (partitioning, metric): p value, effect ± SE, BH q value.
    subclusters: one row per (subcluster, draw): the tidy lesion table.
    tests:       one row per (true subcluster, metric): percentile and effect value.
    partitions:  the partitions that were tested, by name.
    config:      the arguments and facts needed to reproduce the tables.
    visualizations: with ``feature_vis=True``, one row per (subcluster, draw) with the
                 visualization score and softmax entropy; ``vis_results`` holds the images.
    """

    summary: pd.DataFrame
    subclusters: pd.DataFrame
    tests: pd.DataFrame
    partitions: dict[str, Partition]
    config: dict = field(default_factory=dict)
    visualizations: pd.DataFrame | None = None
    vis_results: list = field(default_factory=list, repr=False)
    clusterability: pd.DataFrame | None = None  # one row per (network, weight partitioning)

    def __repr__(self) -> str:
        from modlens.study.report import format_summary

        return format_summary(self.summary)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write Parquet and CSV tables, the partitions and a manifest into ``directory``.

        Files are written to a temporary folder that is renamed at the end, so a failure
        leaves no partial output.
        """
        return save_result(self, directory, overwrite=overwrite)


def _user_partition(partition, adapter: MLPAdapter) -> Partition:
    if isinstance(partition, Partition):
        return Partition.from_labels(partition.labels, adapter.layer_names, adapter.layer_sizes,
                                     method=partition.method, n_clusters=partition.n_clusters,
                                     ncut=partition.ncut, info=partition.info)
    return Partition.from_labels(partition, adapter.layer_names, adapter.layer_sizes, method="user")


def analyze(
    model,
    test_data,
    *,
    activation_data=None,
    partition=None,
    config: AnalysisConfig | None = None,
    progress: bool = False,
    **options,
) -> AnalysisResult:
    """Test whether the partitions of ``model``'s hidden neurons are important and coherent.

    The options (``partitionings``, ``n_clusters``, ``n_random``, ``random_state``,
    ``accuracy``, ``class_range``, ``ties``, ``effect_rule``, ``max_fraction``, ``engine``,
    ``alpha``, ``feature_vis``, ``vis_options``, ``eigen_solver``, ``n_init``,
    ``clusterability``, ``n_null``) are the fields of
    :class:`~modlens.study.config.AnalysisConfig`: pass ``config=`` or any of them as keywords
    (keywords replace the config's values). They are validated before any work starts.

    Parameters
    ----------
    model:
        Any MLP-like ``torch.nn.Module`` (Linear layers joined by elementwise activations).
    test_data:
        ``(inputs, labels)`` tensors/arrays or a DataLoader: the lesion test set.
    activation_data:
        Held-out data (not the test set) for the activation graphs.
    partition:
        A :class:`Partition` or a list of label arrays (one per hidden layer) to test instead
        of spectral clustering, so that any partition can be tested against random controls.
    partitionings:
        Which of the four spectral partitionings to run (ignored when ``partition`` is given).
    accuracy, class_range, ties, effect_rule:
        ``"balanced"``, ``"normalized"``, ``"original"``, ``"original"`` reproduce the original
        code's choices (rows 9, 10, 11 and 14 of the notes); the defaults are the paper's.
    combine:
        ``"fisher"`` (the paper's): Fisher's method against chi2 per network, Bates over
        replicates. ``"exact"`` (modlens extension): the same statistics referred to their exact
        conditional permutation null (:mod:`modlens.core.permutation`), which holds its level
        where the paper's test is conservative (coarse or tied percentiles).
    engine:
        ``"incremental"`` (batched, reuses unchanged layers) or ``"plain"`` (one full forward
        pass per lesion; the reference path).
    feature_vis:
        Also run the feature-visualization test (paper, section 4.2): visualization score and
        softmax entropy of an input optimized for each subcluster and random set. Inputs may be
        images (C, H, W), sequences (T, D) or vectors (D,); discrete inputs (token ids) cannot
        be optimized: a UserWarning says so in one line, the reason is kept in
        ``config["feature_vis"]["skipped"]`` and only the lesion metrics are reported.
    vis_options:
        Arguments for :func:`~modlens.experiments.feature_vis.feature_vis_test` (``steps``,
        ``lr``, ``transforms``, ``parameterization``, ``objective``, ``value_range``,
        ``preprocess``...); ``{"original": True}`` applies the original code's preset (rows
        7, 15, 16). The value range defaults to the test inputs' range; the transforms to jitter
        and scaling, or padding/jitter/rotation/scaling for inputs of 128 pixels a side or more;
        for vectors additive noise, for sequences noise and a circular shift along T.
    input_name, output:
        Pass the inputs as this keyword argument (``"pixel_values"`` for Hugging Face models) and
        pick the logits out of the forward's output (default ``.logits`` or the single tensor).
        The model is captured once, with ``torch.export`` at the test data's shape.
    conv_edge, act_reduce, bn_fold:
        How conv channels and batch norms enter the graphs: ``"l1"``, ``"l1"``, ``"paper"``
        (the paper); ``"matrix_1_norm"``, ``"matrix_1_norm"``, ``"original"`` reproduce the
        original code (rows 1-3 of the notes).
    random_state:
        int, ``numpy.random.SeedSequence``, ``numpy.random.Generator`` or ``None`` (fresh
        entropy, recorded in ``config["options"]["random_state"]`` so the run can be repeated).
    eigen_solver, n_init:
        spectral clustering (``"auto"``: ARPACK up to 5,000 nodes, LOBPCG above; 25 k-means
        initializations, 100 above 2,000 nodes).
    clusterability, n_null:
        Graphical clusterability test (Filan et al., 2021) of each weight partitioning against
        ``n_null`` networks with the weights shuffled within each layer (one summary row each).
    """
    from modlens.study import stages

    started = time.perf_counter()
    cfg = AnalysisConfig.build(config, **options)  # every option checked before any work
    x, y = as_tensors(test_data, name="test data")
    adapter = stages.network_adapter(model, x, cfg)
    adapter.check_input(x, "test data")
    check_labels(y, adapter.n_classes, name="test data")
    if activation_data is not None and activation_data is test_data:
        raise ValueError("activation_data is the test set; pass a held-out split so lesions are tested on unseen data")
    partitioner = None
    if partition is not None:
        partitions = {"user": _user_partition(partition, adapter)}
    else:
        partitioner = stages.make_partitioner(adapter, cfg, activation_data=activation_data)
        partitions = {}
        for method in cfg.partitionings:
            t0 = time.perf_counter()
            partitions[method] = partitioner.partition(method)
            _say(progress, f"partitioned {method}: {len(partitions[method].subclusters(max_fraction=cfg.max_fraction))} "
                           f"subclusters, n-cut {partitions[method].ncut:.3f} ({time.perf_counter() - t0:.1f} s)")
    evaluator = LesionEvaluator(adapter, x, y) if cfg.engine == "incremental" else None
    tables = []
    for name, part in partitions.items():
        n_lesions = len(part.subclusters(max_fraction=cfg.max_fraction)) * (cfg.n_random + 1)
        with _bar(progress, n_lesions, f"lesions {name}") as bar:
            tables.append(stages.lesion_one(adapter, part, x, y, cfg, name=name, evaluator=evaluator,
                                            progress=bar.update))
    vis_results, vis_skipped = [], None
    if cfg.feature_vis:
        vis_skipped = stages.vis_problem(adapter, x, cfg)
        if vis_skipped:  # token ids: say so in one line, keep the lesion results
            warnings.warn(vis_skipped, UserWarning, stacklevel=2)
        else:
            for name, part in partitions.items():
                with _bar(progress, stages.n_vis_images(part, x, cfg), f"visualizations {name}") as bar:
                    vis_results.append(stages.vis_one(adapter, part, x, cfg, name=name, progress=bar.update))
    cl_table = None
    if cfg.clusterability and partitioner is not None:
        cl_table = _clusterability(partitioner, [p for p in partitions if p.startswith("weights/")], cfg.n_null, progress)
    base = evaluator.baseline if evaluator is not None else None
    facts = {
        "capture": adapter.capture_method,
        "n_test": int(len(y)),
        "test_accuracy": float(base.sum() / len(y)) if base is not None else None,
        "baseline_counts": [int(v) for v in base] if base is not None else None,
        "class_sizes": [int(v) for v in evaluator.class_sizes] if evaluator is not None else None,
        "layers": dict(zip(adapter.layer_names, adapter.layer_sizes)),
    }
    result = stages.assemble(partitions, tables, vis_results, cfg, vis_skipped=vis_skipped, clusterability=cl_table,
                             facts=facts)
    result.config["seconds"] = time.perf_counter() - started
    return result


def _clusterability(partitioner, methods, n_null, progress) -> pd.DataFrame:
    from modlens.experiments.clusterability import clusterability_test

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        res = clusterability_test(partitioner, method, n_null=n_null)
        _say(progress, f"clusterability {method}: n-cut {res['ncut']:.3f} vs shuffled {res['null_mean']:.3f} "
                       f"± {res['null_sd']:.3f}, p {res['p_value']:.3g} ({time.perf_counter() - t0:.1f} s)")
        rows.append(res)
    table = pd.DataFrame(rows)
    table.insert(0, "network", "0")
    return table


def _with_clusterability(summary, cl_table, partitionings, alpha) -> pd.DataFrame:
    """Summary rows of the clusterability test, placed before each partitioning's other rows."""
    if cl_table is None or not len(cl_table):
        return summary
    rows = clusterability_rows(cl_table)
    out = pd.concat([rows, summary], ignore_index=True)
    order = {p: i for i, p in enumerate(partitionings)}
    out = out.iloc[np.lexsort((out["family"] != "clusterability", out["partitioning"].map(order).fillna(len(order))))]
    return correct_by_family(out.reset_index(drop=True), alpha=alpha)


def default_vis_transforms(input_shape: tuple[int, ...]) -> str:
    """Paper, appendix A.5: random jitter and scaling for small images; padding, jitter,
    rotation and scaling (``"lucid"``) for ImageNet-sized ones (128 pixels a side or more);
    additive noise for vectors (D,), noise and a shift along T for sequences (T, D)."""
    from modlens.experiments.feature_vis import default_transforms

    return default_transforms(input_shape)


def _vis_input_problem(adapter, x, options) -> str | None:
    """Why the inputs cannot be visualized (discrete inputs), as one line, or None."""
    from modlens.experiments.feature_vis import continuous_input_problem

    problem = continuous_input_problem(adapter, x, (options or {}).get("preprocess"))
    return None if problem is None else (f"{problem}; skipping vis_score and softmax_entropy "
                                         "(the lesion tests ran as usual)")


def _add_partition_facts(summary: pd.DataFrame, partitions: dict[str, Partition]) -> None:
    """n-cut and the number of neurons left unclustered (no edges) of each partitioning."""
    summary["ncut"] = [partitions[p].ncut for p in summary["partitioning"]]
    summary["n_unclustered"] = [int(sum((l < 0).sum() for l in partitions[p].labels)) for p in summary["partitioning"]]


def combine(results: Sequence[AnalysisResult], names: Sequence[str] | None = None, *, alpha: float = 0.05,
            combine: str | None = None) -> AnalysisResult:
    """Pool replicate networks (identically configured runs): Fisher per network, Bates over
    networks, effect ± SE over all subclusters of all networks, BH across the table.

    ``combine`` ("fisher" or "exact", see :func:`analyze`) defaults to the first result's."""
    if not results:
        raise ValueError("combine needs at least one result")
    rule = combine if combine is not None else results[0].config.get("combine", "fisher")
    names = list(names) if names is not None else [str(i) for i in range(len(results))]
    tables, tests = [], []
    for name, res in zip(names, results):
        tables.append(res.subclusters.assign(network=name))
        tests.append(res.tests.assign(network=name))
    parts = list(dict.fromkeys(p for r in results for p in r.partitions))
    summary = summarize(pd.concat(tests, ignore_index=True), partitionings=parts, alpha=alpha, combine=rule,
                        random_state=results[0].config.get("random_state", 0))
    cls = [r.clusterability.assign(network=n) for n, r in zip(names, results) if r.clusterability is not None]
    cl_table = pd.concat(cls, ignore_index=True) if cls else None
    summary = _with_clusterability(summary, cl_table, parts, alpha)
    # n-cut: mean over networks; unclustered neurons: summed over networks
    summary["ncut"] = [np.mean([r.partitions[p].ncut for r in results if p in r.partitions and r.partitions[p].ncut is not None] or [np.nan])
                       for p in summary["partitioning"]]
    summary["n_unclustered"] = [int(sum((l < 0).sum() for r in results if p in r.partitions for l in r.partitions[p].labels))
                                for p in summary["partitioning"]]
    config = dict(results[0].config, networks=names, alpha=alpha, combine=rule)
    partitions = {f"{n}:{k}": v for n, r in zip(names, results) for k, v in r.partitions.items()}
    vis = [r.visualizations.assign(network=n) for n, r in zip(names, results) if r.visualizations is not None]
    vis = pd.concat(vis, ignore_index=True) if vis else None
    all_tables, all_tests = pd.concat(tables, ignore_index=True), pd.concat(tests, ignore_index=True)
    add_diagnostics(summary, all_tables, vis, all_tests)
    # figures: those of the first network (every network's images stay in its own result)
    return AnalysisResult(summary, all_tables, all_tests, partitions, config, vis, results[0].vis_results, cl_table)


def save_result(result: AnalysisResult, directory, *, overwrite: bool = False, extra_manifest: dict | None = None,
                figures: bool = True) -> Path:
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {target} is not empty; choose another folder or pass overwrite=True (--overwrite)")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        files = []
        for name in ("summary", "subclusters", "tests", "visualizations", "clusterability"):
            frame = getattr(result, name)
            if frame is None:
                continue
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
            frame.to_csv(tmp / f"{name}.csv", index=False)
            files += [f"{name}.parquet", f"{name}.csv"]
        if result.vis_results:
            from modlens.study.figures import save_vis_grids

            for res in result.vis_results if figures else ():  # figures=False: the images without the PNG grids
                files += [str(p.relative_to(tmp)) for p in save_vis_grids(res, tmp / "figures")]
            images = {f"{r.config['partitioning']}": r.images for r in result.vis_results}
            np.savez_compressed(tmp / "vis_images.npz", **{k.replace("/", "__"): v for k, v in images.items()})
            files.append("vis_images.npz")
        parts = {
            name: {"method": p.method, "n_clusters": p.n_clusters, "ncut": p.ncut, "layer_names": list(p.layer_names),
                   "labels": [l.tolist() for l in p.labels], "info": p.info}
            for name, p in result.partitions.items()
        }
        (tmp / "partitions.json").write_text(json.dumps(parts, default=_json_default))
        files.append("partitions.json")
        manifest = {"format": "modlens-analysis", "config": result.config, "files": files, **(extra_manifest or {})}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="lesion", file=sys.stderr, leave=True, dynamic_ncols=True)
