"""Tests for correlation maps (modlens.experiments.correlation_maps) and figure 6."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as sps
import torch
from torch import nn

from modlens.core.partition import Partition
from modlens.experiments.correlation_maps import (
    align_signs,
    correlation_maps,
    half_preference,
    spearman_maps,
    subcluster_map,
)
from modlens.nn import NetworkAdapter


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_spearman_maps_match_scipy_and_constant_pixels_give_zero():
    rng = np.random.default_rng(0)
    x = rng.random((40, 5))
    x[:, 2] = 0.3  # constant pixel
    x[:10, 4] = 0.0  # ties
    z = np.c_[x[:, 0] ** 3 - x[:, 1], rng.standard_normal(40), np.round(x[:, 3], 1)]
    got = spearman_maps(x, z)
    assert got.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            want = 0.0 if j == 2 else sps.spearmanr(z[:, i], x[:, j]).statistic
            assert got[i, j] == pytest.approx(want, abs=1e-12)


def test_align_signs_flips_a_negated_neuron():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((1, 6, 6))
    maps = np.stack([base, base + 0.1 * rng.standard_normal((1, 6, 6)), -base, base * 2])
    aligned, flips = align_signs(maps, sweeps=20)
    assert flips.tolist() == [False, False, True, False]  # the original code never flips (notes row 20)
    assert np.array_equal(aligned[2], base)
    assert aligned.shape == maps.shape
    flat = aligned.reshape(4, -1)
    assert (flat @ flat.T > 0).all()
    # averaging without alignment would cancel; with alignment the mean is ~ the shared map
    assert np.corrcoef(aligned.mean(0).ravel(), base.ravel())[0, 1] > 0.99
    assert np.abs(maps.mean(0)).sum() < np.abs(aligned.mean(0)).sum()
    _, none = align_signs(maps, sweeps=0)
    assert not none.any()


def test_align_signs_follows_algorithm_2_step_by_step():
    # neuron 0 sees cos sum -0.5 + 0.9 - 0.9 < 0 and flips first; the later decisions use
    # the flipped map (Gauss-Seidel order, as Algorithm 2 updates v_i in place).
    v = np.array([[1.0, 0.0], [-0.5, np.sqrt(0.75)], [0.9, np.sqrt(1 - 0.81)], [-0.9, -np.sqrt(1 - 0.81)]])
    aligned, flips = align_signs(v, sweeps=1)
    ref = v.copy()
    for i in range(4):
        c = sum(ref[i] @ ref[j] / np.linalg.norm(ref[i]) / np.linalg.norm(ref[j]) for j in range(4) if j != i)
        if c < 0:
            ref[i] = -ref[i]
    np.testing.assert_allclose(aligned, ref)
    assert flips.tolist() == [bool(s) for s in (np.sign(ref[:, 0]) != np.sign(v[:, 0]))]
    zero, f = align_signs(np.zeros((3, 4)))
    assert not f.any() and not zero.any()


def test_half_preference_hand_values():
    left = np.zeros((1, 4, 4))
    left[0, :, :2] = [[1, -2]] * 4
    assert half_preference(left) == pytest.approx(1.0)
    assert half_preference(np.ones((4, 4))) == pytest.approx(0.0)
    both = np.stack([left, np.ones((1, 4, 4))])
    np.testing.assert_allclose(half_preference(both), [1.0, 0.0])
    odd = np.zeros((1, 3, 5))
    odd[0, :, 2] = 5.0  # the middle column counts for neither half
    assert half_preference(odd) == pytest.approx(0.0)


def _halves_mlp(seed=0, per=8, h=8, w=8):
    """First layer: ``per`` neurons reading only the left half, ``per`` only the right half."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * per
    model = nn.Sequential(nn.Flatten(), nn.Linear(h * w, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 10))
    with torch.no_grad():
        mask = torch.zeros(n, h, w)
        mask[:per, :, : w // 2] = 1
        mask[per:, :, w // 2:] = 1
        model[1].weight.copy_(torch.randn(n, h * w, generator=g) * mask.reshape(n, -1))
    adapter = NetworkAdapter(model)
    labels = np.repeat([0, 1], per)
    return adapter, Partition.from_labels([labels, np.arange(n) % 2], adapter.layer_names, adapter.layer_sizes)


def test_true_first_layer_subclusters_prefer_one_half():
    adapter, part = _halves_mlp()
    x = torch.rand(600, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = correlation_maps(adapter, part, x, n_random=4, random_state=0)
    assert maps.true_maps.shape == (2, 1, 8, 8)
    assert maps.random_maps.shape == (2, 4, 1, 8, 8)
    assert maps.neuron_maps.shape == (16, 1, 8, 8)
    assert [s.cluster for s in maps.subclusters] == [0, 1]
    true_pref, rand_pref = maps.true_half_preference, maps.random_half_preference
    assert true_pref.shape == (2,) and rand_pref.shape == (2, 4)
    assert true_pref.min() > 0.45  # random-weight neurons: partial cancellation, noise on the other half
    assert true_pref.min() > rand_pref.max()
    for i, sets in enumerate(maps.random_neurons):
        assert all(len(s) == maps.subclusters[i].size for s in sets)
        np.testing.assert_allclose(maps.random_maps[i, 0], subcluster_map(maps.neuron_maps, sets[0]))
    again = correlation_maps(adapter, part, x, n_random=4, random_state=0)
    assert np.array_equal(again.random_maps, maps.random_maps)
    second = correlation_maps(adapter, part, x, layer=1, n_random=2)
    assert [s.layer for s in second.subclusters] == [1, 1]
    with pytest.raises(ValueError, match="N, C, H, W"):
        correlation_maps(adapter, part, x.reshape(600, 64))


def test_correlation_figure_is_written_and_readable(tmp_path):
    import matplotlib.image as mpimg

    from modlens.report.correlation import save_correlation_figure

    adapter, part = _halves_mlp(per=4)
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    maps = correlation_maps(adapter, part, x, n_random=3)
    path = save_correlation_figure(maps, tmp_path / "fig" / "correlation.png")
    img = mpimg.imread(path)
    assert path.exists() and img.ndim == 3 and img.shape[0] > 100
