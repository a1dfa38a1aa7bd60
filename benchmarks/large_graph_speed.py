"""Graph and clustering stages at ViT-B/16 size: 12 blocks x 3,072 MLP neurons = 36,864 nodes.

    OMP_NUM_THREADS=2 python benchmarks/large_graph_speed.py [--samples 512] [--k 64] [--clusters 16]

Stages, each timed (wall seconds) with its peak traced memory (``tracemalloc``: NumPy's arrays
are traced) and the process's peak resident memory so far (``ru_maxrss``):

1. ``activations``: a synthetic ``(512, 36864)`` matrix of per-sample, token-aggregated
   activations (random but correlated: each unit loads on one of 64 latent factors plus noise,
   then ``|.|`` as an L1 over tokens would give; no model is run, no tokens are simulated);
2. ``knn_activation_graph``: squared Spearman kNN graph (``k`` per neuron, float64, chunked);
3. ``cluster activations``: spectral clustering into 16 clusters with ``core.spectral_large``
   (``--solver lanczos``, the default for large sparse graphs, or ``amg``);
4. ``residual weight graph``: :func:`modlens.core.residual_graph.residual_weight_graph` in kNN
   mode on random ViT-B/16-shaped weights (d_model 768, d_mlp 3,072, 12 blocks, LayerNorm
   scales, a 768 x 768 patch projection as the 768 input nodes, a 1,000-class head), float32
   products, one block pair at a time;
5. ``cluster weights``: the same clustering on that graph.

The dense float64 activation graph would be 36,864^2 x 8 B = 10.9 GB per copy; it is never
built. Not a test: times depend on the machine (and on others sharing it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc

import numpy as np

from modlens.core.clustering import spectral_labels
from modlens.core.knn_graph import knn_activation_graph
from modlens.core.residual_graph import MLPBlockWeights, residual_weight_graph

N_BLOCKS, D_MODEL, D_MLP, N_CLASSES = 12, 768, 3072, 1000


def stage(name, fn, report):
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    row = {
        "stage": name,
        "seconds": round(seconds, 1),
        "peak_traced_mb": round(peak / 2**20),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    report.append(row)
    print(json.dumps(row), flush=True)
    return out


def synthetic_activations(m: int, rng) -> np.ndarray:
    n = N_BLOCKS * D_MLP
    factor = rng.integers(0, 64, size=n)
    latent = rng.standard_normal((m, 64))
    x = np.empty((m, n))
    for lo in range(0, n, 4096):  # fill in slices to keep the transient small
        hi = min(lo + 4096, n)
        x[:, lo:hi] = np.abs(latent[:, factor[lo:hi]] + 1.5 * rng.standard_normal((m, hi - lo)))
    return x


def vit_b_weights(rng):
    s_in, s_out = D_MODEL**-0.5, D_MLP**-0.5
    blocks = [
        MLPBlockWeights(
            w_in=(rng.standard_normal((D_MLP, D_MODEL), dtype=np.float32) * s_in),
            w_out=(rng.standard_normal((D_MODEL, D_MLP), dtype=np.float32) * s_out),
            gamma=rng.uniform(0.5, 1.5, size=D_MODEL).astype(np.float32),
        )
        for _ in range(N_BLOCKS)
    ]
    embedding = rng.standard_normal((D_MODEL, 3 * 16 * 16), dtype=np.float32) * (3 * 16 * 16) ** -0.5
    head = rng.standard_normal((N_CLASSES, D_MODEL), dtype=np.float32) * s_in
    return blocks, embedding, head, rng.uniform(0.5, 1.5, size=D_MODEL).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", default="lanczos", choices=["lanczos", "amg"])
    args = ap.parse_args()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, cpus={os.cpu_count()}, "
          f"nodes={N_BLOCKS * D_MLP}, samples={args.samples}, k={args.k}, clusters={args.clusters}")
    rng = np.random.default_rng(args.seed)
    report: list[dict] = []
    tracemalloc.start()
    t_all = time.perf_counter()

    acts = stage("activations (synthetic)", lambda: synthetic_activations(args.samples, rng), report)
    graph = stage("knn_activation_graph", lambda: knn_activation_graph(acts, args.k), report)
    del acts
    labels = stage("cluster activations",
                   lambda: spectral_labels(graph, args.clusters, random_state=0, eigen_solver=args.solver), report)
    print(f"  activation graph: nnz {graph.nnz}, cluster sizes {np.bincount(labels[labels >= 0]).tolist()}, "
          f"unclustered {int((labels < 0).sum())}")
    del graph

    blocks, emb, head, gf = stage("weights (random ViT-B/16 MLPs)", lambda: vit_b_weights(rng), report)
    wgraph, sizes = stage(
        "residual weight graph (kNN)",
        lambda: residual_weight_graph(blocks, embedding=emb, head=head, final_gamma=gf,
                                      mode="knn", k=args.k, dtype=np.float32),
        report,
    )
    wlabels = stage("cluster weights",
                    lambda: spectral_labels(wgraph, args.clusters, random_state=0, eigen_solver=args.solver), report)
    print(f"  weight graph: layers {sizes}, nnz {wgraph.nnz}, "
          f"cluster sizes {np.bincount(wlabels[wlabels >= 0]).tolist()}")
    total = time.perf_counter() - t_all
    peak = max(r["max_rss_mb"] for r in report)
    print(json.dumps({"total_seconds": round(total, 1), "peak_rss_mb": peak, "under_12_gb": peak < 12 * 1024}))


if __name__ == "__main__":
    main()
