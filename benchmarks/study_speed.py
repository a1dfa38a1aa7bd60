"""The MLP-MNIST row of ``paper-small`` end to end: the study runner against the per-network sequence.

    python benchmarks/study_speed.py [--replicates 5] [--epochs 20] [--n-test 10000] [--executor inline]
        [--workers N] [--data-dir ../shared/data] [--threads T] [--out DIR] [--order study-first]

Both paths run in the same process, on the same networks (seeds 0..N-1, the MLP recipe with
``--epochs``), with the same analysis (k = 16, 19 random sets, all four partitionings, lesions and
feature visualization with 100 steps):

* **study**: ``paper-small`` restricted to its ``mlp-mnist`` group (``modlens study run paper-small
  --groups mlp-mnist --replicates N``), built with :func:`modlens.study.spec.spec_from_dict` from the
  built-in TOML and run by :func:`modlens.study.runner.run_study`. Its stages are read from the
  per-task timings in ``study.json``; "outputs" is the rest of the run's wall time (task graph,
  cache look-ups, the study's tables and report).
* **per network**: for each seed, ``modlens train --dataset mnist --seed S`` then ``modlens analyze
  DIR --feature-vis`` as their Python calls (:func:`modlens.study.commands.train_and_save`,
  :func:`modlens.study.commands.analyze_saved`). Its analysis stages are timed by wrapping, for the
  duration of this path only, loading, ``Partitioner.partition``, ``lesion_test`` and
  ``feature_vis_test`` and ``save_vis_grids`` (the PNG grids that ``analyze`` always draws and a study draws only with
  ``figures = true``: the second ratio printed leaves them out); "statistics + saving" is the rest.

``--n-test M`` analyses a seeded subsample of M test images on both paths (it replaces
``modlens.study.commands.model_data`` in this process, so it needs ``--executor inline``: spawned
workers would load the full test set). ``--dataset digits`` (with small ``--n-random`` and
``--vis-steps``) exists for the test. The trained models of both paths are compared byte for byte
(same seed and recipe: equal on one thread). Not a test: times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

STUDY_STAGES = ("train", "partition", "lesion", "vis", "stats", "outputs")
NETWORK_STAGES = ("train", "load", "partition", "lesion", "vis", "stats", "figures")
STAGE_LABELS = {"train": "training", "load": "load model + data", "partition": "partitioning (4 ways)",
                "lesion": "lesions", "vis": "feature visualization",
                "stats": "statistics + saving", "figures": "figure PNGs (analyze only)", "outputs": "outputs + runner overhead"}
GROUP = "mlp-mnist"


def study_spec(*, replicates: int, epochs: int | None, dataset: str = "mnist", n_random: int = 19,
               vis_steps: int = 100, data_dir=None):
    """``paper-small`` restricted to its MLP-MNIST group, through the study's public spec API."""
    import tomllib

    from modlens.experiments.train import RECIPES
    from modlens.study.builtin import BUILTIN
    from modlens.study.spec import spec_from_dict

    raw = tomllib.loads(BUILTIN["paper-small"].toml)
    for table in raw["networks"]:
        if table["group"] == GROUP:
            table["dataset"] = dataset
            if epochs is not None and epochs != RECIPES["mlp"]["epochs"]:
                table["epochs"] = int(epochs)
    if n_random != raw["analysis"]["n_random"]:
        raw["analysis"]["n_random"] = int(n_random)
    if vis_steps != 100:
        raw["analysis"]["vis_options"] = {"steps": int(vis_steps)}
    return spec_from_dict(raw, source="built-in study 'paper-small'", data_dir=data_dir, replicates=replicates,
                          groups=[GROUP])


@contextlib.contextmanager
def test_subsample(n_test: int | None, seed: int = 0):
    """Within the block, every model's test set (study tasks and ``analyze_saved``) is a seeded
    subsample of ``n_test`` images; ``None`` leaves it whole."""
    from modlens.study import commands as runs

    if n_test is None:
        yield
        return
    original = runs.model_data

    def subsampled(manifest, *, data_dir=None):
        (x, y), act = original(manifest, data_dir=data_dir)
        if n_test < len(y):
            keep = np.sort(np.random.default_rng(seed).choice(len(y), size=n_test, replace=False))
            x, y = x[keep], y[keep]
        return (x, y), act

    runs.model_data = subsampled
    try:
        yield
    finally:
        runs.model_data = original


