"""Time the batched feature-visualization path against the one-image-at-a-time path.

The MNIST MLP shape (784-256x4-10, glorot-random weights), a weights/global partition with
k=16 and 19 random sets per subcluster, 100 Adam steps with jitter and scaling. The batched
path optimizes every objective in one optimization; the one-at-a-time path (the original
code's way, notes "other facts") is timed on a subset and extrapolated per objective.

    .venv/bin/python benchmarks/feature_vis_speed.py [--single 40] [--steps 100] [--threads N]
        [--repeats 3] [--mnist-epochs E --data-dir /work/shared/data]

Both paths are timed ``--repeats`` times, interleaved, and the minimum and median are printed
(other jobs on a shared machine inflate single timings; the minimum is the least disturbed).
``--mnist-epochs E`` trains the MLP for E epochs on MNIST first (a trained network's
partition has more subclusters to test than a random one's).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from modlens.experiments import feature_vis as fv
from modlens.experiments.partitioning import partition
from modlens.nn.adapter import MLPAdapter
from modlens.nn.models import PAPER_MLP_HIDDEN, mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=int, default=40, help="objectives timed one at a time")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n-random", type=int, default=19)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mnist-epochs", type=int, default=0)
    ap.add_argument("--data-dir", default="/work/shared/data")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = mlp([784, *PAPER_MLP_HIDDEN, 10], generator=torch.Generator().manual_seed(args.seed)).eval()
    if args.mnist_epochs:
        from modlens.data import load_dataset
        from modlens.experiments.train import train_reference_mlp

        tr, te = (load_dataset("mnist", s, data_dir=args.data_dir, download=False) for s in ("train", "test"))
        t0 = time.perf_counter()
        model, info = train_reference_mlp(torch.as_tensor(tr.x), torch.as_tensor(tr.y), torch.as_tensor(te.x),
                                          torch.as_tensor(te.y), seed=args.seed, epochs=args.mnist_epochs)
        print(f"trained {args.mnist_epochs} epoch(s) on MNIST in {time.perf_counter() - t0:.0f} s: "
              f"{ {k: v for k, v in info.items() if 'acc' in k} }")
    adapter = MLPAdapter(model)
    t0 = time.perf_counter()
    part = partition(adapter, "weights/global", n_clusters=16, random_state=args.seed)
    t_part = time.perf_counter() - t0
    plan, rows, _ = fv._build_plan(adapter, part, (1, 28, 28), n_random=args.n_random, steps=args.steps,
                                   random_state=args.seed)
    n = len(rows)
    n_layers = len(np.unique(plan.layers))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, partition {t_part:.1f} s")
    print(f"objectives: {n} ({n // (args.n_random + 1)} true subclusters x (1 + {args.n_random} random)), "
          f"{n_layers} layers, {args.steps} steps, transforms {plan.transforms}")

    modules: dict = {}
    fv._optimize(adapter, plan, [0, 1], modules=modules)  # warm-up: traced modules, lazy init
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(n, size=min(args.single, n), replace=False))
    t_batched, t_single = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        images, _, _, _ = fv._optimize(adapter, plan, range(n), modules=modules)
        t_batched.append((time.perf_counter() - t0) / n)
        singles = []
        t0 = time.perf_counter()
        for i in subset:
            singles.append(fv._optimize(adapter, plan, [int(i)], modules=modules)[0])
        t_single.append((time.perf_counter() - t0) / len(subset))
    diff = float((torch.cat(singles) - images[torch.as_tensor(subset)]).abs().max())

    def ms(values):
        return f"min {1e3 * min(values):7.3f} ms, median {1e3 * float(np.median(values)):7.3f} ms per objective"

    print(f"batched:       {ms(t_batched)} ({n} objectives per run, {args.repeats} runs); "
          f"{args.steps * n_layers} forward+backward passes per run ({args.steps} steps x {n_layers} layer groups); "
          f"{min(t_batched) * n:.2f} s for all")
    print(f"one at a time: {ms(t_single)} ({len(subset)} objectives per run, {args.repeats} runs); "
          f"{args.steps * n} forward+backward passes for all ({args.steps} steps x {n} objectives); "
          f"extrapolated {min(t_single) * n:.1f} s for all")
    print(f"speed-up per objective: {min(t_single) / min(t_batched):.1f}x (min/min), "
          f"{np.median(t_single) / np.median(t_batched):.1f}x (median/median)")
    print(f"max |batched - single| over the {len(subset)} timed images (float32): {diff:.2e}")


if __name__ == "__main__":
    main()
