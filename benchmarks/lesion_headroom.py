"""How much faster could the MLP lesion stage get? Measurements behind benchmarks/README.md.

    python benchmarks/lesion_headroom.py --model DIR [--n-images 2000] [--every 8]

For a saved 784-256x4-10 MNIST MLP (``lesion_speed.py --save-model DIR`` writes one) this prints:

1. the throughput of the tail's matrix product, (rows x 256) @ (256 x 256), in float32 and in
   bfloat16, on this machine;
2. per hidden layer, the fraction of (lesion set, test image) pairs whose prediction the lesion
   changes: the most any exact skipping scheme could remove;
3. per hidden layer, the fraction of pairs a *certified bfloat16 screen* would settle: the tail
   run with bfloat16 products, with a rigorous elementwise bound on the difference from exact
   arithmetic carried through every layer as a second bfloat16 product with |W| (rounding of
   the inputs, weights and outputs, 2^-8 each, plus accumulation), and the prediction accepted
   where the top logit beats every other by more than both bounds. Every accepted pair is
   checked against float32 (a wrong acceptance would be a bug in the bound).

Lesion sets are random, of the sizes ``modlens analyze`` tests (the subclusters of the four
partitionings with 19 random sets each); every ``--every``-th set is used. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modlens.data import load_dataset
from modlens.experiments.lesion_test import random_sets
from modlens.experiments.partitioning import METHODS, Partitioner
from modlens.nn import NetworkAdapter
from modlens.nn.io import load_model
from modlens.study.commands import model_data

U = 2.0 ** -8  # unit roundoff of bfloat16


def gemm_rates(rows: int = 8192, width: int = 256, repeat: int = 20) -> dict[str, float]:
    x, w = torch.randn(rows, width), torch.randn(width, width)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        rates[str(dtype).removeprefix("torch.")] = 2 * rows * width * width * repeat / (time.perf_counter() - t0) / 1e9
    return rates


def screen(h: torch.Tensor, lins: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 run of ``relu -> lin -> relu -> ... -> lin`` on the pre-activation ``h``, and a
    bound (elementwise, rows x classes) on its distance from exact arithmetic."""
    c = 3 * U + 4 * U * U + 2e-5          # input, weight and output rounding, accumulation
    k = 1 + 8 * U                         # rounding of the bound's own product
    x = h.relu()
    e = torch.zeros_like(x)
    for i, lin in enumerate(lins):
        w = lin.weight
        z = (x.bfloat16() @ w.bfloat16().t() + lin.bias.bfloat16()).float()
        g = ((c * x + e).bfloat16() @ (w.abs() * k).bfloat16().t()).float() * k + 2 * U * lin.bias.abs()
        if i == len(lins) - 1:
            return z, g
        e = (g + z.clamp(max=0)).relu()   # |relu(z) - relu(z_exact)| <= this
        x = z.relu()
    raise ValueError("empty tail")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=os.environ.get("MODLENS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--every", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)

    rates = gemm_rates()
    print("tail product (8192 x 256) @ (256 x 256): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
          + f"; bfloat16 / float32 = {rates['bfloat16'] / rates['float32']:.1f}x")

    model, manifest = load_model(args.model)
    _, held_out = model_data(manifest, data_dir=args.data_dir)
    adapter = NetworkAdapter(model)
    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    x = torch.from_numpy(test.x[:args.n_images]).reshape(args.n_images, -1)
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    partitioner = Partitioner(adapter, activation_data=held_out, n_clusters=16)
    rng = np.random.default_rng(0)
    per_layer: dict[int, list[np.ndarray]] = {}
    for method in METHODS:
        for sc in partitioner.partition(method).subclusters():
            per_layer.setdefault(sc.layer, []).extend(random_sets(adapter.layers[sc.layer].n_neurons, sc.size, 20, rng))

    with torch.inference_mode():
        hs, zs, h = [x], [], x
        for lin in lins:
            zs.append(lin(h))
            h = zs[-1].relu()
            hs.append(h)
        base = zs[-1].argmax(1)
        for layer in sorted(per_layer):
            consumer, tail = lins[layer + 1], lins[layer + 2:]
            pairs = changed = settled = wrong = 0
            for s in per_layer[layer][::args.every]:
                idx = torch.as_tensor(s)
                z = zs[layer + 1] - hs[layer + 1][:, idx] @ consumer.weight[:, idx].T   # low-rank correction
                out = z
                for lin in tail:
                    out = lin(out.relu())
                pred = out.argmax(1)
                pairs += len(pred)
                changed += int((pred != base).sum())
                if tail:
                    zl, g = screen(z, tail)
                    top = zl.argmax(1, keepdim=True)
                    ok = (zl.gather(1, top) - zl > g.gather(1, top) + g).scatter_(1, top, True).all(1)
                    settled += int(ok.sum())
                    wrong += int((ok & (top.squeeze(1) != pred)).sum())
            line = f"layer {adapter.layer_names[layer]}: prediction changed in {changed / pairs:.2%} of {pairs} pairs"
            if tail:
                line += f"; certified bfloat16 screen settles {settled / pairs:.1%} (wrongly: {wrong})"
            print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
