"""ViT-B/16-sized model through modlens: capture, the four partitionings and the lesion test.

    OMP_NUM_THREADS=2 python benchmarks/vit_speed.py                      # the issue's size
    OMP_NUM_THREADS=1 python benchmarks/vit_speed.py --layers 3 --images 16 --n-random 3 --clusters 4

Random weights (``ViTForImageClassification`` from a ``ViTConfig`` with ViT-B/16's shape:
d_model 768, 12 heads, d_mlp 3,072, 224 x 224 images, 16 x 16 patches; ``--layers`` blocks,
12 by default = 36,864 MLP neurons), ``--images`` random images used both as activation data
and as the lesion test set (labels: the model's own predictions). Stages, each timed (wall
seconds) with the process's peak resident memory so far (``ru_maxrss``):

1. ``capture``: :class:`~modlens.nn.adapter.NetworkAdapter` (torch.export of the model);
2. ``weights/global``, ``weights/local``: residual-stream weight graph (kNN above 8,192 nodes)
   and spectral clustering;
3. ``activations/global``, ``activations/local``: token-aggregated activations, activation graph
   (kNN above 8,192 neurons), clustering;
4. ``lesion test``: every subcluster of ``weights/global`` and ``--n-random`` random controls,
   incremental engine (each lesion recomputes the network from the lesioned block's second MLP
   map on, attention included).

Not a test: times depend on the machine and on others sharing it. A full-size run (12 layers,
512 images) needs many CPU hours for the lesion stage on 2 cores (every lesion set re-runs
on average half of ViT-B on 512 images, ~4.5 TFLOP); use the flags to scale it down and say so.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import numpy as np
import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import transformers

    from modlens.experiments.lesion_test import lesion_test
    from modlens.nn import lesion_engine
    from modlens.experiments.partitioning import Partitioner
    from modlens.nn.adapter import NetworkAdapter

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--n-random", type=int, default=19)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--skip-lesions", action="store_true")
    ap.add_argument("--methods", default="weights/global,weights/local,activations/global,activations/local",
                    help="comma-separated partitionings to time (weights/global is always run for the lesion test)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=args.image_size, patch_size=16, hidden_size=768,
                                 num_hidden_layers=args.layers, num_attention_heads=12, intermediate_size=3072,
                                 num_labels=args.classes)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.rand(args.images, 3, args.image_size, args.image_size)
    with torch.no_grad():
        y = torch.cat([model(pixel_values=x[i:i + 16]).logits.argmax(-1) for i in range(0, len(x), 16)])
    rows = []

    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_rss_mb())})
        print(json.dumps(rows[-1]), flush=True)
        return out

    adapter = stage("capture", lambda: NetworkAdapter(model, x[:2], input_name="pixel_values"))
    print(json.dumps({"neurons": sum(adapter.layer_sizes), "graph_nodes": sum(adapter.node_layer_sizes())}))
    part = Partitioner(adapter, activation_data=x, n_clusters=args.clusters, random_state=0, batch_size=16)
    results = {}
    methods = args.methods.split(",")
    if not args.skip_lesions and "weights/global" not in methods:
        methods.insert(0, "weights/global")
    for method in methods:
        results[method] = stage(method, lambda m=method: part.partition(m))
    if not args.skip_lesions:
        table = stage("lesion test (weights/global)", lambda: lesion_test(
            lesion_engine("incremental", adapter, x, y), results["weights/global"], n_random=args.n_random,
            random_state=0))
        print(json.dumps({"lesion_sets": int(len(table))}))
    print(json.dumps({"args": vars(args), "total_seconds": round(sum(r["seconds"] for r in rows), 1),
                      "peak_rss_mb": round(_rss_mb())}))


if __name__ == "__main__":
    main()
