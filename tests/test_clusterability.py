"""Graphical clusterability (Filan et al., 2021): core shuffles and null test, and the
experiments-level test on planted-module and random-weight MLPs."""

import numpy as np
import pytest
import torch
from torch import nn

from modlens.core.clusterability import clusterability_test, null_test, shuffle_blocks


def test_shuffle_keeps_each_layers_weights_and_is_seeded():
    rng = np.random.default_rng(0)
    blocks = [(0, 1, rng.uniform(size=(5, 4))), (1, 2, rng.uniform(size=(3, 5)))]
    draws = shuffle_blocks(blocks, 6, random_state=1)
    assert len(draws) == 6
    for d in draws:
        for (i, j, a), (i2, j2, b) in zip(blocks, d):
            assert (i, j) == (i2, j2) and b.shape == a.shape
            np.testing.assert_array_equal(np.sort(b, axis=None), np.sort(a, axis=None))  # same multiset
    assert not all(np.array_equal(d[0][2], blocks[0][2]) for d in draws)  # positions change
    assert not np.array_equal(draws[0][0][2], draws[1][0][2])  # draws differ
    again = shuffle_blocks(blocks, 6, random_state=1)
    for d, e in zip(draws, again):
        for (_, _, b), (_, _, c) in zip(d, e):
            np.testing.assert_array_equal(b, c)
    # every entry goes everywhere: a uniform permutation (Monte Carlo over many draws)
    many = shuffle_blocks([(0, 1, np.arange(4.0).reshape(2, 2))], 4000, random_state=2)
    first = np.array([d[0][2][0, 0] for d in many])
    counts = np.bincount(first.astype(int), minlength=4)
    assert np.all(np.abs(counts - 1000) < 120)  # ~ 4 sd of Binomial(4000, 1/4)


def test_null_test_hand_values():
    res = null_test(1.0, [2.0, 3.0, 1.0, 4.0])  # one null n-cut <= observed (the tie)
    assert res["p_value"] == pytest.approx((1 + 1) / 5)
    assert res["null_mean"] == pytest.approx(2.5)
    assert res["null_sd"] == pytest.approx(np.std([2, 3, 1, 4], ddof=1))
    assert res["z"] == pytest.approx((1.0 - 2.5) / np.std([2, 3, 1, 4], ddof=1))
    assert null_test(0.0, np.ones(19))["p_value"] == pytest.approx(1 / 20)  # the floor
    assert null_test(5.0, np.ones(19))["p_value"] == 1.0
    assert np.isnan(null_test(1.0, [1.0, 1.0])["z"])
    with pytest.raises(ValueError, match="at least one"):
        null_test(1.0, [])


def test_monte_carlo_p_is_uniform_when_observed_is_exchangeable():
    # observed and null from the same continuous distribution: P(p <= j/(n+1)) = j/(n+1)
    rng = np.random.default_rng(5)
    n = 9
    ps = np.array([null_test(rng.normal(), rng.normal(size=n))["p_value"] for _ in range(4000)])
    for j in (1, 3, 5):
        assert np.mean(ps <= j / (n + 1)) == pytest.approx(j / (n + 1), abs=0.025)


def test_clusterability_test_batches_draws():
    blocks = [(0, 1, np.arange(6.0).reshape(2, 3))]
    seen = []

    def ncut_of(b, draw):
        seen.append(draw)
        return float(b[0][2][0, 0])

    res = clusterability_test(-1.0, blocks, ncut_of, n_null=7, random_state=0, batch_size=3)
    assert seen == list(range(7)) and res["n_null"] == 7 and res["p_value"] == pytest.approx(1 / 8)
    again = clusterability_test(-1.0, blocks, ncut_of, n_null=7, random_state=0, batch_size=3)
    assert again["null_ncuts"] == res["null_ncuts"]  # seeded


def _partitioner(model, k):
    from modlens.experiments.partitioning import Partitioner
    from modlens.nn.adapter import NetworkAdapter

    return Partitioner(NetworkAdapter(model), n_clusters=k, random_state=0)


def test_planted_modules_far_more_clusterable_than_shuffles(planted):
    from modlens.experiments.clusterability import clusterability_test as test

    model = planted[0]
    part = _partitioner(model, 4)
    for method in ("weights/global", "weights/local"):
        res = test(part, method, n_null=9)
        assert res["p_value"] == pytest.approx(1 / 10), method  # the floor of 9 draws
        assert res["z"] < -3 and res["ncut"] < res["null_mean"]


def test_random_weight_mlp_is_not_clusterable():
    from modlens.experiments.clusterability import clusterability_test as test

    ps = []
    for seed in range(8):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        part = _partitioner(model, 3)
        ps.append(test(part, "weights/global", n_null=9)["p_value"])
    ps = np.array(ps)
    # exchangeable with its shuffles: p is uniform on {0.1, ..., 1}; mean 0.55, sd of the mean ~0.1
    assert 0.25 <= ps.mean() <= 0.85, ps
    assert np.sum(ps <= 0.1) <= 3, ps  # P(>= 4 of 8 at the floor) = 0.005 under uniformity
