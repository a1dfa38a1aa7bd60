"""Training speed of the paper's small CNN on MNIST: each layout/compilation path against the plain one.

    python benchmarks/cnn_train_speed.py [--data-dir ../shared/data] [--threads 2] [--steps 40] [--rounds 5]
        [--paths plain,channels_last,compiled] [--check-steps 20] [--epoch] [--profile]

The recipe (conv64-conv64-maxpool-conv64-maxpool-dense128-dense10, Adam lr 1e-3, eps 1e-7, batch 64,
fp32, the seed's initialization and batch order, 55,000 training examples) is the same on every path;
the paths differ only in how the arithmetic is laid out:

* ``plain``: contiguous (NCHW) parameters and batches, as ``train_classifier`` did before;
* ``channels_last``: parameters and batches in the channels-last (NHWC) layout, which oneDNN's
  convolutions and max-pooling take natively (``train_classifier(memory_format="channels_last")``,
  the CPU default for conv nets);
* ``compiled``: ``channels_last`` with the model wrapped in ``torch.compile`` (inductor, C++ backend);
  its compile time is printed apart and set against the recipe's 8,600 steps.

Every path trains its own copy of the seed-0 network on the same batches in the recipe's order. The
timed steps are interleaved (``--rounds`` rounds of ``--steps`` steps per path, each path continuing
where it stopped), so that a shared machine's load falls on all paths alike; per path the median
of the per-round step times is reported, and its ratio to the plain path's. FLOPs per step are counted
from the layer shapes (2 x multiply-adds: forward, input gradients of every layer but the first,
weight gradients). ``--check-steps`` first trains each path that many steps from the same
initialization and prints the largest parameter difference to the plain path (float32 rounding:
the layouts sum in other orders). ``--epoch`` also times one full epoch per path through
``train_classifier``. Not a test: the numbers depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modlens.data import load_dataset
from modlens.experiments.train import split_validation, train_classifier
from modlens.nn.models import build_model

PATHS = ("plain", "channels_last", "compiled")


#: ../shared/data relative to the project root (the shared data folder of a checkout)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

def step_macs(model: nn.Module, input_shape=(1, 28, 28)) -> dict[str, int]:
    """Multiply-adds per sample of one training step, by layer: forward, input gradient (not for
    the first layer), weight gradient."""
    x = torch.zeros(1, *input_shape)
    rows: dict[str, int] = {}
    first = True
    for name, m in model.named_children():
        y = m(x)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fwd = (y.numel() * m.in_channels // m.groups * int(np.prod(m.kernel_size))
                   if isinstance(m, nn.Conv2d) else m.in_features * m.out_features)
            rows[name] = fwd * (2 if first else 3)
            first = False
        x = y
    return rows


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """The recipe's batches: a permutation per epoch from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            yield x[idx], y[idx]


CLOCK = [time.perf_counter]   # --clock cpu: time.process_time
COMPILE_S: list[float] = []   # first-step times of compiled paths (the first one pays the compilation)