@contextlib.contextmanager
def _stage_clock(log: dict):
    """Add the wall time of loading, partitioning, lesions, visualization and the visualization
    figures (``save_result`` draws PNG grids for ``analyze``; a study does not unless
    ``figures = true``) to ``log`` while active."""
    from modlens.experiments.partitioning import Partitioner
    from modlens.analysis import figures as figs
    from modlens.analysis import stages
    from modlens.nn import io as model_io
    from modlens.study import commands as runs

    def timed(fn, stage):
        @functools.wraps(fn)  # keeps the signature (AnalysisConfig reads feature_vis_test's)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                log[stage] += time.perf_counter() - t0
        return wrapper

    patches = [(model_io, "load_model", "load"), (runs, "model_data", "load"), (Partitioner, "partition", "partition"),
               (stages, "lesion_test", "lesion"), (stages, "feature_vis_test", "vis"),
               (figs, "save_vis_grids", "figures")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, stage in patches:
        setattr(obj, name, timed(getattr(obj, name), stage))
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def run_study_path(spec, out: Path, *, data_dir, executor: str, workers: int | None) -> tuple[dict, float, dict]:
    """(stage -> seconds, wall seconds, network id -> model sha256) of one run of the study."""
    from modlens.study.runner import run_study

    t0 = time.perf_counter()
    run_study(spec, out, data_dir=data_dir, executor=executor, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    record = json.loads((out / "study.json").read_text())
    stages = defaultdict(float)
    for task in record["tasks"]:
        if task["cached"]:
            raise RuntimeError(f"study_speed: task {task['task']} came from the cache of {out}; use an empty --out")
        stages[task["kind"]] += task["seconds"]
    stages["outputs"] = max(wall - sum(stages.values()), 0.0)
    models = {n["network"]: n["model_sha256"] for n in record["networks"]}
    return dict(stages), wall, models


def run_network_path(seeds, out: Path, *, dataset: str, epochs: int | None, n_random: int, vis_steps: int,
                     data_dir) -> tuple[dict, float, dict]:
    """(stage -> seconds, wall seconds, seed -> model sha256) of train-one-analyse-one for every seed."""
    from modlens.study.commands import analyze_saved, train_and_save

    stages = defaultdict(float)
    models = {}
    vis = {"steps": vis_steps} if vis_steps != 100 else None
    t0 = time.perf_counter()
    for seed in seeds:
        model_dir = out / f"model-s{seed}"
        t1 = time.perf_counter()
        train_and_save(dataset, seeds=[seed], out=model_dir, folders=False, data_dir=data_dir, epochs=epochs)
        stages["train"] += time.perf_counter() - t1
        models[seed] = json.loads((model_dir / "manifest.json").read_text())["sha256"]
        inner = defaultdict(float)
        t1 = time.perf_counter()
        with _stage_clock(inner):
            analyze_saved([model_dir], out=out / f"analysis-s{seed}", data_dir=data_dir, n_random=n_random,
                          feature_vis=True, vis_options=vis)
        total = time.perf_counter() - t1
        for stage, seconds in inner.items():
            stages[stage] += seconds
        stages["stats"] += max(total - sum(inner.values()), 0.0)
    return dict(stages), time.perf_counter() - t0, models


#: how each stage's time grows with the run's size: "r" replicates, "e" epochs, "n" test images
SCALING = {"train": "re", "load": "r", "partition": "r", "lesion": "rn", "vis": "r", "stats": "r", "figures": "r",
           "outputs": ""}


def project(stages: dict, *, replicates: int, epochs: int, n_test: int, to_replicates: int = 5, to_epochs: int = 20,
            to_n_test: int = 10_000) -> dict:
    """Each stage's seconds scaled linearly to another size (:data:`SCALING`): a projection, not a
    measurement. Training is linear in epochs, the lesion stage in test images (every lesion runs
    over all of them; the activation graph uses the held-out split, whose size does not change)."""
    factor = {"r": to_replicates / replicates, "e": to_epochs / epochs, "n": to_n_test / n_test}
    return {stage: seconds * float(np.prod([factor[c] for c in SCALING[stage]])) for stage, seconds in stages.items()}


def stage_table(study: dict, study_total: float, network: dict, network_total: float) -> str:
    """Both paths' stages: seconds and share of that path's total (with several workers the study's
    task seconds add up to more than its wall time; their shares are then of their sum)."""
    lines = [f"{'stage':<28} {'study s':>9} {'share':>7} {'per-network s':>14} {'share':>7}",
             "-" * 69]
    for stage in dict.fromkeys(STUDY_STAGES[:-1] + NETWORK_STAGES[1:2] + NETWORK_STAGES[-1:] + STUDY_STAGES[-1:]):
        s, n = study.get(stage), network.get(stage)
        cells = []
        for value, total, width in ((s, max(study_total, sum(study.values())), 9), (n, network_total, 14)):
            cells.append(f"{'-':>{width}} {'':>7}" if value is None else
                         f"{value:>{width}.1f} {100 * value / total:>6.1f}%")
        lines.append(f"{STAGE_LABELS[stage]:<28} {cells[0]} {cells[1]}")
    lines.append("-" * 69)
    lines.append(f"{'total':<28} {study_total:>9.1f} {'':>7} {network_total:>14.1f}")
    return "\n".join(lines)


def _warm_imports() -> None:
    """Import what the first network of either path would import, so the first path pays no more."""
    import matplotlib.pyplot  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.cluster  # noqa: F401

    import modlens.analysis.analyze  # noqa: F401
    import modlens.analysis.figures  # noqa: F401
    import modlens.report.outputs  # noqa: F401
    import modlens.study.runner  # noqa: F401
    import modlens.study.task_kinds  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch.optim's first Adam: about 2.5 s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicates", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20, help="training epochs (the MLP recipe: 20)")
    p.add_argument("--n-test", type=int, default=None, help="seeded subsample of the test set (default: all)")
    p.add_argument("--executor", default="inline", choices=("inline", "processes", "ray"))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default: modlens's data folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--order", choices=("study-first", "network-first"), default="study-first")
    p.add_argument("--dataset", default="mnist", help="the group's dataset (digits: for the test only)")
    p.add_argument("--n-random", type=int, default=19)
    p.add_argument("--vis-steps", type=int, default=100)
    args = p.parse_args(argv)
    if args.n_test is not None and args.executor != "inline":
        p.error("--n-test subsamples inside this process; use it with --executor inline")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = study_spec(replicates=args.replicates, epochs=args.epochs, dataset=args.dataset, n_random=args.n_random,
                      vis_steps=args.vis_steps, data_dir=args.data_dir)
    seeds = spec.networks[0].seeds
    from modlens.data import load_dataset

    for split in ("train", "test"):  # warm the datasets' cache so neither path pays the first read
        load_dataset(args.dataset, split, data_dir=args.data_dir)
    _warm_imports()

    with contextlib.ExitStack() as stack:
        work = args.out if args.out is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        stack.enter_context(test_subsample(args.n_test))
        results = {}
        order = ("study", "network") if args.order == "study-first" else ("network", "study")
        cpu = {}
        for path in order:
            c0 = time.process_time()
            if path == "study":
                results[path] = run_study_path(spec, work / "study", data_dir=args.data_dir, executor=args.executor,
                                               workers=args.workers)
            else:
                results[path] = run_network_path(seeds, work / "per-network", dataset=args.dataset,
                                                 epochs=args.epochs, n_random=args.n_random,
                                                 vis_steps=args.vis_steps, data_dir=args.data_dir)
            cpu[path] = time.process_time() - c0
    (s_stages, s_total, s_models), (n_stages, n_total, n_models) = results["study"], results["network"]
    same = sum(s_models.get(f"{GROUP}-s{seed}") == n_models[seed] for seed in seeds)
    print(f"MLP row of paper-small ({args.dataset}): {len(seeds)} replicates, {args.epochs} epochs, "
          f"test images: {args.n_test or 'all'}, n_random {args.n_random}, vis steps {args.vis_steps}, "
          f"executor {args.executor} (workers {args.workers}), torch threads {torch.get_num_threads()}, "
          f"order {args.order}")
    print(stage_table(s_stages, s_total, n_stages, n_total))
    print(f"ratio per-network / study: {n_total / s_total:.2f}x; without the per-network path's figure PNGs "
          f"(the same work as the study): {(n_total - n_stages.get('figures', 0.0)) / s_total:.2f}x")
    if args.executor == "inline":  # other executors work in other processes
        print(f"CPU time of the process (all threads; steadier than wall time on a shared machine): study "
              f"{cpu['study']:.1f} s, per network {cpu['network']:.1f} s, ratio {cpu['network'] / cpu['study']:.2f}x")
    print(f"trained models byte-identical between the paths: {same}/{len(seeds)}")
    n_full = len(load_dataset(args.dataset, "test", data_dir=args.data_dir))
    size = {"replicates": len(seeds), "epochs": args.epochs, "n_test": min(args.n_test or n_full, n_full)}
    busy = sum(s_stages.values()) / s_total  # > 1: tasks ran side by side (several workers)
    if busy > 1.01:
        print(f"study: {sum(s_stages.values()):.1f} task-seconds over {args.workers} workers in {s_total:.1f} s of wall "
              f"time ({busy:.2f} tasks at a time on average); the study's shares are of the task-seconds")
    if size != {"replicates": 5, "epochs": 20, "n_test": n_full}:
        ps, pn = (project(st, **size, to_n_test=n_full) for st in (s_stages, n_stages))
        ps_total = sum(ps.values()) / max(busy, 1.0)
        print(f"\nPROJECTED (not measured) to 5 replicates, 20 epochs, {n_full} test images, each stage scaled "
              "linearly (training by replicates x epochs, lesions by replicates x images, outputs unchanged, "
              "the rest by replicates):")
        print(stage_table(ps, ps_total, pn, sum(pn.values())))
        print(f"projected ratio per-network / study: {sum(pn.values()) / ps_total:.2f}x; without the figure PNGs: "
              f"{(sum(pn.values()) - pn.get('figures', 0.0)) / ps_total:.2f}x"
              + (f" (study total: task-seconds / {busy:.2f} tasks at a time)" if busy > 1.01 else ""))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
