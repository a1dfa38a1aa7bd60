"""CNN weight blocks computed when read (``NetworkAdapter.lazy_weight_blocks``) give the same blocks, graphs
and partitions as blocks computed once and kept; conv edges computed without the dense group mask equal the
plain formula (every kernel-slice norm times "same group") bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modlens.core import knn_graph
from modlens.core.graph import kernel_slice_norms
from modlens.experiments import partitioning
from modlens.experiments.partitioning import Partitioner
from modlens.nn import NetworkAdapter
from modlens.nn._conv import consumer_edges
from modlens.nn._ops import Route
from modlens.nn.adapter import LazyWeightBlocks


def plain_consumer_edges(conv: nn.Conv2d, route: Route, n_source: int, norm: str) -> np.ndarray:
    """The edges as first written: a dense (out, sources) mask of "same group" times the slice norms."""
    w = conv.weight.detach().double().numpy()
    source = np.arange(n_source)
    carried = route.carried(source)
    idx = route.indices(source, conv.in_channels)
    slices = kernel_slice_norms(w, norm)
    per_group_in, per_group_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    local, group = idx % per_group_in, idx // per_group_in
    same = (np.arange(conv.out_channels)[:, None] // per_group_out) == group[None, :]
    part = slices[:, local] * same
    if carried.all():
        return part
    out = np.zeros((part.shape[0], n_source))
    out[:, carried] = part
    return out


@pytest.mark.parametrize("groups", [1, 2, 12])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("norm", ["l1", "matrix_1_norm"])
def test_conv_edges_equal_the_plain_formula(groups, kernel, norm):
    torch.manual_seed(groups * 10 + kernel)
    conv = nn.Conv2d(12, 24 if groups < 12 else 12, kernel, groups=groups)
    routes = [(Route(ndim=4), 12),                                   # the whole input
              (Route(offset=4, ndim=4), 8 if groups == 1 else 4),   # a concatenation's later part
              (Route(ndim=4, sources=(2, 7)), 12),                  # a split: channels 2..6 reach it
              (Route(ndim=4, positions=tuple([3, -1, 0, 5, 1, -1, 2, 4])), 8)]   # a shuffle
    for route, n_source in routes:
        got = consumer_edges(conv, route, n_source, norm)
        want = plain_consumer_edges(conv, route, n_source, norm)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), (route, n_source)
        if groups > 1:
            assert np.count_nonzero(got) < got.size   # the block really is zero outside the groups


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class MBBlock(nn.Module):
    """Expand (1x1), depthwise (3x3), squeeze-excitation, project (1x1), residual: an EfficientNet block."""

    def __init__(self, c, e):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.se = SE(e)
        self.project, self.bn3 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.expand(x)))
        h = self.se(torch.relu(self.bn2(self.dw(h))))
        return x + self.bn3(self.project(h))


def mbnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), MBBlock(8, 16),
                          MBBlock(8, 16), nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3)).eval()
    with torch.no_grad():   # batch norms away from their initial (all equal) scales
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("bn_fold", ["paper", "original"])
def test_lazy_blocks_are_the_kept_blocks(bn_fold):
    adapter = NetworkAdapter(mbnet(), torch.randn(4, 3, 8, 8))
    lazy = adapter.lazy_weight_blocks(bn_fold=bn_fold)
    kept = adapter.weight_blocks(bn_fold=bn_fold)
    assert isinstance(lazy, LazyWeightBlocks) and len(lazy) == len(kept)
    assert lazy.pairs == [(i, j) for i, j, _ in kept]
    for k, (i, j, a) in enumerate(kept):
        for got in (lazy[k], list(lazy)[k]):   # read by index and by a pass: computed again, the same
            assert got[:2] == (i, j) and got[2].tobytes() == a.tobytes()
    assert [b[:2] for b in lazy[1:3]] == [b[:2] for b in kept[1:3]]


@pytest.mark.parametrize("max_exact", [None, 10])
def test_partition_on_lazy_blocks_equals_kept_blocks(monkeypatch, max_exact):
    """Above KEEP_BLOCK_ENTRIES the blocks are computed on each pass (edge count, graph, weight share) and
    never kept: the same exact or kNN graph, labels, n-cut and weight share as the kept blocks give."""
    model = mbnet()
    if max_exact is not None:
        monkeypatch.setattr(knn_graph, "MAX_EXACT_WEIGHT_EDGES", max_exact)
        monkeypatch.setattr(knn_graph, "DEFAULT_K", 5)   # fewer than the degrees: a real top-k choice
    adapter = NetworkAdapter(model, torch.randn(4, 3, 8, 8))
    kept = Partitioner(adapter, n_clusters=3, random_state=0)
    want = kept.partition("weights/global")
    assert isinstance(kept._weight_structure()[1], list)
    monkeypatch.setattr(partitioning, "KEEP_BLOCK_ENTRIES", 0)
    lazy = Partitioner(adapter, n_clusters=3, random_state=0)
    got = lazy.partition("weights/global")
    assert isinstance(lazy._weight_structure()[1], LazyWeightBlocks)
    assert ("knn_graph" in got.info) == (max_exact is not None)
    a, b = lazy._graphs["weights"][0], kept._graphs["weights"][0]
    assert a.shape == b.shape and (a != b).nnz == 0
    for x, y in zip(got.labels, want.labels):
        np.testing.assert_array_equal(x, y)
    assert got.ncut == want.ncut
    assert got.info["weight_share"] == want.info["weight_share"]
    assert got.info.get("knn_graph") == want.info.get("knn_graph")
    local = lazy.partition("weights/local")
    for x, y in zip(local.labels, kept.partition("weights/local").labels):
        np.testing.assert_array_equal(x, y)
