"""Every GPU figure in one call: lesions, feature visualization, Spearman, replicate training, memory.

    python benchmarks/gpu_suite.py                         # on a machine with a CUDA GPU, < 5 minutes
    python benchmarks/gpu_suite.py --device cpu --tiny     # the same code paths at toy sizes (tests)

Stages (random weights and random images unless noted; each prints its own lines, then the peak
GPU memory it allocated, and the suite ends with a summary table):

1. lesion stage, incremental vs plain (``lesion_speed_cnn.measure``): the paper's CIFAR VGG on
   10,000 32x32 images and VGG-16 on 2,000 224x224 images; conv channels split at random into
   k=16 clusters per layer, 19 random sets per subcluster; per layer 40 (CIFAR) or 8 (VGG-16)
   incremental and 2 plain lesions are timed and extrapolated to all lesions of the layer.
2. feature visualization, batched vs one image at a time (``feature_vis_speed.measure``), at 32
   pixels (CIFAR VGG) and 224 pixels (VGG-16), on objectives spread evenly over the layers.
3. squared Spearman correlations of a 4,224-neuron graph (the VGG's conv channels) over
   ``--spearman-samples`` samples: torch on the GPU vs numpy/scipy on the CPU, and their max difference.
4. replicates trained together vs one by one (``train_replicates_speed.compare``): 5 MLPs
   784-256x4-10 on MNIST if ``--data-dir`` holds it, else on random MNIST-shaped data, ``--epochs``.
5. next-token lesions of a GPT-2-small-sized decoder (``lm_speed.run``: 12 blocks, 3,072 MLP units,
   vocabulary 50,257, context 128, random weights; 8 test sequences): seconds per lesion set at the
   first, middle and last block, and the lesion stage of four partitionings at k = 16 projected
   from them (issue 18).

Without a CUDA device it refuses in one line (exit code 2), unless ``--device cpu --tiny``: tiny
models, images and sample counts that exercise every stage in seconds (this is what the tests run).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import feature_vis_speed  # noqa: E402  (benchmarks/ helpers)
import lesion_speed_cnn  # noqa: E402
import lm_speed  # noqa: E402
import train_replicates_speed  # noqa: E402

from modlens.core import graph  # noqa: E402
from modlens.core.partition import Partition  # noqa: E402
from modlens.nn import spearman_graph_torch  # noqa: E402
from modlens.nn.adapter import NetworkAdapter  # noqa: E402

#: Full sizes (a GPU) and tiny ones (``--tiny``: a CPU check of the code paths).
SIZES = {
    "full": dict(cifar_images=10_000, vgg16_images=2_000, vgg16_size=224, lesion_layers=None, lesions_per_layer=40,
                 vgg16_lesions_per_layer=8,
                 vis_steps=100, vis32_objectives=520, vis224_objectives=52, vis_single=8, spearman_samples=5_000,
                 spearman_neurons=4_224, replicate_train=60_000, replicate_epochs=1, repeats=1, arch=None, k=16),
    "tiny": dict(cifar_images=6, vgg16_images=2, vgg16_size=32, lesion_layers=1, lesions_per_layer=2,
                 vgg16_lesions_per_layer=2,
                 vis_steps=2, vis32_objectives=4, vis224_objectives=2, vis_single=1, spearman_samples=40,
                 spearman_neurons=64, replicate_train=300, replicate_epochs=1, repeats=1,
                 arch={"convs": (4, "M", 4, "M", 8, "M", 8, "M", 8, "M"), "dense": 16}, k=2),
}


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak so far)"


def _random_partition(adapter: NetworkAdapter, k: int, seed: int = 0) -> Partition:
    rng = np.random.default_rng(seed)
    labels = [rng.permutation(np.arange(w) % min(k, w)) for w in adapter.layer_sizes]
    return Partition.from_labels(labels, adapter.layer_names, adapter.layer_sizes, method="per-layer")


def _vis_model(case: str, size: int, device: torch.device, arch: dict | None) -> NetworkAdapter:
    spec = lesion_speed_cnn.CASES[case]
    torch.manual_seed(0)
    model = spec["build"](spec["classes"], **(arch or {}))
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        model.train()
        with torch.no_grad():
            model(torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return NetworkAdapter(model.eval().to(device))


def spearman_stage(n: int, m: int, device: torch.device, say) -> dict:
    """Squared Spearman of an (n, m) random activation matrix (4 layers' worth, ties included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    x[:, : m // 8] = x[:, : m // 8].clamp(min=0)  # ReLU-like columns: many tied zeros
    layers = list(torch.tensor_split(x, 4, dim=1))
    t0 = time.perf_counter()
    cpu = graph.activation_graph([t.numpy() for t in layers])
    t_cpu = time.perf_counter() - t0
    on_dev = [t.to(device) for t in layers]
    spearman_graph_torch([t[:8] for t in on_dev])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dev = spearman_graph_torch(on_dev)
    t_dev = time.perf_counter() - t0
    diff = float(np.abs(cpu - dev).max())
    say(f"Spearman^2, {m} neurons x {n} samples: CPU (numpy/scipy) {t_cpu:.2f} s, torch on {device} {t_dev:.3f} s, "
        f"ratio {t_cpu / t_dev:.1f}x, max |difference| {diff:.1e}")
    return {"cpu_s": t_cpu, "device_s": t_dev, "ratio": t_cpu / t_dev, "max_diff": diff}


def replicate_data(data_dir: str | None, n_train: int):
    if data_dir and (Path(data_dir) / "mnist").is_dir():
        x, y, xt, yt = train_replicates_speed.load_mnist(data_dir)
        return (x[:n_train], y[:n_train], xt, yt), "MNIST"
    g = torch.Generator().manual_seed(0)
    x, xt = torch.rand(n_train, 1, 28, 28, generator=g), torch.rand(2_000, 1, 28, 28, generator=g)
    y, yt = torch.randint(0, 10, (n_train,), generator=g), torch.randint(0, 10, (2_000,), generator=g)
    return (x, y, xt, yt), "random MNIST-shaped data"


def run(device: str = "cuda", tiny: bool = False, data_dir: str | None = None, say=None) -> dict:
    """Run every stage on ``device`` (device-agnostic); returns ``{stage: figures}``, each with ``"peak"``."""
    say = say or (lambda m: print(m, flush=True))
    sz = SIZES["tiny" if tiny else "full"]
    dev = torch.device(device)
    results: dict[str, dict] = {}
    started = time.perf_counter()

    def stage(name, fn):
        say(f"\n== {name} ==")
        _peak_reset(dev)
        t0 = time.perf_counter()
        out = fn()
        out["peak"], out["wall_s"] = _peak(dev), time.perf_counter() - t0
        say(f"peak memory of this stage: {out['peak']}; stage wall time {out['wall_s']:.1f} s")
        results[name] = out

    lesion = dict(device=dev, partition="per-layer", n_clusters=sz["k"], plain_per_layer=1 if tiny else 2,
                  repeats=sz["repeats"], max_layers=sz["lesion_layers"], arch=sz["arch"], say=say)
    if tiny:
        say("TINY sizes: small networks and images, to check the code paths; the figures mean nothing")
    stage("lesions: CIFAR VGG, incremental vs plain", lambda: lesion_speed_cnn.measure(
        "cifar-vgg", n_images=sz["cifar_images"], full_images=sz["cifar_images"],
        fast_per_layer=sz["lesions_per_layer"], **lesion))
    stage("lesions: VGG-16, incremental vs plain", lambda: lesion_speed_cnn.measure(
        "imagenet-vgg16", n_images=sz["vgg16_images"], full_images=sz["vgg16_images"], image_size=sz["vgg16_size"],
        fast_per_layer=sz["vgg16_lesions_per_layer"], **lesion))
    for case, size, cap in (("cifar-vgg", 32, sz["vis32_objectives"]), ("imagenet-vgg16", sz["vgg16_size"], sz["vis224_objectives"])):
        def vis(case=case, size=size, cap=cap):
            adapter = _vis_model(case, size, dev, sz["arch"])
            part = _random_partition(adapter, sz["k"])
            return feature_vis_speed.measure(adapter, part, (3, size, size), steps=sz["vis_steps"], single=sz["vis_single"],
                                             repeats=1, max_objectives=cap, say=say)
        stage(f"feature visualization at {size} px ({case}), batched vs one at a time", vis)
    stage(f"Spearman, {sz['spearman_neurons']}-neuron graph: {device} vs CPU",
          lambda: spearman_stage(sz["spearman_samples"], sz["spearman_neurons"], dev, say))

    def replicates():
        data, what = replicate_data(data_dir, sz["replicate_train"])
        n_val = min(5_000, len(data[0]) // 10)
        say(f"5 MLP replicates on {what}: {len(data[0]) - n_val} training examples each, {sz['replicate_epochs']} epoch(s)")
        res = train_replicates_speed.compare({"type": "mlp"}, data, seeds=[0, 1, 2, 3, 4], epochs=sz["replicate_epochs"],
                                             device=device, n_val=n_val)
        say(train_replicates_speed.report("mlp x5", res))
        return res
    stage("replicates trained together vs one by one", replicates)

    def language_model():
        res = lm_speed.run(tiny=tiny, device=device, stages=("capture", "lesions"), sets=2 if tiny else 4, say=say)
        les = res["stages"]["lesions"]
        say(f"projected next-token lesion stage: {les['projected_sets']} sets x {les['mean_per_set_s']:.3f} s = "
            f"{les['projected_s'] / 3600:.2f} h")
        return {"per_set_s": les["mean_per_set_s"], "projected_s": les["projected_s"],
                "capture_s": res["stages"]["capture"]["seconds"]}
    stage("next-token lesions, GPT-2-small-sized decoder", language_model)

    say(f"\n== summary ({time.perf_counter() - started:.0f} s in all, device {device}"
        f"{' ' + torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''}{', TINY sizes' if tiny else ''}) ==")
    for name, out in results.items():
        keys = [k for k in ("ratio", "speedup", "plain_s", "incremental_s", "batched_s", "single_s", "cpu_s", "device_s",
                            "seconds_together", "seconds_one_by_one", "per_set_s", "projected_s") if k in out]
        figures = ", ".join(f"{k} {out[k]:.3g}" for k in keys)
        say(f"{name}: {figures}; peak {out['peak']}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths in seconds, measures nothing")
    ap.add_argument("--data-dir", default=None, help="folder with mnist/ for the replicate stage (default: random data)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or use --device cpu --tiny to check its code paths", file=sys.stderr)
        return 2
    if dev.type != "cuda" and not args.tiny:
        print(f"gpu_suite: measures GPU figures and refuses --device {args.device} at full size; "
              "add --tiny to check its code paths on the CPU", file=sys.stderr)
        return 2
    run(args.device, tiny=args.tiny, data_dir=args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
