"""Per-stage time of one ``analyze`` of a saved model (the ``modlens analyze`` path), profiled.

    python benchmarks/analyze_stages.py MODEL_DIR [--data-dir ../shared/data] [--no-feature-vis]
        [--n-random 19] [--n-clusters 16] [--threads T] [--top 0]

Runs loading (``load_model`` + ``model_data``) and ``analyze`` (all four partitionings, lesions,
and feature visualization unless ``--no-feature-vis``) once under ``cProfile`` and prints, for each
stage, its inclusive time and how often it ran: loading, tracing the adapter, the weight graph,
activation recording, the Spearman correlations, clustering, the unlesioned (baseline) pass, the
lesions and the visualizations of each partitioning, and the statistics. A stage that ran more than
once per network would show a count above 1 here. ``--top N`` also prints the N most expensive
functions. Not a test: times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import cProfile
import pstats
import time
from pathlib import Path
from collections import defaultdict

import torch

from modlens.nn.io import load_model
from modlens.analysis import analyze as an
from modlens.analysis import stages
from modlens.study.commands import model_data

#: stage label -> (file suffix, function name) whose inclusive time is the stage's
STAGES = [
    ("load model + data", "analyze_stages.py", "load"),
    ("adapter (trace)", "nn/adapter.py", "__init__"),
    ("weight graph", "core/graph.py", "weight_graph"),
    ("activation recording", "nn/adapter.py", "record"),
    ("Spearman correlations", "core/graph.py", "activation_graph"),
    ("clustering (global)", "core/clustering.py", "cluster_global"),
    ("clustering (local)", "core/clustering.py", "cluster_local"),
    ("baseline (unlesioned) pass", "nn/lesion.py", "_baseline"),
    ("  lesion caches (probe passes)", "nn/lesion.py", "_fill_many"),
    ("  unlesioned tail for skipping", "nn/_skip.py", "baseline"),
    ("lesions, all partitionings", "experiments/lesion_test.py", "lesion_test"),
    ("feature vis, all partitionings", "experiments/feature_vis.py", "feature_vis_test"),
    ("  pre-activation modules (fx)", "nn/adapter.py", "values"),
    ("statistics", "analysis/statistics.py", "subcluster_tests"),
    ("summary table", "analysis/statistics.py", "summarize"),
]


def _timed(fn, name_of, log, clock):
    def wrapper(*args, **kwargs):
        t0 = clock()
        out = fn(*args, **kwargs)
        log[name_of(args, kwargs)] += clock() - t0
        return out
    return wrapper


def stage_times(stats: pstats.Stats) -> list[tuple[str, float, int]]:
    """(stage, inclusive seconds, calls) for :data:`STAGES` from a profile."""
    out = []
    for label, suffix, func in STAGES:
        secs, calls = 0.0, 0
        for (path, _, name), (cc, _nc, _tt, ct, _callers) in stats.stats.items():
            if name == func and path.replace("\\", "/").endswith(suffix):
                secs += ct
                calls += cc
        out.append((label, secs, calls))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a folder written by modlens train")
    ap.add_argument("--data-dir", default=os.environ.get("MODLENS_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--no-feature-vis", action="store_true")
    ap.add_argument("--n-random", type=int, default=19)
    ap.add_argument("--n-clusters", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--dump", default=None, help="also write the raw profile to this file (pstats format)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu (default): this process's CPU time, little disturbed by other jobs on a shared machine "
                         "(use --threads 1 to make it the work done); wall: elapsed time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    per_part: dict[str, float] = defaultdict(float)
    stages.lesion_test = _timed(stages.lesion_test, lambda a, k: "lesions " + k["name"], per_part, clock)
    stages.feature_vis_test = _timed(stages.feature_vis_test, lambda a, k: "feature vis " + k["name"], per_part, clock)


    def load(path):
        model, manifest = load_model(path)
        return model, model_data(manifest, data_dir=args.data_dir)

    prof = cProfile.Profile(clock)
    t0, w0 = clock(), time.perf_counter()
    prof.enable()
    model, (test, act) = load(args.model)
    result = an.analyze(model, test, activation_data=act, n_clusters=args.n_clusters, n_random=args.n_random,
                        feature_vis=not args.no_feature_vis)
    prof.disable()
    total, wall = clock() - t0, time.perf_counter() - w0
    stats = pstats.Stats(prof)
    if args.dump:
        stats.dump_stats(args.dump)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
          f"{result.config['layers']}, {result.config['n_test']} test images, {len(act)} activation images; "
          f"k={args.n_clusters}, {args.n_random} random sets; total {total:.1f} s {args.clock} time, {wall:.1f} s "
          f"elapsed (profiled; cProfile adds a little)")
    print(f"{'stage':34} {'seconds':>8} {'share':>6} {'calls':>6}")
    for label, secs, calls in stage_times(stats):
        print(f"{label:34} {secs:8.2f} {100 * secs / total:5.1f}% {calls:6d}")
    for key in sorted(per_part):
        print(f"  {key:32} {per_part[key]:8.2f} {100 * per_part[key] / total:5.1f}%")
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
