"""Extra peak memory (tracemalloc) of spectral clustering on a large sparse graph (Lanczos path):
a random loop-free graph of 40,000 nodes and about 8M entries with 32-bit indices, k = 16. Run it
at two commits to compare; the symmetry check takes the probe path, as on graphs of more than
PROBED_SYMMETRY_NNZ entries.

    PYTHONPATH=src python benchmarks/spectral_memory.py
"""
import time, tracemalloc, numpy as np, scipy.sparse as sp
from modlens.core import clustering
from modlens.core.clustering import spectral_labels
clustering.PROBED_SYMMETRY_NNZ = 0   # as for graphs above 20M entries
rng = np.random.default_rng(0)
n, per_row = 40_000, 100
rows = np.repeat(np.arange(n), per_row)
cols = (rows + rng.integers(1, n, rows.size)) % n
upper = sp.coo_array((rng.uniform(0.5, 1.5, rows.size), (rows, cols)), shape=(n, n)).tocsr()
adj = sp.csr_array(upper + upper.T); adj.sum_duplicates()
adj = sp.csr_array((adj.data, adj.indices.astype(np.int32), adj.indptr.astype(np.int32)), shape=adj.shape)
gb = (adj.data.nbytes + adj.indices.nbytes + adj.indptr.nbytes) / 2**20
tracemalloc.start(); t = time.process_time()
labels = spectral_labels(adj, 16, random_state=0, n_init=4)
cpu = time.process_time() - t; peak = tracemalloc.get_traced_memory()[1] / 2**20; tracemalloc.stop()
print(f"nodes {n} entries {adj.nnz} graph {gb:.0f} MiB: extra peak {peak:.0f} MiB ({peak/gb:.2f} graphs), cpu {cpu:.1f} s, labels {np.bincount(labels)[:4]}...")
