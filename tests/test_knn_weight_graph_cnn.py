"""A CNN whose weight graph has more than ``MAX_EXACT_WEIGHT_EDGES`` edges is partitioned on the kNN
weight graph (each node's ``DEFAULT_K`` heaviest edges), built from the blocks without the full graph; the
partition says so. Checked against the exact graph: the same graph and labels when k covers every degree,
the exact graph's top k per node otherwise."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modlens.core import knn_graph
from modlens.core.knn_graph import knn_sparsify
from modlens.core.weight_share import weight_share
from modlens.experiments.partitioning import Partitioner
from modlens.nn import NetworkAdapter


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


def residual_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Block(8), Block(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def partitioner(model):
    adapter = NetworkAdapter(model, torch.randn(4, 1, 6, 6))
    return adapter, Partitioner(adapter, n_clusters=3, random_state=0)


def test_knn_weight_graph_of_a_cnn_above_the_edge_limit(monkeypatch):
    model = residual_cnn()
    adapter, exact = partitioner(model)
    want = {m: exact.partition(m) for m in ("weights/global", "weights/local")}
    assert "knn_graph" not in want["weights/global"].info
    full = exact._graphs["weights"][0]

    monkeypatch.setattr(knn_graph, "MAX_EXACT_WEIGHT_EDGES", 10)
    _, knn = partitioner(model)
    for method, expected in want.items():  # k = 64 covers every degree here: the exact graph
        got = knn.partition(method)
        assert got.info["knn_graph"] == {"k": knn_graph.DEFAULT_K, "edges_of_full_graph": full.nnz // 2}
        for a, b in zip(got.labels, expected.labels):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(knn._graphs["weights"][0].toarray(), full.toarray())

    monkeypatch.setattr(knn_graph, "DEFAULT_K", 3)
    _, small = partitioner(model)
    part = small.partition("weights/global")
    adj = small._graphs["weights"][0]
    ref = knn_sparsify(full, 3)
    # the exact graph's top 3 per node, up to which of exactly tied edges is kept (a skip path makes ties)
    np.testing.assert_array_equal(np.sort(adj.data), np.sort(ref.data))
    assert (adj.toarray() != ref.toarray()).mean() < 0.01
    assert adj.nnz < full.nnz and part.info["knn_graph"]["k"] == 3
    assert all(len(l) == s for l, s in zip(part.labels, adapter.layer_sizes))
    # the share of weight inside clusters is still read from every edge (the blocks)
    sizes, blocks, hidden, _ = small._weight_structure()
    assert part.info["weight_share"] == weight_share(blocks, part.labels, hidden)

