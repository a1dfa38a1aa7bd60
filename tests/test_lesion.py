"""The fast lesion path against the plain oracle, and lesion metrics by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from modlens.experiments.lesion_test import lesion_metrics, lesion_test
from modlens.core.partition import Partition
from modlens.nn import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain, lesion_engine


def random_mlp(sizes, act, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def labelled(model, n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    with torch.no_grad():
        y = model(x).argmax(-1)
    flip = torch.rand(n, generator=g) < 0.3
    y[flip] = torch.randint(0, model[-1].out_features, (int(flip.sum()),), generator=g)
    return x, y


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU])
@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_equals_plain_on_random_mlps(act, seed):
    sizes = [10, 24, 16, 20, 6]
    model = random_mlp(sizes, act, seed)
    x, y = labelled(model, 300, 10, seed)
    adapter = NetworkAdapter(model)
    ev = IncrementalLesions(adapter, x, y, batch_size=77)
    rng = np.random.default_rng(seed)
    for layer, width in enumerate(adapter.layer_sizes):
        sets = [rng.choice(width, size=s, replace=False) for s in (1, 2, 2, 5, 5, 5, width - 1, width)] + [[]]
        fast = ev.correct_counts(layer, sets)
        plain = correct_counts_plain(adapter, layer, sets, x, y, batch_size=64)
        np.testing.assert_array_equal(fast, plain)
    # the empty lesion is the intact network
    np.testing.assert_array_equal(ev.baseline, correct_counts_plain(adapter, 0, [[]], x, y)[0])


def test_lesion_zeroes_the_neurons_output_not_its_preactivation():
    # sigmoid(0) = 0.5, so zeroing pre-activations would differ from removing the neuron
    model = random_mlp([3, 4, 2], nn.Sigmoid, 0)
    x = torch.randn(50, 3, dtype=torch.float64)
    adapter = NetworkAdapter(model)
    with torch.no_grad():
        w = model[2].weight.clone()
        w[:, [1, 2]] = 0
        expected = (torch.sigmoid(model[0](x)) @ w.T + model[2].bias).argmax(-1)
    y = expected.clone()
    counts = IncrementalLesions(adapter, x, y).correct_counts(0, [[1, 2]])
    assert counts.sum() == len(y)


def test_float32_batching_does_not_change_counts():
    model = random_mlp([8, 32, 32, 5], nn.ReLU, 3, dtype=torch.float32)
    x, y = labelled(model, 500, 8, 3, dtype=torch.float32)
    adapter = NetworkAdapter(model)
    sets = [np.arange(s) for s in (3, 3, 3, 7)]
    a = IncrementalLesions(adapter, x, y, batch_size=500).correct_counts(1, sets)
    b = IncrementalLesions(adapter, x, y, batch_size=13).correct_counts(1, sets)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - correct_counts_plain(adapter, 1, sets, x, y)).max() <= 1


def test_bad_lesion_sets():
    model = random_mlp([3, 4, 2], nn.ReLU, 0)
    x = torch.randn(10, 3, dtype=torch.float64)
    ev = IncrementalLesions(NetworkAdapter(model), x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        ev.correct_counts(0, [[0, 4]])
    with pytest.raises(ValueError, match="repeats"):
        ev.correct_counts(0, [[1, 1]])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        IncrementalLesions(NetworkAdapter(model), x, torch.full((10,), 5))


def test_lesion_metrics_by_hand():
    class_sizes = np.array([10, 10, 20])
    baseline = np.array([10, 8, 20])           # per-class acc 1.0, 0.8, 1.0 ; overall 38/40
    counts = np.array([[10, 8, 20], [5, 8, 10], [0, 0, 0]])
    m = lesion_metrics(counts, baseline, class_sizes)
    np.testing.assert_allclose(m["accuracy"], [38 / 40, 23 / 40, 0.0])
    np.testing.assert_allclose(m["acc_drop"], [0.0, 15 / 40, 38 / 40])
    # class drops: [0,0,0], [0.5, 0, 0.5], [1, 0.8, 1]
    np.testing.assert_allclose(m["class_range"], [0.0, 0.5, 0.2])
    b = lesion_metrics(counts, baseline, class_sizes, accuracy="balanced")
    np.testing.assert_allclose(b["acc_drop"], [0.0, (0.5 + 0 + 0.5) / 3, (1 + 0.8 + 1) / 3])
    n = lesion_metrics(counts, baseline, class_sizes, class_range="normalized")
    np.testing.assert_allclose(n["class_range"], [0.0, 0.5 / (1 / 3), 0.2 / (2.8 / 3)])
    with pytest.raises(ValueError):
        lesion_metrics(counts, baseline, class_sizes, accuracy="f1")


def test_lesion_test_table_and_engines_agree():
    model = random_mlp([6, 12, 12, 4], nn.ReLU, 5)
    x, y = labelled(model, 200, 6, 5)
    adapter = NetworkAdapter(model)
    labels = [np.arange(12) % 3, np.arange(12) // 4]
    part = Partition.from_labels(labels, adapter.layer_names, adapter.layer_sizes)
    fast = lesion_test(lesion_engine("incremental", adapter, x, y), part, n_random=5, random_state=1)
    plain = lesion_test(lesion_engine("plain", adapter, x, y), part, n_random=5, random_state=1)
    assert len(fast) == 6 * 6
    assert (fast["kind"] == "true").sum() == 6
    assert fast.groupby(["layer", "cluster"]).size().eq(6).all()
    np.testing.assert_array_equal(fast["accuracy"].to_numpy(), plain["accuracy"].to_numpy())
    for _, row in fast.iterrows():
        neurons = [int(v) for v in row["neurons"].split(",")]
        assert len(neurons) == row["size"]
    true = fast[fast["kind"] == "true"]
    for _, row in true.iterrows():
        expect = np.flatnonzero(labels[row["layer"]] == row["cluster"])
        assert row["neurons"] == ",".join(map(str, expect))
