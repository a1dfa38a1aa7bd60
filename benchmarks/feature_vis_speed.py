"""Time the batched feature-visualization path against the one-image-at-a-time path.

The MNIST MLP shape (784-256x4-10, glorot-random weights), a weights/global partition with
k=16 and 19 random sets per subcluster, 100 Adam steps with jitter and scaling. The batched
path optimizes every objective in one optimization; the one-at-a-time path (the original
code's way, notes "other facts") is timed on a subset and extrapolated per objective.

    .venv/bin/python benchmarks/feature_vis_speed.py [--single 40] [--steps 100] [--threads N]
        [--repeats 3] [--mnist-epochs E --data-dir ../shared/data]

Both paths are timed ``--repeats`` times, interleaved, and the minimum and median are printed
(other jobs on a shared machine inflate single timings; the minimum is the least disturbed).
``--mnist-epochs E`` trains the MLP for E epochs on MNIST first (a trained network's
partition has more subclusters to test than a random one's).
"""

from __future__ import annotations

import argparse
import os
import functools
import time
from pathlib import Path

import numpy as np
import torch

from modlens.experiments import feature_vis as fv
from modlens.experiments.partitioning import partition
from modlens.nn import NetworkAdapter
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
    ap.add_argument("--data-dir", default=os.environ.get("MODLENS_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
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
    t0 = time.perf_counter()
    adapter = NetworkAdapter(model)
    part = partition(adapter, "weights/global", n_clusters=16, random_state=args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, partition {time.perf_counter() - t0:.1f} s")
    measure(adapter, part, (1, 28, 28), n_random=args.n_random, steps=args.steps, single=args.single,
            repeats=args.repeats, seed=args.seed)


def measure(adapter, part, input_shape, *, n_random: int = 19, steps: int = 100, single: int = 40, repeats: int = 3,
            seed: int = 0, max_objectives: int | None = None, say=functools.partial(print, flush=True)) -> dict:
    """Time the batched and the one-at-a-time paths on ``part``'s objectives (see the module
    docstring) and print the comparison with ``say``. ``max_objectives`` runs only the first that
    many objectives, evenly spaced over the table, in the batched path (a cap for large inputs); ``single`` of them are run one
    at a time. Returns ``{"batched_s", "single_s"}`` per objective (minimum over repeats),
    ``"n_objectives"`` (all of the partition's), ``"timed"`` (batched), ``"speedup"`` and ``"max_diff"``."""
    plan, rows, _ = fv._build_plan(adapter, part, input_shape, n_random=n_random, steps=steps, random_state=seed)
    n_all = len(rows)
    # a cap keeps objectives evenly spread over the table (so over the layers), not its first rows
    rows_run = np.unique(np.linspace(0, n_all - 1, max_objectives).round().astype(int)) \
        if max_objectives and max_objectives < n_all else np.arange(n_all)
    n = len(rows_run)
    n_layers = len(np.unique(plan.layers[rows_run]))
    say(f"objectives: {n_all} ({n_all // (n_random + 1)} true subclusters x (1 + {n_random} random)), "
        f"{n} timed batched, {n_layers} layers, {steps} steps, transforms {plan.transforms}, input {tuple(input_shape)}")
    device = next(adapter.model.parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    modules: dict = {}
    fv._optimize(adapter, plan, rows_run[:2], modules=modules)  # warm-up: traced modules, lazy init
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n, size=min(single, n), replace=False))  # positions in rows_run
    t_batched, t_single = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        images, _, _, _ = fv._optimize(adapter, plan, rows_run, modules=modules)
        sync()
        t_batched.append((time.perf_counter() - t0) / n)
        singles = []
        t0 = time.perf_counter()
        for i in subset:
            singles.append(fv._optimize(adapter, plan, [int(rows_run[i])], modules=modules)[0])
        sync()
        t_single.append((time.perf_counter() - t0) / len(subset))
    diff = float((torch.cat(singles) - images[torch.as_tensor(subset, device=images.device)]).abs().max())

    def ms(values):
        return f"min {1e3 * min(values):7.3f} ms, median {1e3 * float(np.median(values)):7.3f} ms per objective"

    say(f"batched:       {ms(t_batched)} ({n} objectives per run, {repeats} runs); "
        f"{steps * n_layers} forward+backward passes per run ({steps} steps x {n_layers} layer groups); "
        f"{min(t_batched) * n:.2f} s for {n}")
    say(f"one at a time: {ms(t_single)} ({len(subset)} objectives per run, {repeats} runs); "
        f"{steps * n} forward+backward passes for {n} ({steps} steps x {n} objectives); "
        f"extrapolated {min(t_single) * n:.1f} s for {n}")
    say(f"speed-up per objective: {min(t_single) / min(t_batched):.1f}x (min/min), "
        f"{np.median(t_single) / np.median(t_batched):.1f}x (median/median)")
    say(f"max |batched - single| over the {len(subset)} timed images: {diff:.2e}")
    return {"batched_s": min(t_batched), "single_s": min(t_single), "n_objectives": n_all, "timed": n,
            "speedup": min(t_single) / min(t_batched), "max_diff": diff}


if __name__ == "__main__":
    main()
