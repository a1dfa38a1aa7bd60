"""Lesion-stage speed on the paper's MNIST MLP: incremental batched path vs the plain loop.

    python benchmarks/lesion_speed.py [--model DIR] [--data-dir DIR] [--epochs 20]

Trains (or loads) a 784-256x4-10 MLP on MNIST, partitions it (k=16, weights/global by
default), draws 19 random sets per subcluster and evaluates every lesion on the 10,000
test images twice in the same run: with the plain path (one full forward pass per lesion,
the oracle) and with the incremental path (cached activations, low-rank correction,
batched masks). It checks that both give the same class-wise counts, and prints times,
the ratio, and the floating-point operations each path performs. Spectral-clustering time
is reported for both eigen-solvers. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modlens.core import clustering, graph
from modlens.data import load_dataset
from modlens.experiments.lesion_test import random_sets
from modlens.experiments.partitioning import METHODS, Partitioner
from modlens.data import split_validation
from modlens.experiments.train import train_reference_mlp
from modlens.nn import NetworkAdapter
from modlens.nn.io import load_model, save_model
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from modlens.study.commands import model_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a saved modlens model folder (default: train one)")
    ap.add_argument("--data-dir", type=Path, default=os.environ.get("MODLENS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--method", default="all", choices=["all", *METHODS],
                    help="partitioning(s) whose lesions are timed (default: all four, as `modlens analyze` runs)")
    ap.add_argument("--save-model", type=Path, help="save the trained model here for later --model runs")
    ap.add_argument("--n-clusters", type=int, default=16)
    ap.add_argument("--n-random", type=int, default=19)
    ap.add_argument("--plain-fraction", type=float, default=1.0,
                    help="time the plain path on this fraction of each layer's lesions and extrapolate (default: all)")
    args = ap.parse_args()

    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    if args.model:
        model, manifest = load_model(args.model)
        _, held_out = model_data(manifest, data_dir=args.data_dir)
        print(f"model {args.model}: test accuracy {manifest.get('accuracy')}")
    else:
        train = load_dataset("mnist", "train", data_dir=args.data_dir)
        t0 = time.perf_counter()
        model, info = train_reference_mlp(torch.from_numpy(train.x), torch.from_numpy(train.y), x, y, seed=0, epochs=args.epochs)
        held_out = torch.from_numpy(train.x[split_validation(info["n_total"], info["n_val"], info["val_seed"])[1]])
        print(f"trained 784-256x4-10 for {args.epochs} epochs in {time.perf_counter() - t0:.1f} s, "
              f"test accuracy {info['test_accuracy']:.4f}")
        if args.save_model:
            save_model(model, args.save_model, {"architecture": info["architecture"], "accuracy": info["test_accuracy"],
                                                "dataset": {"name": "mnist", "data_seed": 0, "activation_split": {
                                                    "split": "train", "n_total": info["n_total"], "n_val": info["n_val"],
                                                    "val_seed": info["val_seed"]}}})
    adapter = NetworkAdapter(model, x[:2])  # captured with torch.export at the data's shape, as analyze does
    print(f"capture: {adapter.capture_method}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(y)} test images")

    # spectral clustering time, both solvers, on the weight graph
    adj = graph.weight_graph(adapter.node_layer_sizes(), adapter.weight_blocks())
    for solver in ("lobpcg", "arpack"):
        t0 = time.perf_counter()
        clustering.cluster_global(adj, adapter.node_layer_sizes(), args.n_clusters, random_state=0, eigen_solver=solver)
        print(f"spectral clustering ({solver}, {adj.shape[0]} nodes, k={args.n_clusters}): {time.perf_counter() - t0:.2f} s")

    partitioner = Partitioner(adapter, activation_data=held_out, n_clusters=args.n_clusters)
    rng = np.random.default_rng(0)
    per_layer: dict[int, list[np.ndarray]] = {}
    for method in METHODS if args.method == "all" else [args.method]:
        subclusters = partitioner.partition(method).subclusters()
        for sc in subclusters:
            width = adapter.layers[sc.layer].n_neurons
            per_layer.setdefault(sc.layer, []).extend([sc.neurons] + random_sets(width, sc.size, args.n_random, rng))
        print(f"{method}: {len(subclusters)} subclusters; per layer: "
              + ", ".join(f"{adapter.layer_names[l]}={sum(s.layer == l for s in subclusters)}" for l in range(len(adapter.layers))))
    n_lesions = sum(len(v) for v in per_layer.values())
    print(f"{n_lesions} lesions in all; per layer: "
          + ", ".join(f"{adapter.layer_names[l]}={len(v)}" for l, v in sorted(per_layer.items())))

    # multiply-adds counted by the lesion plans themselves (as in lesion_speed_cnn.py)
    shapes = adapter.node_shapes(x[:1])
    flops_plain = 0.0
    layer_flops = {}
    for layer, sets in per_layer.items():
        plan = adapter.lesion_plan(layer)
        macs = [plan.macs(shapes, len(s)) for s in sets]
        flops_plain += sum(2.0 * len(y) * m["forward"] for m in macs)
        layer_flops[layer] = sum(2.0 * len(y) * m["lesion"] for m in macs)
    flops_fast = sum(layer_flops.values()) + 2.0 * len(y) * adapter.lesion_plan(0).macs(shapes, 1)["forward"]  # + cache fill

    t0 = time.perf_counter()
    ev = IncrementalLesions(adapter, x, y)
    t_fast = time.perf_counter() - t0
    fast_counts = {}
    for layer, sets in sorted(per_layer.items()):
        t1 = time.perf_counter()
        fast_counts[layer] = ev.correct_counts(layer, sets)
        dt = time.perf_counter() - t1
        t_fast += dt
        gflop = layer_flops[layer] / 1e9
        st = ev.last_stats
        skipped = st.get("silent", 0) + st.get("certified", 0)
        print(f"  incremental, layer {adapter.layer_names[layer]}: {len(sets)} lesions in {dt:6.2f} s, "
              f"{gflop:7.1f} GFLOP before skipping ({gflop / dt:5.1f} GFLOP/s); "
              f"pairs skipped exactly: {skipped / max(1, st.get('pairs', 0)):.1%}")

    t_plain, n_plain = 0.0, 0
    for layer, sets in per_layer.items():
        k = max(1, int(round(args.plain_fraction * len(sets))))
        t0 = time.perf_counter()
        plain = correct_counts_plain(adapter, layer, sets[:k], x, y)
        t_plain += (time.perf_counter() - t0) * len(sets) / k
        n_plain += k
        mismatch = np.abs(plain - fast_counts[layer][:k]).max()
        if mismatch > 0:
            print(f"  layer {adapter.layer_names[layer]}: max count difference {mismatch} (float32 rounding at near-ties)")
    extrap = "" if n_plain == n_lesions else f" (measured on {n_plain} lesions, extrapolated)"
    print(f"plain path:       {t_plain:8.2f} s{extrap}  {flops_plain / 1e9:9.1f} GFLOP")
    print(f"incremental path: {t_fast:8.2f} s  {flops_fast / 1e9:9.1f} GFLOP  (cache fill included)")
    print(f"ratio: {t_plain / t_fast:.1f}x time, {flops_plain / flops_fast:.1f}x FLOPs")


if __name__ == "__main__":
    sys.exit(main())
