"""Time scikit-learn's eigensolvers (ARPACK, LOBPCG, AMG) on neuron graphs of growing size.

    python benchmarks/eigensolver.py [--k 16] [--timeout 240] [--sizes-sparse 2000,5000,...]
                                     [--sizes-dense 1024,2048,4096] [--out results.json]

Each (graph, solver) pair runs in its own process with a wall-clock limit (ARPACK's Fortran
loop cannot be interrupted), so a solver that is too slow shows as ``timeout``. Timed is the
spectral embedding that ``SpectralClustering`` computes (``k`` eigenvectors of the normalized
Laplacian, scikit-learn's ``spectral_embedding(..., drop_first=False)``); the k-means step
that follows is the same for every solver and is reported once (``kmeans_s``, 10 inits). The
labels of each solver are compared with ARPACK's by the adjusted Rand index.

Graphs (all built from a fixed seed, numpy/scipy only):

* ``mlp``: the weight graph of a 784-256x4-10 MLP with Glorot-uniform weights (1,818 nodes,
  the paper's MLP; a trained one can be given with ``--weights file.npz`` holding W0..W4);
* ``wide-mlp-N``: a layered weight graph with N nodes over 6 layers, sparse 5 % random
  connectivity between adjacent layers (stands in for large CNN / sparsified graphs);
* ``vgg``: a 13-layer conv-channel graph of the CIFAR VGG's sizes (4,224 nodes, dense blocks
  of |normal| weights between adjacent layers);
* ``knn-N``: a symmetrized 10-nearest-neighbour graph of N points in 16 Gaussian blobs
  (the kind of sparse graph a kNN activation graph is);
* ``dense-N``: a dense activation-like graph: squared correlations of N units driven by 16
  latent factors plus noise (the structure of an activation graph).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp


def _glorot(rng, fan_in, fan_out):
    lim = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-lim, lim, size=(fan_out, fan_in))


def _layered(sizes, mats):
    n = sum(sizes)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    rows, cols, vals = [], [], []
    for l, w in enumerate(mats):
        w = sp.coo_array(np.abs(w)) if not sp.issparse(w) else sp.coo_array(abs(w))
        rows += [w.row + offs[l + 1], w.col + offs[l]]
        cols += [w.col + offs[l], w.row + offs[l + 1]]
        vals += [w.data, w.data]
    return sp.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def build(name: str, weights: str | None = None):
    adj = _build(name, weights)
    if sp.issparse(adj):  # scikit-learn's ARPACK path wants 32-bit indices
        adj.indices = adj.indices.astype(np.int32)
        adj.indptr = adj.indptr.astype(np.int32)
    return adj


def _build(name: str, weights: str | None = None):
    rng = np.random.default_rng(0)
    if name == "mlp":
        sizes = [784, 256, 256, 256, 256, 10]
        if weights:
            z = np.load(weights)
            mats = [z[f"W{i}"] for i in range(5)]
        else:
            mats = [_glorot(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        return _layered(sizes, mats)
    if name == "vgg":  # the CIFAR VGG's conv-channel weight graph: dense blocks between adjacent layers
        sizes = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        mats = [np.abs(rng.normal(size=(b, a))) for a, b in zip(sizes[:-1], sizes[1:])]
        return _layered(sizes, mats)
    kind, n = name.rsplit("-", 1)
    n = int(n)
    if kind == "wide-mlp":
        sizes = [n // 6] * 5 + [n - 5 * (n // 6)]
        mats = [sp.random_array((b, a), density=0.05, random_state=rng) for a, b in zip(sizes[:-1], sizes[1:])]
        return _layered(sizes, mats)
    if kind == "knn":
        from sklearn.neighbors import kneighbors_graph

        centers = rng.normal(scale=4.0, size=(16, 8))
        pts = centers[rng.integers(0, 16, n)] + rng.normal(size=(n, 8))
        g = kneighbors_graph(pts, 10, mode="connectivity", include_self=False)
        return sp.csr_array(g.maximum(g.T))
    if kind == "dense":
        z = rng.normal(size=(2000, 16))
        load = rng.normal(size=(16, n)) * (rng.random((16, n)) < 0.15)
        acts = z @ load + rng.normal(size=(2000, n))
        c = np.corrcoef(acts, rowvar=False)
        c = c * c
        np.fill_diagonal(c, 0.0)
        return c
    raise ValueError(name)


def one(name: str, solver: str, k: int, weights: str | None) -> dict:
    from sklearn.cluster import k_means
    from sklearn.manifold import spectral_embedding

    adj = build(name, weights)
    t0 = time.perf_counter()
    emb = spectral_embedding(adj, n_components=k, eigen_solver=solver, random_state=0, drop_first=False)
    eig_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, labels, _ = k_means(emb, k, n_init=10, random_state=0)
    return {"graph": name, "solver": solver, "nodes": int(adj.shape[0]), "sparse": bool(sp.issparse(adj)),
            "eigen_s": eig_s, "kmeans_s": time.perf_counter() - t0, "labels": labels.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--sizes-sparse", default="2000,5000,10000,20000,40000")
    p.add_argument("--sizes-dense", default="1024,2048,4096")
    p.add_argument("--solvers", default="arpack,lobpcg,amg")
    p.add_argument("--weights", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--one", nargs=2, metavar=("GRAPH", "SOLVER"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.k, a.weights)))
        return 0
    from sklearn.metrics import adjusted_rand_score

    graphs = ["mlp", "vgg"] + [f"dense-{n}" for n in a.sizes_dense.split(",") if n]
    graphs += [f"{kind}-{n}" for n in a.sizes_sparse.split(",") if n for kind in ("wide-mlp", "knn")]
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for g in graphs:
        found = {}
        for s in a.solvers.split(","):
            cmd = [sys.executable, __file__, "--k", str(a.k), "--one", g, s] + (["--weights", a.weights] if a.weights else [])
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
                res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr.strip()[-300:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"timeout > {a.timeout:.0f} s"}
            res.update(graph=g, solver=s)
            found[s] = res
        ref = found.get("arpack", {}).get("labels")
        for s, res in found.items():
            labels = res.pop("labels", None)
            if ref is not None and labels is not None:
                res["ari_vs_arpack"] = float(adjusted_rand_score(ref, labels))
            rows.append(res)
            if "error" in res:
                print(f"{g:>16} {s:>7}  {res['error'][:80]}", flush=True)
            else:
                print(f"{g:>16} {s:>7} nodes {res['nodes']:>6}  eigen {res['eigen_s']:8.2f} s  kmeans {res['kmeans_s']:6.2f} s"
                      f"  ARI vs arpack {res.get('ari_vs_arpack', float('nan')):.3f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
