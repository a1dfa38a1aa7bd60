"""Dense vs sparse kNN neuron graphs: where to switch, and how much the partition changes.

    python benchmarks/knn_vs_dense.py scaling [--sizes 1024 2048 4096 8192] [--samples 512]
    python benchmarks/knn_vs_dense.py solvers [--sizes 2048 4096 8192]
    python benchmarks/knn_vs_dense.py mnist --model DIR [--data-dir DIR] [--ks 16 32 64 128]

``scaling``: for each node count ``n``, activations of ``n`` units over ``--samples`` samples
(synthetic: 16 planted blocks of units sharing a latent factor plus noise, passed through
``exp``; random-but-correlated, for timing only) go through the dense path
(``graph.activation_graph`` + ``spectral_labels`` with its default solver) and the kNN path
(``knn_activation_graph`` + ``spectral_labels(eigen_solver="lanczos")``), 16 clusters. Each
(path, n) runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its own;
printed: seconds per stage, peak RSS, and the ARI of the partition against the planted blocks.

``solvers``: the same kNN graphs clustered with plain LOBPCG (scikit-learn) and with
``core.spectral_large``'s Lanczos and AMG-preconditioned LOBPCG: seconds and ARI against the
planted blocks.

``mnist``: a trained MNIST MLP (``modlens train --dataset mnist``; 4 x 256 = 1,024 hidden
units); its pre-activations over the held-out activation split recorded in its manifest. The
dense activation graph's partition (16 clusters) is compared with kNN partitions for several
``k`` by the adjusted Rand index; the ARI between two dense partitions with different seeds is
the noise floor. The same for the weight graph (``knn_sparsify`` of the dense weight graph).

Not a test: times depend on the machine (and the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def planted(m: int, n: int, n_blocks: int = 16, noise: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_blocks, size=n)
    x = rng.standard_normal((m, n_blocks))[:, truth] + noise * rng.standard_normal((m, n))
    return np.exp(x), truth


def one_run(path: str, n: int, m: int, k: int, noise: float, labels_out: str) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from modlens.core.clustering import spectral_labels
    from modlens.core.graph import activation_graph
    from modlens.core.knn_graph import knn_activation_graph

    x, truth = planted(m, n, noise=noise)
    t0 = time.perf_counter()
    if path == "dense":
        g = activation_graph(x)
    else:
        g = knn_activation_graph(x, k)
    t1 = time.perf_counter()
    labels = spectral_labels(g, 16, random_state=0, eigen_solver="lobpcg" if path == "dense" else "lanczos")
    t2 = time.perf_counter()
    np.save(labels_out, labels)
    return {
        "path": path, "n": n, "graph_s": round(t1 - t0, 2), "cluster_s": round(t2 - t1, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "ari_vs_planted": round(float(adjusted_rand_score(truth, labels)), 4),
    }


def scaling(args) -> None:
    import tempfile

    from sklearn.metrics import adjusted_rand_score

    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, samples={args.samples}, "
          f"k={args.k}, noise={args.noise}")
    tmp = Path(tempfile.mkdtemp())
    for n in args.sizes:
        files = {}
        for path in ("dense", "knn"):
            if path == "dense" and n > args.max_dense:
                print(json.dumps({"path": "dense", "n": n, "skipped": f"n > --max-dense {args.max_dense}"}))
                continue
            files[path] = tmp / f"{path}_{n}.npy"
            cmd = [sys.executable, __file__, "_one", path, str(n), str(args.samples), str(args.k),
                   str(args.noise), str(files[path])]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                print(json.dumps({"path": path, "n": n, "error": out.stderr.strip().splitlines()[-1:]}))
            else:
                print(out.stdout.strip().splitlines()[-1], flush=True)
        if all(f.exists() for f in files.values()) and len(files) == 2:
            ari = adjusted_rand_score(np.load(files["dense"]), np.load(files["knn"]))
            print(json.dumps({"n": n, "ari_knn_vs_dense": round(float(ari), 4)}), flush=True)


def mnist(args) -> None:
    import torch
    from sklearn.metrics import adjusted_rand_score as ari

    from modlens.core.clustering import spectral_labels
    from modlens.core.graph import activation_graph, ncut, weight_graph
    from modlens.core.knn_graph import knn_activation_graph, knn_sparsify
    from modlens.nn.io import load_model
    from modlens.study.commands import model_data

    model, manifest = load_model(args.model)
    _, act_x = model_data(manifest, data_dir=args.data_dir)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    recorded = []
    hooks = [lin.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach().numpy().astype(np.float64)))
             for lin in linears[:-1]]
    with torch.no_grad():
        model(torch.as_tensor(np.asarray(act_x), dtype=torch.float32))
    for h in hooks:
        h.remove()
    sizes = [a.shape[1] for a in recorded]
    print(f"model {args.model}: hidden sizes {sizes}, activation samples {recorded[0].shape[0]}")

    def compare(name, dense_graph, sparse_of):
        t0 = time.perf_counter()
        ref = spectral_labels(dense_graph, 16, random_state=0)
        print(f"{name}: dense partition {time.perf_counter() - t0:.1f} s, n-cut on the dense graph "
              f"{ncut(dense_graph, ref):.3f}")
        other = spectral_labels(dense_graph, 16, random_state=1)
        print(f"  dense seed 1 (noise floor): ARI vs dense seed 0 {ari(ref, other):.3f}, "
              f"n-cut {ncut(dense_graph, other):.3f}")
        amg = spectral_labels(sp.csr_array(dense_graph), 16, random_state=0, eigen_solver="lanczos")
        print(f"  dense graph, Lanczos solver: ARI vs dense seed 0 {ari(ref, amg):.3f}, n-cut {ncut(dense_graph, amg):.3f}")
        for k in args.ks:
            t0 = time.perf_counter()
            g = sparse_of(k)
            lab = spectral_labels(g, 16, random_state=0, eigen_solver="lanczos")
            print(f"  k={k:4d} (nnz {g.nnz:8d}, {time.perf_counter() - t0:4.1f} s): ARI vs dense seed 0 "
                  f"{ari(ref, lab):.3f}, n-cut on the dense graph {ncut(dense_graph, lab):.3f}")

    dense = activation_graph(recorded)
    compare("activation graph (1,024 hidden units)", dense, lambda k: knn_activation_graph(recorded, k))

    all_sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
    blocks = [(i, i + 1, np.abs(lin.weight.detach().numpy().astype(np.float64))) for i, lin in enumerate(linears)]
    wg = weight_graph(all_sizes, blocks)
    compare("weight graph (784 inputs, 1,024 hidden, 10 outputs)", wg, lambda k: knn_sparsify(wg, k))


def solvers(args) -> None:
    """Plain LOBPCG (scikit-learn, no preconditioner) vs Lanczos vs AMG-preconditioned LOBPCG."""
    import warnings

    from sklearn.metrics import adjusted_rand_score

    from modlens.core import spectral_large
    from modlens.core.clustering import spectral_labels
    from modlens.core.knn_graph import knn_activation_graph

    spectral_large.LARGE_SPARSE_NODES = 10**9  # let "lobpcg" mean scikit-learn's plain LOBPCG here
    for n in args.sizes:
        x, truth = planted(args.samples, n, noise=args.noise)
        g = knn_activation_graph(x, args.k)
        row = {"n": n}
        for solver in ("lobpcg", "lanczos", "amg"):
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lab = spectral_labels(g, 16, random_state=0, eigen_solver=solver)
            row[f"{solver}_s"] = round(time.perf_counter() - t0, 2)
            row[f"{solver}_ari"] = round(float(adjusted_rand_score(truth, lab)), 4)
            row[f"{solver}_warnings"] = len(caught)
        print(json.dumps(row), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        path, n, m, k = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(one_run(path, n, m, k, float(sys.argv[6]), sys.argv[7])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    s = sub.add_parser("scaling")
    s.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    s.add_argument("--samples", type=int, default=512)
    s.add_argument("--k", type=int, default=64)
    s.add_argument("--noise", type=float, default=3.0, help="noise scale of the planted blocks (latent scale 1)")
    s.add_argument("--max-dense", type=int, default=8192, help="skip the dense path above this many nodes")
    v = sub.add_parser("solvers")
    v.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    v.add_argument("--samples", type=int, default=512)
    v.add_argument("--k", type=int, default=64)
    v.add_argument("--noise", type=float, default=3.0)
    m = sub.add_parser("mnist")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--data-dir", type=Path, default=os.environ.get("MODLENS_DATA"))
    m.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    args = ap.parse_args()
    {"scaling": scaling, "solvers": solvers, "mnist": mnist}[args.part](args)


if __name__ == "__main__":
    main()
