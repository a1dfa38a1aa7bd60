"""``analyze``: partition a model four ways, lesion-test every partition, summarize."""

from __future__ import annotations

import sys
import time
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from modlens.analysis import stages
from modlens.analysis.config import AnalysisConfig
from modlens.analysis.diagnostics import add_diagnostics
from modlens.analysis.result import AnalysisResult
from modlens.analysis.statistics import summarize
from modlens.core.partition import Partition
from modlens.nn import NetworkAdapter


def _user_partition(partition, adapter: NetworkAdapter) -> Partition:
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
    token_classes=None,
    position_classes=None,
    token_groups=None,
    **options,
) -> AnalysisResult:
    """Test whether the partitions of ``model``'s hidden neurons are important and coherent.

    The options are the fields of :class:`~modlens.analysis.AnalysisConfig` (each with its help
    text in :func:`modlens.analysis.config.options`): pass ``config=`` or any of them as keywords
    (keywords replace the config's values). They are validated before any work starts.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` that maps one input tensor to class scores and that modlens can
        capture: MLPs, CNNs (grouped, depthwise, residual, normalized), transformers through their
        MLP neurons (README, Models).
    test_data:
        ``(inputs, labels)`` tensors/arrays or a DataLoader: the lesion test set. With
        ``task="next-token"`` (a language model; docs/language-models.md): token ids ``(N, T)``, a
        dict with ``input_ids`` and ``labels`` (aligned, -100 ignored) or ``targets`` (shifted) and
        an ``attention_mask`` (right padding), a DataLoader of those, or a dataset with ``ids`` and
        ``targets`` such as :func:`modlens.data.load_text`'s (:func:`modlens.nn.tokens.as_token_data`).
    token_classes, position_classes:
        Next-token task: the class of every vocabulary entry (an int array over the vocabulary or a
        mapping; -1: none), for the class range over the classes of the target tokens, and a label
        per sequence ``(N,)`` or per position ``(N, T)`` (e.g. the genre), for the label range. The
        top-activating-positions test (``feature_vis=True``) uses both.
    token_groups:
        Transformers: a group per vocabulary entry (-1: left out) for ``vocab_nodes="groups"``: the
        weight graph's embedding and unembedding as one node per group.
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
        spectral clustering (``"auto"``: ARPACK, the paper's, up to 5,000 nodes, LOBPCG above,
        Lanczos for sparse kNN graphs above 8,192 nodes; 25 k-means initializations, 100 above
        2,000 nodes: :func:`modlens.core.clustering.choose_eigen_solver`).
    clusterability, n_null:
        Graphical clusterability test (Filan et al., 2021) of each weight partitioning against
        ``n_null`` networks with the weights shuffled within each layer (one summary row each).
    """
    started = time.perf_counter()
    cfg = AnalysisConfig.build(config, **options)  # every option checked before any work
    test = stages.test_data(test_data, cfg, token_classes=token_classes, position_classes=position_classes)
    x = stages.inputs_of(test)
    adapter = stages.network_adapter(model, x, cfg)
    adapter.check_input(x, "test data")
    if activation_data is not None and activation_data is test_data:
        raise ValueError("activation_data is the test set; pass a held-out split so lesions are tested on unseen data")
    partitioner = None
    if partition is not None:
        partitions = {"user": _user_partition(partition, adapter)}
    else:
        partitioner = stages.make_partitioner(adapter, cfg, activation_data=activation_data, token_groups=token_groups)
        partitions = {}
        for method in cfg.partitionings:
            t0 = time.perf_counter()
            partitions[method] = partitioner.partition(method)
            _say(progress, f"partitioned {method}: {len(partitions[method].subclusters(max_fraction=cfg.max_fraction))} "
                           f"subclusters, n-cut {partitions[method].ncut:.3f} ({time.perf_counter() - t0:.1f} s)")
    engine = stages.make_engine(adapter, test, cfg)
    tables = []
    for name, part in partitions.items():
        n_lesions = len(part.subclusters(max_fraction=cfg.max_fraction)) * (cfg.n_random + 1)
        with _bar(progress, n_lesions, f"lesions {name}") as bar:
            tables.append(stages.lesion_one(engine, part, cfg, name=name, progress=bar.update))
    vis_results, vis_skipped = [], None
    if cfg.feature_vis:
        vis_skipped = stages.vis_problem(adapter, x, cfg)
        if vis_skipped:  # token ids: say so in one line, keep the lesion results
            warnings.warn(vis_skipped, UserWarning, stacklevel=2)
        else:
            vis_in = test if cfg.task == "next-token" else x   # token inputs: the top-activating positions
            for name, part in partitions.items():
                with _bar(progress, stages.n_vis_images(part, x, cfg), f"visualizations {name}") as bar:
                    vis_results.append(stages.vis_one(adapter, part, vis_in, cfg, name=name, progress=bar.update))
    cl_table = None
    if cfg.clusterability and partitioner is not None:
        cl_table = _clusterability(partitioner, [p for p in partitions if p.startswith("weights/")], cfg, progress)
    facts = {"capture": adapter.capture_method, **stages.test_facts(engine, test, cfg),
             "layers": dict(zip(adapter.layer_names, adapter.layer_sizes))}
    result = stages.assemble(partitions, tables, vis_results, cfg, vis_skipped=vis_skipped, clusterability=cl_table,
                             facts=facts)
    result.config["seconds"] = time.perf_counter() - started
    return result


