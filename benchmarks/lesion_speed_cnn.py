"""Lesion-stage speed on CNNs: incremental batched path vs the plain per-lesion loop.

    python benchmarks/lesion_speed_cnn.py --case cifar-vgg      [--n-images N] [--device cuda]
    python benchmarks/lesion_speed_cnn.py --case imagenet-vgg16 [--n-images N] [--device cuda]
    python benchmarks/lesion_speed_cnn.py --case mnist-cnn --model DIR [--n-images N] [--feature-vis]

``mnist-cnn`` is the paper's small CNN, trained (``modlens train --arch cnn --dataset mnist``), on
the MNIST test images, with its real partitions: see :func:`measure_trained`.

Cases (random weights and random images: the lesion stage's cost does not depend on them):

* ``cifar-vgg``: the paper's CIFAR-10 VGG (13 conv layers 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M;
  conv -> ReLU -> [maxpool] -> batch norm; dense 512 -> ReLU -> BN -> dense 10), 32x32 inputs,
  full size 10,000 test images.
* ``imagenet-vgg16``: VGG-16 (conv -> ReLU, 224x224, adaptive average pool 7x7, dense 4096,
  4096, 1000), full size ``--full-images`` (default 3,000) images.

The conv channels (4,224 nodes) are partitioned with k=16 (weights/global, as the paper), and
every subcluster gets ``--n-random`` random sets of its size (19). Both paths run in the same
process on the first ``--n-images`` images: per layer, the incremental path
(:class:`~modlens.nn.lesion.IncrementalLesions`) on the first ``--fast-per-layer`` lesions and the
plain path (:func:`~modlens.nn.lesion.correct_counts_plain`, one full forward pass per lesion) on
the first ``--plain-per-layer`` (best of ``--repeats`` timings each). Times are extrapolated, linearly, to all of the layer's lesions
and to the full number of images; every extrapolated number is labelled so. Counts of the timed
lesions are compared between the paths. FLOPs are counted from the layer shapes for the full run
(2 x multiply-accumulates of conv and dense layers; the incremental count includes filling the
caches). Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
from pathlib import Path
import resource
import sys
import time

import numpy as np
import torch
from torch import nn

from modlens.core.partition import Partition
from modlens.experiments.lesion_test import random_sets
from modlens.experiments.partitioning import Partitioner
from modlens.nn import _memory
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

VGG_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


#: ../shared/data relative to the project root (the shared data folder of a checkout)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

def cifar_vgg(n_classes: int = 10, convs=VGG_CONVS, dense: int = 512) -> nn.Sequential:
    """conv -> ReLU -> [maxpool] -> BN per block (notes, "Other facts"), then dense 512
    (``convs`` must pool 32x32 inputs down to 1x1; smaller ``convs``/``dense`` give test networks)."""
    layers: list[nn.Module] = []
    cin = 3
    for i, v in enumerate(convs):
        if v == "M":
            continue
        layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
        if i + 1 < len(convs) and convs[i + 1] == "M":
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.BatchNorm2d(v))
        cin = v
    layers += [nn.Flatten(), nn.Linear(cin, dense), nn.ReLU(), nn.BatchNorm1d(dense),
               nn.Dropout(0.5), nn.Linear(dense, n_classes)]
    return nn.Sequential(*layers)


def vgg16(n_classes: int = 1000, convs=VGG_CONVS, dense: int = 4096) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in convs:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    layers += [nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(cin * 49, dense), nn.ReLU(), nn.Dropout(),
               nn.Linear(dense, dense), nn.ReLU(), nn.Dropout(), nn.Linear(dense, n_classes)]
    return nn.Sequential(*layers)


CASES = {
    "cifar-vgg": dict(build=cifar_vgg, size=32, classes=10, full=10_000, cpu_images=500, cpu_fast=6),
    "imagenet-vgg16": dict(build=vgg16, size=224, classes=1000, full=3_000, cpu_images=8, cpu_fast=3),
    "mnist-cnn": None,   # a trained model (--model), measure_trained
}


def peak_memory(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB, peak RSS {rss:.2f} GiB"
    return f"peak RSS {rss:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="cifar-vgg")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-images", type=int, help="images actually run (default: full size on a GPU, "
                    "500 (CIFAR) or 8 (ImageNet) on a CPU)")
    ap.add_argument("--full-images", type=int, help="images the run is extrapolated to (10,000 / 3,000)")
    ap.add_argument("--n-clusters", type=int, default=16)
    ap.add_argument("--partition", choices=["weights/global", "per-layer"], default="weights/global",
                    help="weights/global (default; with random weights its subclusters fall in few layers) or "
                    "per-layer: every conv layer split at random into k equal clusters, a load across all layers")
    ap.add_argument("--n-random", type=int, default=19)
    ap.add_argument("--fast-per-layer", type=int, help="lesions per layer timed on the incremental path "
                    "(default: all on a GPU, 6 (CIFAR) or 3 (ImageNet) on a CPU)")
    ap.add_argument("--plain-per-layer", type=int, default=2, help="lesions per layer timed on the plain path")
    ap.add_argument("--repeats", type=int, default=2, help="timings per layer and path; the fastest is kept")
    ap.add_argument("--memory-budget-gib", type=float, help="IncrementalLesions budget (default 2 GiB CPU, half the free GPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    g = ap.add_argument_group("mnist-cnn (a trained small CNN)")
    g.add_argument("--model", help="the model folder (modlens train --arch cnn --dataset mnist)")
    g.add_argument("--data-dir", default=os.environ.get("MODLENS_DATA") or str(SHARED_DATA),
                    help="MNIST folder root (default: $MODLENS_DATA, else ../shared/data beside the project)")
    g.add_argument("--methods", default="all", help="partitionings, comma-separated (default: all four)")
    g.add_argument("--paths", default="channels_last,no-reorder,contiguous,plain",
                   help="lesion paths to time ('' for none), the first is the reference of the ratios: channels_last "
                   "(the default engine on the CPU), no-reorder (it without max-pool before ReLU in the tails), "
                   "contiguous (the engine before: NCHW), plain (the oracle)")
    g.add_argument("--per-layer", default="channels_last=all,contiguous=6,plain=2",
                   help="lesions timed per (partitioning, layer) and path; the rest is extrapolated")
    g.add_argument("--feature-vis", default="", help="also time feature visualization of every partitioning "
                   "with these layouts, comma-separated: channels_last, contiguous")
    g.add_argument("--vis-steps", type=int, default=100)
    g.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time lesions and visualizations by wall clock or by the process's CPU time")
    args = ap.parse_args()
    if args.clock == "cpu":
        global _clock
        _clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case == "mnist-cnn":
        if not args.model:
            ap.error("--case mnist-cnn needs --model DIR")
        per_layer = {k: (None if v == "all" else int(v)) for k, v in (p.split("=") for p in args.per_layer.split(","))}
        measure_trained(args.model, data_dir=args.data_dir, n_images=args.n_images, methods=args.methods,
                        paths=[p for p in args.paths.split(",") if p], per_layer=per_layer, n_clusters=args.n_clusters,
                        n_random=args.n_random, feature_vis=[v for v in args.feature_vis.split(",") if v],
                        vis_steps=args.vis_steps, full_images=args.full_images or 10_000,
                        memory_budget_gib=args.memory_budget_gib)
        return
    measure(args.case, device=args.device, n_images=args.n_images, full_images=args.full_images,
            n_clusters=args.n_clusters, partition=args.partition, n_random=args.n_random,
            fast_per_layer=args.fast_per_layer, plain_per_layer=args.plain_per_layer, repeats=args.repeats,
            memory_budget_gib=args.memory_budget_gib)


def measure(case_name: str, *, device="cpu", n_images: int | None = None, full_images: int | None = None,
            n_clusters: int = 16, partition: str = "weights/global", n_random: int = 19,
            fast_per_layer: int | None = None, plain_per_layer: int = 2, repeats: int = 2,
            memory_budget_gib: float | None = None, image_size: int | None = None, max_layers: int | None = None,
            arch: dict | None = None,
            say=functools.partial(print, flush=True)) -> dict:
    """Run one case (see the module docstring) and print its table with ``say``; returns the totals
    ``{"plain_s", "incremental_s", "ratio", "flop_ratio", "n_images", "full_images", "n_lesions",
    "max_count_diff"}`` (the last: largest difference of correct counts between the paths)
    (seconds extrapolated to ``full_images``). ``image_size`` overrides the case's input size and
    ``max_layers`` times only the first layers that have lesions, ``arch`` (``{"convs": [...], "dense": n}``)
    shrinks the network (all three for quick checks)."""
    case = CASES[case_name]
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = n_images or (case["full"] if gpu else case["cpu_images"])
    full = full_images or case["full"]
    fast_per_layer = fast_per_layer or (10**9 if gpu else case["cpu_fast"])
    budget = int(memory_budget_gib * 2**30) if memory_budget_gib else None
    size = image_size or case["size"]

    torch.manual_seed(0)
    model = case["build"](case["classes"], **(arch or {}))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, case["classes"], (n,), generator=g)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):  # running statistics of random data
        model.train()
        with torch.no_grad():
            model(x[:64])
    model = model.eval().to(device)
    adapter = NetworkAdapter(model)
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if gpu else f", {torch.get_num_threads()} threads")
    say(f"{case_name}: {len(adapter.layers)} conv layers, {sum(adapter.layer_sizes)} channels; torch "
        f"{torch.__version__} on {where}; {n} random {size}x{size} images run, extrapolated to {full}")

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    if partition == "weights/global":
        part = Partitioner(adapter, n_clusters=n_clusters, random_state=0).partition("weights/global")
    else:
        labels = [rng.permutation(np.arange(w) % n_clusters) for w in adapter.layer_sizes]
        part = Partition.from_labels(labels, adapter.layer_names, adapter.layer_sizes, method="per-layer")
    say(f"{partition} partition, k={n_clusters}: {len(part.subclusters())} subclusters in "
        f"{len({s.layer for s in part.subclusters()})} layers, {time.perf_counter() - t0:.1f} s")
    per_layer: dict[int, list[np.ndarray]] = {}
    for sc in part.subclusters():
        width = adapter.layers[sc.layer].n_neurons
        per_layer.setdefault(sc.layer, []).extend([sc.neurons] + random_sets(width, sc.size, n_random, rng))
    if max_layers is not None:
        per_layer = dict(sorted(per_layer.items())[:max_layers])
    n_lesions = sum(len(v) for v in per_layer.values())

    t0 = time.perf_counter()
    ev = IncrementalLesions(adapter, x, y, memory_budget_bytes=budget)
    t_setup = time.perf_counter() - t0
    shapes = adapter.node_shapes(x)
    t0 = time.perf_counter()
    copy.deepcopy(model)
    t_copy = time.perf_counter() - t0  # the plain path copies the model once per call (per layer)
    say(f"{n_lesions} lesions; evaluator budget {ev.budget / 2**30:.1f} GiB, setup (baseline pass) {t_setup:.1f} s, "
        f"model copy for the plain path {t_copy:.2f} s per layer")
    say(f"{'layer':>6} {'ch':>4} {'lesions':>7} {'plain s/lesion':>14} {'incr. s/lesion':>14} {'ratio':>6} "
        f"{'FLOP ratio':>10} {'cache/sample':>12} {'chunks@full':>11} {'max diff':>8}")
    tot = dict(plain=0.0, fast=t_setup * full / n, fplain=0.0, ffast=0.0, diff=0)
    for layer, sets in sorted(per_layer.items()):
        k_fast, k_plain = min(len(sets), max(2, fast_per_layer)), min(len(sets), plain_per_layer)
        t0 = time.perf_counter()
        first = ev.correct_counts(layer, sets[:1])                     # fills this layer's cache
        t_first = time.perf_counter() - t0
        per_fast, per_plain = float("inf"), float("inf")
        for _ in range(repeats):                                       # best of: the machine may be shared
            t0 = time.perf_counter()
            rest = ev.correct_counts(layer, sets[1:k_fast])
            per_fast = min(per_fast, (time.perf_counter() - t0) / max(1, k_fast - 1))
            t0 = time.perf_counter()
            plain = correct_counts_plain(adapter, layer, sets[:k_plain], x, y, memory_budget_bytes=budget)
            per_plain = min(per_plain, max(0.0, time.perf_counter() - t0 - t_copy) / k_plain)
        fast_layer = t_first + per_fast * (len(sets) - 1)
        fast_counts = np.concatenate([first, rest])[:k_plain]
        diff = int(np.abs(plain - fast_counts).max())
        tot["diff"] = max(tot["diff"], diff)
        plan = adapter.lesion_plan(layer)
        macs = [plan.macs(shapes, len(s)) for s in sets]
        flops_plain = 2.0 * full * sum(m["forward"] for m in macs)
        flops_fast = 2.0 * full * (macs[0]["probe"] + sum(m["lesion"] for m in macs))
        per_sample = plan.cache_elements(shapes) * ev.itemsize
        chunks = int(np.ceil(full * per_sample / (ev.budget // 2)))
        tot["plain"] += t_copy + per_plain * len(sets) * full / n
        tot["fast"] += fast_layer * full / n
        tot["fplain"] += flops_plain
        tot["ffast"] += flops_fast
        say(f"{adapter.layer_names[layer]:>6} {adapter.layer_sizes[layer]:>4} {len(sets):>7} {per_plain:>14.3f} "
            f"{per_fast:>14.3f} {per_plain / max(per_fast, 1e-12):>6.1f} {flops_plain / flops_fast:>10.2f} "
            f"{per_sample / 2**20:>10.2f}MB {chunks:>11} {diff:>8}")
    scale = "" if n == full else f", extrapolated from {n} to {full} images"
    say(f"plain path:       {tot['plain']:10.1f} s  {tot['fplain'] / 1e12:9.2f} TFLOP  "
        f"(timed on {plain_per_layer} lesions per layer, extrapolated to all {n_lesions}{scale})")
    say(f"incremental path: {tot['fast']:10.1f} s  {tot['ffast'] / 1e12:9.2f} TFLOP  "
        f"(timed on up to {fast_per_layer if not gpu or fast_per_layer < 10**9 else 'all'} lesions per layer"
        f"{', extrapolated' if fast_per_layer < 10**9 else ''}{scale}; cache fills and baseline included)")
    say(f"ratio: {tot['plain'] / tot['fast']:.1f}x time, {tot['fplain'] / tot['ffast']:.2f}x FLOPs; "
        f"{peak_memory(device)}; default CPU budget {_memory.CPU_BUDGET / 2**30:.0f} GiB")
    return {"plain_s": tot["plain"], "incremental_s": tot["fast"], "ratio": tot["plain"] / tot["fast"],
            "flop_ratio": tot["fplain"] / tot["ffast"], "n_images": n, "full_images": full, "n_lesions": n_lesions,
            "max_count_diff": tot["diff"]}


_clock = time.perf_counter   # --clock cpu: time.process_time (less disturbed by other jobs on a shared machine)


def _sets_by_layer(adapter, part, n_random: int, seed: int) -> dict[int, list[np.ndarray]]:
    """Each subcluster and its random controls, per layer, drawn as ``lesion_test`` draws them."""
    rng = np.random.default_rng(seed)
    out: dict[int, list[np.ndarray]] = {}
    for sc in part.subclusters():
        width = adapter.layers[sc.layer].n_neurons
        out.setdefault(sc.layer, []).extend([sc.neurons] + random_sets(width, sc.size, n_random, rng))
    return out


def measure_trained(model_dir, *, data_dir=None, n_images: int | None = None, methods: str = "all",
                    paths=("channels_last", "no-reorder", "contiguous", "plain"), per_layer: dict | None = None,
                    n_clusters: int = 16, n_random: int = 19, feature_vis=(), vis_steps: int = 100,
                    full_images: int = 10_000, memory_budget_gib: float | None = None,
                    say=functools.partial(print, flush=True)) -> dict:
    """The lesion stage (and optionally feature visualization) of a trained small CNN, path by path.

    The model's four partitionings (k = ``n_clusters``, activations from its held-out training
    examples, as ``modlens analyze``) each give every subcluster and ``n_random`` random sets of its
    size. Per (partitioning, layer), each path in ``paths`` is timed on ``per_layer[path]`` lesions
    (``None``: all) spread over the layer's subclusters, the first of them the call that fills the
    layer's cache (timed apart; one evaluator per path serves the four partitionings, as in
    ``analyze``), and its per-lesion time is extrapolated to the layer's lesions. The per-lesion
    times and ratios printed per layer are taken on the same lesions for every path but ``plain``. Paths: ``channels_last`` (the default incremental
    engine on the CPU), ``no-reorder`` (it without the max-pool/ReLU reordering of the tails),
    ``contiguous`` (the same engine in the NCHW layout with the tails as traced: the path before),
    ``plain`` (one full forward pass per lesion: the oracle). The counts of every timed lesion are
    compared with the first path's. ``feature_vis`` names layouts under which
    ``feature_vis_test`` (``vis_steps`` Adam steps, the study's defaults) is timed per partitioning.
    Times scale linearly with the number of images: the totals are also given for ``full_images``
    (run fewer images than the full 10,000 where a layer's cache would not fit the memory budget,
    since every call then refills it; the script warns). Returns the totals per path (seconds,
    extrapolated to all lesions of ``full_images`` images)."""
    from modlens.experiments.partitioning import METHODS, make_adapter
    from modlens.nn.io import load_model
    from modlens.study.commands import model_data

    budget = int(memory_budget_gib * 2**30) if memory_budget_gib else None
    per_layer = {"channels_last": None, "no-reorder": 6, "contiguous": 6, "plain": 2} | dict(per_layer or {})
    model, manifest = load_model(model_dir)
    (x, y), act = model_data(manifest, data_dir=data_dir)
    if n_images:
        x, y = x[:n_images], y[:n_images]
    adapter = make_adapter(model, x)
    say(f"small CNN {model_dir} (test accuracy {manifest.get('accuracy')}): layers {adapter.layer_names} "
        f"{adapter.layer_sizes}; {len(x)} test images; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}")
    methods = list(METHODS) if methods == "all" else methods.split(",")
    t0 = time.perf_counter()
    partitioner = Partitioner(adapter, activation_data=act, n_clusters=n_clusters, random_state=0)
    parts = {m: partitioner.partition(m) for m in methods}
    say(f"partitioning ({', '.join(methods)}): {time.perf_counter() - t0:.1f} s")
    lesions = {m: _sets_by_layer(adapter, parts[m], n_random, seed=i) for i, m in enumerate(methods)}
    shapes = adapter.node_shapes(x[:1])
    for m in methods:
        say(f"  {m}: subclusters per layer {[len(lesions[m].get(l, [])) // (n_random + 1) for l in range(len(adapter.layers))]}"
            f", lesions {sum(len(v) for v in lesions[m].values())}")

    result: dict = {"n_images": len(x)}
    if paths:
        result.update(_measure_lesions(adapter, lesions, methods, x, y, shapes, paths, per_layer, say, budget,
                                       full_images))
    if feature_vis:
        result["vis_s"] = measure_vis(adapter, parts, x, n_random=n_random, layouts=feature_vis, steps=vis_steps,
                                      say=say)
    return result


#: Lesion paths of ``mnist-cnn``: (channels-last layout, max-pool before ReLU in tails).
LESION_PATHS = {
    "channels_last": (True, True),     # the default engine on the CPU
    "no-reorder": (True, False),
    "contiguous": (False, False),      # the engine before this work: NCHW, tails as traced
}


def _adapter_for(model, x, reorder: bool):
    """An adapter whose lesion plans are built with or without the max-pool/ReLU reordering."""
    from modlens.experiments.partitioning import make_adapter
    from modlens.nn import _plan

    adapter = make_adapter(model, x)
    keep = _plan.pool_before_relu
    if not reorder:
        _plan.pool_before_relu = lambda gm: 0
    try:
        for layer in range(len(adapter.layers)):
            adapter.lesion_plan(layer)
    finally:
        _plan.pool_before_relu = keep
    return adapter


def _measure_lesions(adapter, lesions, methods, x, y, shapes, paths, per_layer, say, budget=None,
                     full_images: int = 10_000) -> dict:
    """The lesion timing of :func:`measure_trained`."""
    evaluators = {}
    t_setup = {}
    for p in paths:
        if p == "plain":
            continue
        cl, reorder = LESION_PATHS[p]
        own = _adapter_for(adapter.model, x, reorder)
        t0 = _clock()
        evaluators[p] = IncrementalLesions(own, x, y, channels_last=cl, memory_budget_bytes=budget)
        t_setup[p] = _clock() - t0
    say("baseline pass (evaluator setup): " + ", ".join(f"{p} {t:.2f} s" for p, t in t_setup.items()))
    tot = {p: t_setup.get(p, 0.0) for p in paths}
    fills = {p: 0.0 for p in paths}
    flops = {"plain": 0.0, "incremental": 0.0}
    diff = 0
    refilled: set[str] = set()
    say(f"{'partitioning':>20} {'layer':>6} {'lesions':>7} " + " ".join(f"{p + ' s/lesion':>22}" for p in paths)
        + " " + " ".join(f"{'ratio ' + p:>16}" for p in paths[1:]) + f" {'FLOP ratio':>10}")
    # the same lesions for every path: a spread sample first (ratios), then the rest (the paths timed on all)
    k_common = min([len(v) for ls in lesions.values() for v in ls.values()]
                   + [per_layer[p] for p in paths if p != "plain" and per_layer.get(p) is not None])
    for m in methods:
        for layer, sets in sorted(lesions[m].items()):
            n = len(sets)
            spread = np.linspace(0, n - 1, min(n, max(2, k_common))).round().astype(int)
            order = list(dict.fromkeys([*spread.tolist(), *range(n)]))
            sets = [sets[i] for i in order]
            per, counts = {}, {}
            for p in paths:
                k = n if per_layer.get(p) is None else min(n, max(1, per_layer[p]))
                if p == "plain":
                    t0 = _clock()
                    counts[p] = correct_counts_plain(adapter, layer, sets[:k], x, y)
                    per[p] = (_clock() - t0) / k
                    tot[p] += per[p] * n
                    continue
                ev = evaluators[p]
                t0 = _clock()
                parts = [ev.correct_counts(layer, sets[:1])]      # fills the layer's cache on its first call
                t_first = _clock() - t0
                kc = min(k, k_common)
                t0 = _clock()
                if kc > 1:
                    parts.append(ev.correct_counts(layer, sets[1:kc]))
                per[p] = (_clock() - t0) / max(1, kc - 1) if kc > 1 else t_first
                chunks = ev.last_stats.get("cache_chunks", 1)
                if chunks > 1:
                    refilled.add(f"{m} {adapter.layer_names[layer]} ({p}: {chunks} chunks)")
                if k > kc:                                        # the rest: measured, not extrapolated
                    t0 = _clock()
                    parts.append(ev.correct_counts(layer, sets[kc:k]))
                    rest = _clock() - t0
                    tot[p] += t_first + per[p] * (kc - 1) + rest + (rest / (k - kc)) * (n - k)
                else:
                    tot[p] += t_first + per[p] * (n - 1)
                fills[p] += t_first
                counts[p] = np.concatenate(parts)
            ref = counts[paths[0]]
            for p in paths[1:]:
                c = min(len(ref), len(counts[p]))
                diff = max(diff, int(np.abs(ref[:c] - counts[p][:c]).max()))
            plan = adapter.lesion_plan(layer)
            macs = [plan.macs(shapes, len(s)) for s in sets]
            fp = 2.0 * len(x) * sum(mm["forward"] for mm in macs)
            fi = 2.0 * len(x) * sum(mm["lesion"] for mm in macs)
            flops["plain"] += fp
            flops["incremental"] += fi
            say(f"{m:>20} {adapter.layer_names[layer]:>6} {n:>7} " + " ".join(f"{per[p]:22.4f}" for p in paths)
                + " " + " ".join(f"{per[p] / per[paths[0]]:15.2f}x" for p in paths[1:]) + f" {fp / fi:10.1f}"
                + f"  (load {os.getloadavg()[0]:.1f})")
    say(f"largest difference of class-wise counts between the paths on the timed lesions: {diff}")
    if refilled:
        say("WARNING: these layers' caches did not fit the memory budget, so every call refilled them (a probe "
            "pass over all images), which the per-lesion times of sampled calls include; use fewer --n-images "
            "(times scale linearly) or a larger --memory-budget-gib: " + "; ".join(sorted(refilled)))
    say(f"s/lesion: per lesion on the same {k_common - 1} lesions per (partitioning, layer) for every path but plain "
        f"(after the call that fills the cache); plain: {per_layer['plain']} lesions")
    scale = full_images / len(x)
    clock = "CPU" if _clock is time.process_time else "wall"
    for p in paths:
        timed = "all lesions timed" if per_layer.get(p) is None else f"{per_layer[p]} lesions per layer timed, extrapolated"
        full = f"; x{scale:.2f} = {tot[p] * scale:.0f} s at {full_images} images" if scale != 1 else ""
        say(f"lesion stage, {p:>13}: {tot[p]:9.1f} s {clock} ({timed}; baseline pass {t_setup.get(p, 0.0):.1f} s and "
            f"cache fills {fills[p]:.1f} s included{full})")
    for p in paths[1:]:
        say(f"  ratio {p} / {paths[0]}: {tot[p] / tot[paths[0]]:.2f}x")
    say(f"FLOPs at {full_images} images (cache fills not counted): plain {flops['plain'] * scale / 1e12:.1f} TFLOP, "
        f"incremental {flops['incremental'] * scale / 1e12:.1f} TFLOP; {peak_memory(torch.device('cpu'))}")
    return {"lesion_s": {p: t * scale for p, t in tot.items()}, "max_count_diff": diff}


def measure_vis(adapter, parts: dict, x, *, n_random: int, layouts, steps: int, say) -> dict:
    """``feature_vis_test`` of each partition under each layout (the study's defaults); seconds per layout,
    and the largest difference of the optimized images from the first layout's."""
    from modlens.experiments.feature_vis import feature_vis_test
    from modlens.experiments.feature_vis import default_transforms as default_vis_transforms

    opts = dict(steps=steps, value_range=(float(x.min()), float(x.max())),
                transforms=default_vis_transforms(tuple(x.shape[1:])))
    out = {}
    images = {}
    for layout in layouts:
        total = 0.0
        for i, (m, part) in enumerate(parts.items()):
            kw = {} if layout == "default" else {"channels_last": layout == "channels_last"}
            t0 = _clock()
            res = feature_vis_test(adapter, part, tuple(x.shape[1:]), n_random=n_random, random_state=i, **opts, **kw)
            dt = _clock() - t0
            total += dt
            first = images.setdefault(m, res.images)
            say(f"feature visualization, {layout:>13}, {m:>20}: {len(res.table)} images, {dt:7.1f} s; largest "
                f"image difference to {layouts[0]}: {float(np.abs(res.images - first).max()):.2e}")
        out[layout] = total
        say(f"feature visualization, {layout}: {total:.1f} s for {len(parts)} partitionings "
            f"(load average {os.getloadavg()[0]:.2f})")
    return out


if __name__ == "__main__":
    sys.exit(main())
