"""Replicates trained together vs one by one, in the same run: time, ratio and equality.

    python benchmarks/train_replicates_speed.py [--arch mlp|cnn] [--seeds 0,1,2,3,4] [--epochs 2]
        [--data-dir ../shared/data] [--n-train N] [--device cpu|cuda] [--threads T]

Trains the replicates of the paper's recipe (MLP 784-256x4-10: batch 128; small CNN: batch 64) on
MNIST (5,000 training examples held out per seed, as ``modlens train``) twice: together
(:func:`modlens.experiments.replicates.train_replicates`) and one by one
(``train_reference``'s steps per seed, on the same device), and prints both times, their ratio,
the largest parameter difference between the paths and each replicate's test accuracy on both.
``--epochs`` defaults to 2 (the recipe's 20 take ten times as long; the ratio does not depend on
it); ``--n-train`` trains on the first N training examples only. Not a test: the numbers depend on
the machine, and on a shared machine on its load (the two paths run back to back to share it; the
process's CPU time is printed beside the wall time, as it is less disturbed by other jobs).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from modlens.experiments.replicates import train_replicates
from modlens.experiments.train import reference_info, reference_setup, train_classifier
from modlens.nn.models import build_model


def compare(architecture: dict, data, *, seeds, epochs: int, device: str = "cpu", n_val: int = 5000,
            conv: str = "grouped", batch_size: int | None = None) -> dict:
    """Train ``seeds`` together and one by one on ``data = (x_train, y_train, x_test, y_test)``;
    returns seconds of each path, the ratio, the largest parameter difference, the accuracies and
    the peak GPU memory of each path (``None`` on CPU)."""
    x_train, y_train, x_test, y_test = data
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    kw = dict(epochs=epochs, n_val=n_val, batch_size=batch_size)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    together = train_replicates(architecture, x_train, y_train, x_test, y_test, seeds=seeds, together="together",
                                conv=conv, device=dev, **kw)
    sync()
    t_together, c_together = time.perf_counter() - t0, time.process_time() - c0
    mem_together = torch.cuda.max_memory_allocated(dev) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    alone = [train_alone(architecture, data, seed=s, device=dev, **kw) for s in seeds]
    sync()
    t_alone, c_alone = time.perf_counter() - t0, time.process_time() - c0
    mem_alone = torch.cuda.max_memory_allocated(dev) if cuda else None
    diffs, identical = [], []
    for (m1, _), (m2, _) in zip(together, alone):
        pairs = list(zip(m1.state_dict().values(), m2.state_dict().values()))
        diffs.append(max(float((a.float() - b.float()).abs().max()) for a, b in pairs))
        identical.append(all(torch.equal(a, b) for a, b in pairs))
    return {
        "seconds_together": t_together, "seconds_one_by_one": t_alone, "ratio": t_alone / t_together,
        "cpu_seconds_together": c_together, "cpu_seconds_one_by_one": c_alone, "cpu_ratio": c_alone / c_together,
        "max_param_diff": max(diffs), "bit_identical": identical,
        "acc_together": [i["test_accuracy"] for _, i in together], "acc_one_by_one": [i["test_accuracy"] for _, i in alone],
        "peak_gpu_bytes_together": mem_together, "peak_gpu_bytes_one_by_one": mem_alone,
    }


def train_alone(architecture: dict, data, *, seed: int, device: torch.device, epochs: int, n_val: int,
                batch_size: int | None):
    """``train_reference`` (the single path) with the model on ``device``: same setup, same streams."""
    x_train, y_train, x_test, y_test = data
    setup = reference_setup(architecture, x_train, y_train, x_test, y_test, seed=seed, val_seed=None, epochs=epochs,
                            batch_size=batch_size, n_val=n_val, weight_decay_l2=None, augment=None)
    model = build_model(setup["architecture"], generator=torch.Generator().manual_seed(seed)).to(device)
    t = torch.from_numpy(setup["train_idx"])
    hist = train_classifier(model, x_train[t], y_train[t], epochs=setup["epochs"], batch_size=setup["batch_size"],
                            lr=setup["lr"], seed=seed, weight_decay_l2=setup["weight_decay_l2"], augment=setup["augment"])
    return model, reference_info(model, setup, hist, x_train, y_train, x_test, y_test, seed=seed)


def report(name: str, res: dict) -> str:
    mem = "" if res["peak_gpu_bytes_together"] is None else (
        f"; peak GPU memory together {res['peak_gpu_bytes_together'] / 2**30:.2f} GiB, "
        f"one by one {res['peak_gpu_bytes_one_by_one'] / 2**30:.2f} GiB")
    acc = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(res["acc_together"], res["acc_one_by_one"]))
    return (f"{name}: together {res['seconds_together']:.1f} s, one by one {res['seconds_one_by_one']:.1f} s, "
            f"ratio {res['ratio']:.2f}x (CPU time of this process: {res['cpu_seconds_together']:.1f} s vs "
            f"{res['cpu_seconds_one_by_one']:.1f} s, {res['cpu_ratio']:.2f}x); max |param diff| {res['max_param_diff']:.2e}, bit-identical "
            f"{sum(res['bit_identical'])}/{len(res['bit_identical'])}; test accuracy together/alone: {acc}{mem}")


#: (in, out, side) of the CIFAR VGG's 13 convolutions at 32x32 inputs
VGG_CONV_SHAPES = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 256, 8),
                   (256, 512, 4), (512, 512, 4), (512, 512, 4), (512, 512, 2), (512, 512, 2), (512, 512, 2)]


def vgg_conv_batching(replicates: int = 5, batch: int = 16, repeats: int = 2, device: str = "cpu",
                      shapes=VGG_CONV_SHAPES) -> dict:
    """Forward + backward of every CIFAR VGG convolution for ``replicates`` networks: one grouped
    convolution per layer vs one convolution per replicate; CPU seconds (best of ``repeats``)."""
    import torch.nn.functional as F

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    out = {"grouped_s": 0.0, "separate_s": 0.0}
    for c_in, c_out, side in shapes:
        x = torch.randn(batch, replicates * c_in, side, side, generator=g).to(dev)
        w = (0.05 * torch.randn(replicates * c_out, c_in, 3, 3, generator=g)).to(dev).requires_grad_()
        for mode in ("grouped", "separate"):
            best = float("inf")
            for _ in range(repeats):
                c0 = time.process_time() if dev.type == "cpu" else time.perf_counter()
                if mode == "grouped":
                    y = F.conv2d(x, w, padding=1, groups=replicates)
                else:
                    y = torch.cat([F.conv2d(xc, wc, padding=1) for xc, wc in
                                   zip(x.chunk(replicates, 1), w.chunk(replicates, 0))], 1)
                y.square().sum().backward()
                w.grad = None
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best = min(best, (time.process_time() if dev.type == "cpu" else time.perf_counter()) - c0)
            out[f"{mode}_s"] += best
    out["ratio"] = out["separate_s"] / out["grouped_s"]
    return out


def step_times(replicates: int = 5, batch: int = 128, steps: int = 20, sizes=(784, 256, 256, 256, 256, 10)) -> dict:
    """CPU milliseconds of one training step (forward, backward, Adam) of ``replicates`` MLPs:
    stacked vs one by one, random data, best of two rounds of ``steps`` steps."""
    import torch.nn.functional as F

    from modlens.experiments._stacked import StackedNet

    arch = {"type": "mlp", "sizes": list(sizes)}
    models = [build_model(arch, generator=torch.Generator().manual_seed(s)) for s in range(replicates)]
    net = StackedNet(models)
    opt = torch.optim.Adam(net.params, lr=1e-3, eps=1e-7)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-7) for m in models]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(replicates, batch, sizes[0], generator=g), torch.randint(0, sizes[-1], (replicates, batch), generator=g)

    def together():
        logits = net(x)
        ce = torch.stack([F.cross_entropy(logits[r], y[r]) for r in range(replicates)])
        opt.zero_grad(set_to_none=True)
        ce.sum().backward()
        opt.step()

    def alone():
        for r, (m, o) in enumerate(zip(models, opts)):
            ce = F.cross_entropy(m(x[r]), y[r])
            o.zero_grad(set_to_none=True)
            ce.backward()
            o.step()

    best = {"together_ms": float("inf"), "one_by_one_ms": float("inf")}
    for _ in range(2):
        for key, fn in (("together_ms", together), ("one_by_one_ms", alone)):
            fn()
            c0 = time.process_time()
            for _ in range(steps):
                fn()
            best[key] = min(best[key], 1e3 * (time.process_time() - c0) / steps)
    best["ratio"] = best["one_by_one_ms"] / best["together_ms"]
    return best


def load_mnist(data_dir: str, n_train: int | None = None):
    from modlens.data import load_dataset

    tr, te = (load_dataset("mnist", s, data_dir=data_dir, download=False) for s in ("train", "test"))
    x, y = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    if n_train:
        x, y = x[:n_train], y[:n_train]
    return x, y, torch.from_numpy(te.x), torch.from_numpy(te.y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("MODLENS_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--conv", choices=["grouped", "loop"], default="grouped")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vgg-convs", action="store_true", help="instead: time the CIFAR VGG's convolutions (forward + "
                    "backward) of 5 replicates as grouped convolutions vs one by one (does batching the VGG pay?)")
    ap.add_argument("--batch", type=int, default=16, help="batch of --vgg-convs")
    ap.add_argument("--step", action="store_true", help="instead: CPU time of one training step of the 5 MLPs, "
                    "stacked vs one by one (random data, batch 128)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.step:
        res = step_times(len(seeds))
        print(f"one step of {len(seeds)} MLPs 784-256x4-10 at batch 128, {torch.get_num_threads()} threads, CPU time: "
              f"together {res['together_ms']:.1f} ms, one by one {res['one_by_one_ms']:.1f} ms, ratio {res['ratio']:.2f}x")
        return
    if args.vgg_convs:
        res = vgg_conv_batching(len(seeds), args.batch, device=args.device)
        print(f"CIFAR VGG convolutions, forward+backward, {len(seeds)} replicates, batch {args.batch}, "
              f"{torch.get_num_threads()} threads: grouped {res['grouped_s']:.2f} s, one by one {res['separate_s']:.2f} s "
              f"(CPU time on a CPU), ratio {res['ratio']:.2f}x")
        return
    data = load_mnist(args.data_dir, args.n_train)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"{len(seeds)} {args.arch} replicates, {args.epochs} epoch(s), {len(data[0]) - args.n_val} training examples each")
    res = compare({"type": args.arch}, data, seeds=seeds, epochs=args.epochs, device=args.device,
                  n_val=args.n_val, conv=args.conv)
    print(report(f"{args.arch} x{len(seeds)}", res))


if __name__ == "__main__":
    main()