def _clusterability(partitioner, methods, cfg, progress) -> pd.DataFrame:
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        res = stages.clusterability_one(partitioner, method, cfg)
        _say(progress, f"clusterability {method}: n-cut {res['ncut']:.3f} vs shuffled {res['null_mean']:.3f} "
                       f"± {res['null_sd']:.3f}, p {res['p_value']:.3g} ({time.perf_counter() - t0:.1f} s)")
        rows.append(res)
    return stages.clusterability_table(rows)


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
    summary = stages.with_clusterability(summary, cl_table, parts, alpha)
    # n-cut: mean over networks; unclustered neurons: summed over networks
    summary["ncut"] = [np.mean([r.partitions[p].ncut for r in results if p in r.partitions and r.partitions[p].ncut is not None] or [np.nan])
                       for p in summary["partitioning"]]
    summary["n_unclustered"] = [int(sum((l < 0).sum() for r in results if p in r.partitions for l in r.partitions[p].labels))
                                for p in summary["partitioning"]]
    summary["no_subclusters"] = [_no_subclusters(results, p) for p in summary["partitioning"]]
    config = dict(results[0].config, networks=names, alpha=alpha, combine=rule)
    partitions = {f"{n}:{k}": v for n, r in zip(names, results) for k, v in r.partitions.items()}
    vis = [r.visualizations.assign(network=n) for n, r in zip(names, results) if r.visualizations is not None]
    vis = pd.concat(vis, ignore_index=True) if vis else None
    all_tables, all_tests = pd.concat(tables, ignore_index=True), pd.concat(tests, ignore_index=True)
    add_diagnostics(summary, all_tables, vis, all_tests)
    # figures: those of the first network (every network's images stay in its own result)
    return AnalysisResult(summary, all_tables, all_tests, partitions, config, vis, results[0].vis_results, cl_table)


def _no_subclusters(results, partitioning: str) -> str:
    """The reason no subcluster qualifies in any network ("" where one network has some)."""
    reasons = []
    for r in results:
        if partitioning not in r.partitions:
            continue
        mf = (r.config.get("options") or {}).get("max_fraction")
        reason = r.partitions[partitioning].no_subclusters_reason(max_fraction=mf)
        if reason is None:
            return ""
        reasons.append(reason)
    if not reasons:
        return ""
    return reasons[0] if len(reasons) == 1 else f"in none of the {len(reasons)} networks; the first: {reasons[0]}"


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


__all__ = ["analyze", "combine"]
