"""Exact work-skipping of the fast lesion path (silent lesions, certified margins)."""

import numpy as np
import pytest
import torch
from torch import nn

from modlens.nn import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from test_lesion import labelled, random_mlp


def test_silent_lesions_are_skipped_and_exact():
    # the tail after layer 0's consumer (64 -> 64 -> 4) is costly enough for silent pairs to be gathered out
    model = random_mlp([6, 12, 64, 64, 4], nn.ReLU, 0)
    with torch.no_grad():  # neurons 0-2 of layer 0 are dead on samples with x[:, 0] < 0
        model[0].weight[:3] = 0
        model[0].weight[:3, 0] = 1.0
        model[0].bias[:3] = 0
    x, y = labelled(model, 400, 6, 0)
    adapter = NetworkAdapter(model)
    ev = IncrementalLesions(adapter, x, y, batch_size=50)
    sets = [[0, 1, 2], [0, 1], [2], [0, 5]]
    fast = ev.correct_counts(0, sets)
    assert ev.last_stats["silent"] > 0
    np.testing.assert_array_equal(fast, correct_counts_plain(adapter, 0, sets, x, y))
    np.testing.assert_array_equal(fast, IncrementalLesions(adapter, x, y, skip=False).correct_counts(0, sets))


@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.1)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_certified_path_equals_plain(act, seed):
    model = random_mlp([10, 40, 40, 40, 5], act, seed)
    x, y = labelled(model, 500, 10, seed)
    adapter = NetworkAdapter(model)
    ev = IncrementalLesions(adapter, x, y, batch_size=128)
    rng = np.random.default_rng(seed)
    for layer in range(3):
        sets = [rng.choice(40, size=s, replace=False) for s in (1, 1, 3, 3, 8, 8, 20, 39)]
        fast = ev.correct_counts(layer, sets)
        # the last hidden layer has no tail after its consumer: only silent lesions are skipped
        assert ev.last_stats["skip"] == ("chain" if layer < 2 else "silent")
        np.testing.assert_array_equal(fast, correct_counts_plain(adapter, layer, sets, x, y))
        if layer == 0:
            assert ev.last_stats["certified"] > 0


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.GELU])
def test_no_certificates_for_other_activations(act):
    model = random_mlp([10, 30, 30, 30, 5], act, 0)
    x, y = labelled(model, 300, 10, 0)
    adapter = NetworkAdapter(model)
    ev = IncrementalLesions(adapter, x, y)
    rng = np.random.default_rng(0)
    sets = [rng.choice(30, size=s, replace=False) for s in (1, 4, 12)]
    for layer in range(3):
        fast = ev.correct_counts(layer, sets)
        assert ev.last_stats["skip"] == "silent"
        assert "certified" not in ev.last_stats
        np.testing.assert_array_equal(fast, correct_counts_plain(adapter, layer, sets, x, y))


def test_cheap_tails_run_every_pair():
    """A consumer followed only by the logits runs all pairs: gathering rows would cost as much."""
    model = random_mlp([6, 12, 64, 64, 4], nn.ReLU, 1)
    x, y = labelled(model, 300, 6, 1)
    adapter = NetworkAdapter(model)
    ev = IncrementalLesions(adapter, x, y, batch_size=64)
    rng = np.random.default_rng(1)
    sets = [rng.choice(64, size=s, replace=False) for s in (1, 5, 30)]
    for layer in (1, 2):
        fast = ev.correct_counts(layer, sets)
        assert "silent" not in ev.last_stats and ev.last_stats["pairs"] == len(sets) * len(x)
        np.testing.assert_array_equal(fast, correct_counts_plain(adapter, layer, sets, x, y))