class Path_:
    def __init__(self, name: str, model: nn.Module, data, batch: int, seed: int):
        self.name = name
        self.model = copy.deepcopy(model).train()
        self.cl = name in ("channels_last", "compiled")
        if self.cl:
            self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
        self.fn = self.model
        self.compile_s = 0.0
        self.batches = _batches(*data, batch, seed)
        self.times: list[float] = []
        if name == "compiled":
            self.fn = torch.compile(self.model)
            t0 = time.perf_counter()
            self.step()
            self.compile_s = time.perf_counter() - t0
            COMPILE_S.append(self.compile_s)

    def step(self) -> None:
        xb, yb = next(self.batches)
        if self.cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.fn(xb), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def run(self, n: int) -> float:
        t0 = CLOCK[0]()
        for _ in range(n):
            self.step()
        dt = (CLOCK[0]() - t0) / n
        self.times.append(dt)
        return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("MODLENS_DATA") or str(SHARED_DATA),
                    help="MNIST folder root (default: $MODLENS_DATA, else ../shared/data beside the project)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--paths", default="plain,channels_last", help=f"comma-separated, from {','.join(PATHS)}")
    ap.add_argument("--steps", type=int, default=40, help="steps per path and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--check-steps", type=int, default=20, help="steps from one initialization for the equality check")
    ap.add_argument("--epoch", action="store_true", help="also time one full epoch per path with train_classifier")
    ap.add_argument("--profile", action="store_true", help="print the top operators of 10 steps per path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time the steps by wall clock or by the process's CPU time (steadier on a shared machine)")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.paths.split(",")
    if "plain" not in paths or any(p not in PATHS for p in paths):
        sys.exit(f"--paths must include plain and name only {PATHS}")
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    train = load_dataset("mnist", "train", data_dir=args.data_dir)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    tr, _ = split_validation(len(x), 5000, args.seed)
    x, y = x[torch.from_numpy(tr)], y[torch.from_numpy(tr)]
    model = build_model({"type": "cnn", "input_shape": [1, 28, 28], "n_classes": 10},
                        generator=torch.Generator().manual_seed(args.seed))
    macs = step_macs(model)
    flop_step = 2 * 64 * sum(macs.values())
    steps_epoch = -(-len(x) // 64)
    say(f"small CNN, MNIST ({len(x)} training examples, batch 64, {steps_epoch} steps per epoch); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    say("multiply-adds per sample and step: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in macs.items())
        + f"; {flop_step / 1e9:.2f} GFLOP per step, {flop_step * steps_epoch / 1e12:.2f} TFLOP per epoch")

    if args.check_steps:
        ref = None
        for name in paths:
            p = Path_(name, model, (x, y), 64, args.seed)
            for _ in range(args.check_steps - (1 if name == "compiled" else 0)):
                p.step()
            params = [t.detach().contiguous() for t in p.model.parameters()]
            if ref is None:
                ref = params
                continue
            diff = max(float((a - b).abs().max()) for a, b in zip(params, ref))
            scale = max(float(b.abs().max()) for b in ref)
            say(f"after {args.check_steps} steps from one initialization: {name} vs plain, largest parameter "
                f"difference {diff:.2e} (largest parameter {scale:.2f})")

    runs = [Path_(name, model, (x, y), 64, args.seed) for name in paths]
    if COMPILE_S:
        say(f"compiled: first step (compilation) {COMPILE_S[0]:.1f} s; later instances of the same model "
            f"{COMPILE_S[-1]:.1f} s (inductor's caches)")
        for _ in range(args.warmup):
            p.step()
    c0 = time.process_time()
    for r in range(args.rounds):
        line = [f"round {r + 1}:"]
        for p in runs:
            line.append(f"{p.name} {p.run(args.steps) * 1e3:.1f} ms")
        say(" ".join(line) + f"  (load {os.getloadavg()[0]:.2f})")
    say(f"process CPU time of the timed steps: {time.process_time() - c0:.1f} s")
    base = statistics.median(runs[0].times)
    say(f"per-step times by {args.clock} clock")
    say(f"{'path':>14} {'ms/step (median)':>16} {'min':>7} {'GFLOP/s':>8} {'epoch s':>8} {'ratio':>6}")
    for p in runs:
        med = statistics.median(p.times)
        extra = f" (+{COMPILE_S[0]:.0f} s compile once)" if p.compile_s else ""
        say(f"{p.name:>14} {med * 1e3:16.1f} {min(p.times) * 1e3:7.1f} {flop_step / med / 1e9:8.0f} "
            f"{med * steps_epoch:8.0f} {base / med:6.2f}x{extra}")

    if args.profile:
        from torch.profiler import profile
        for p in runs:
            with profile() as prof:
                for _ in range(10):
                    p.step()
            say(f"--- {p.name}: top operators over 10 steps (self CPU time)")
            say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))

    if args.epoch:
        for name in [n for n in paths if n != "compiled"]:
            m = copy.deepcopy(model)
            fmt = "contiguous" if name == "plain" else "channels_last"
            t0, c0 = time.perf_counter(), time.process_time()
            hist = train_classifier(m, x, y, epochs=1, batch_size=64, seed=args.seed, memory_format=fmt)
            say(f"one epoch, {name}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU, "
                f"loss {hist['loss'][0]:.5f} (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
