"""End to end on a CNN whose modules are known: channel groups wired only within their group."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import modlens
from modlens.nn.adapter import NetworkAdapter
from test_cnn_models import planted_cnn, planted_images

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


def test_planted_cnn_is_accurate():
    model, _ = planted_cnn()
    x, y = planted_images(400, seed=1)
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).float().mean() > 0.95


@pytest.mark.parametrize("method", ["weights/global", "weights/local"])
def test_weight_clustering_recovers_planted_channel_groups(method):
    model, groups = planted_cnn()
    part = modlens.partition(model, method, n_clusters=4, random_state=0)
    assert part.layer_names == ("conv1", "conv2", "conv3")  # conv channels only (paper 3.1)
    for labels, truth in zip(part.labels, groups):
        assert adjusted_rand_score(truth, labels) == 1.0
    if method == "weights/global":
        assert part.ncut == pytest.approx(0.0, abs=1e-12)


def test_activation_clustering_finds_planted_channel_groups():
    model, groups = planted_cnn()
    xa, _ = planted_images(300, seed=2)
    part = modlens.partition(model, "activations/global", n_clusters=4, data=xa)
    assert np.mean([adjusted_rand_score(t, l) for t, l in zip(groups, part.labels)]) > 0.9


def test_planted_channel_groups_are_detected_by_lesions():
    model, groups = planted_cnn()
    test = planted_images(600, seed=1)
    xa, _ = planted_images(300, seed=2)
    res = modlens.analyze(model, test, activation_data=xa, n_clusters=4, random_state=0,
                          partitionings=["weights/global", "activations/global"])
    s = res.summary.set_index(["partitioning", "metric"])
    for method in ("weights/global", "activations/global"):
        row = s.loc[(method, "acc_drop")]
        assert row["n_subclusters"] == 12
        assert row["p_value"] < 1e-4 and row["effect"] > 1.3 and row["significant"]


def test_random_channel_sets_are_not_detected():
    """Null: a random partition of the planted CNN's channels is not found important."""
    model, _ = planted_cnn()
    x, y = planted_images(600, seed=1)
    adapter = NetworkAdapter(model)
    rng = np.random.default_rng(0)
    labels = [rng.permutation(np.arange(16) % 4) for _ in adapter.layer_sizes]
    res = modlens.analyze(model, (x, y), partition=labels, n_random=19, random_state=0)
    assert res.summary.set_index("metric").loc["acc_drop", "p_value"] > 0.01


def test_activation_clustering_through_the_knn_path_uses_float32_ranks(monkeypatch):
    """Above DENSE_MAX_NODES partition builds the kNN activation graph from float32 ranks; forced onto that
    path (a switch at 20 units), the planted channel groups are still found and the graph is the float32 one."""
    from modlens.core import knn_graph
    from modlens.experiments import partitioning

    calls = []

    def low_switch(acts, **kwargs):
        calls.append(kwargs)
        graph = knn_graph.build_activation_graph(acts, dense_max_nodes=20, k=16, **kwargs)
        reference = knn_graph.knn_activation_graph(acts, 16, dtype=np.float32)
        assert abs(graph - reference).max() == 0
        return graph

    monkeypatch.setattr(partitioning, "build_activation_graph", low_switch)
    model, groups = planted_cnn()
    xa, _ = planted_images(300, seed=2)
    part = modlens.partition(model, "activations/global", n_clusters=4, data=xa, random_state=0)
    assert len(calls) == 1 and calls[0]["dtype"] == np.float32
    assert np.mean([adjusted_rand_score(t, l) for t, l in zip(groups, part.labels)]) > 0.9
