"""Graphical clusterability of a saved MLP's weight partitionings (k = 16, 19 shuffled networks).

    python benchmarks/clusterability_mlp.py MODEL_DIR weights/global weights/local

Prints one JSON line per partitioning (``modlens.experiments.clusterability.clusterability_test``).
"""
import json, sys, time
from modlens.nn.io import load_model
from modlens.nn.adapter import NetworkAdapter
from modlens.experiments.partitioning import Partitioner
from modlens.experiments.clusterability import clusterability_test
model, _ = load_model(sys.argv[1])
p = Partitioner(NetworkAdapter(model), n_clusters=16, random_state=0)
for m in sys.argv[2:]:
    t = time.time(); r = clusterability_test(p, m, n_null=19)
    r["wall_s"] = time.time() - t
    print(json.dumps(r), flush=True)
