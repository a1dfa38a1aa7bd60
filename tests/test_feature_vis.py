"""Tests for the feature-visualization test (modlens.experiments.feature_vis), its figure and
the original code's pairwise visualization effect (modlens.core.stats)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from modlens.core import stats
from modlens.core.partition import Partition
from modlens.core.seeds import as_generator
from modlens.experiments import feature_vis as fv
from modlens.experiments.feature_vis import COLUMNS, ORIGINAL, feature_vis_test, subcluster_objective, unit_values
from modlens.experiments.lesion_test import random_sets
from modlens.nn import NetworkAdapter
from modlens.nn.models import mlp


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a busy 2-core machine: a second OpenMP thread costs ~100x in waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(seed=0, sizes=(64, 12, 12, 10)):
    model = mlp(list(sizes), generator=torch.Generator().manual_seed(seed)).double()
    adapter = NetworkAdapter(model)
    part = Partition.from_labels([np.arange(12) % 3, np.arange(12) % 4], adapter.layer_names, adapter.layer_sizes)
    return adapter, part


def _patterns(h=8, w=8):
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    left, top = c < w // 2, r < h // 2
    return np.stack([np.where(p, 1.0, -1.0).ravel() for p in (left, top, left == top)])


def _planted(seed=0, per=5):
    """Three modules of ``per`` neurons in each of two hidden layers. Layer-1 neurons of module
    k share a +-1 pattern over all 64 pixels (left/right, top/bottom, diagonal quadrants) plus
    noise, and a bias that makes them agree in sign; layer-2 neurons read only their module.
    The patterns compete for the same pixels, so a mixed set cannot be maximized at once."""
    g = np.random.default_rng(seed)
    pats = _patterns()
    k, n = len(pats), len(pats) * per
    w1 = np.repeat(pats, per, 0) * (1 + 0.3 * g.standard_normal((n, 64)))
    w2 = np.kron(np.eye(k), np.ones((per, per))) * (0.5 + 0.5 * g.random((n, n)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 10))
    model = model.double()
    with torch.no_grad():
        for lin, w in zip([model[1], model[3], model[5]], [w1, w2, g.standard_normal((10, n))]):
            lin.weight.copy_(torch.as_tensor(w))
            lin.bias.zero_()
        model[1].bias.fill_(3.0)
    labels = np.repeat(np.arange(k), per)
    adapter = NetworkAdapter(model)
    return adapter, Partition.from_labels([labels, labels], adapter.layer_names, adapter.layer_sizes)


# ----------------------------------------------------------------------------- objective


def test_objective_on_conv_and_linear_shapes():
    z = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]], [[1.0, 1.0], [1.0, -1.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    assert unit_values(z, "l1").tolist() == [[10.0, 4.0, 20.0]]
    assert unit_values(z, "spatial_mean_abs").tolist() == [[0.5, 0.5, 5.0]]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert subcluster_objective(z, mask).item() == 14.0
    lin = torch.tensor([[1.0, -2.0, 3.0]])
    assert subcluster_objective(lin, mask, "spatial_mean_abs").item() == 3.0


def test_objective_increases():
    adapter, part = _tiny()
    kw = dict(n_random=2, random_state=3)
    start = feature_vis_test(adapter, part, (1, 8, 8), steps=0, **kw).table["vis_score"]
    plain = feature_vis_test(adapter, part, (1, 8, 8), steps=15, transforms="none", **kw).table["vis_score"]
    assert (plain > start + 1e-6).all()
    jittered = feature_vis_test(adapter, part, (1, 8, 8), steps=15, **kw).table["vis_score"]
    assert jittered.mean() > 1.5 * start.mean()
    plan, _, _ = fv._build_plan(adapter, part, (1, 8, 8), steps=15, transforms="none", **kw)
    *_, trace = fv._optimize(adapter, plan, [0, 5, 20], history=True)
    assert trace.shape == (15, 3)
    assert (trace[-1] > trace[0]).all()
    assert (torch.diff(trace, dim=0) > -1e-9).float().mean() > 0.9  # nearly monotone without transforms


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("param,transforms", [("pixel", "jitter-scale"), ("fourier", "lucid"), ("pixel", "none")])
def test_batched_equals_one_at_a_time(param, transforms):
    adapter, part = _tiny(1)
    kw = dict(n_random=3, steps=12, random_state=7, parameterization=param, transforms=transforms)
    batched = feature_vis_test(adapter, part, (1, 8, 8), **kw)
    single = feature_vis_test(adapter, part, (1, 8, 8), batched=False, **kw)
    chunked = feature_vis_test(adapter, part, (1, 8, 8), batch_size=5, **kw)
    for other in (single, chunked):
        assert torch.allclose(torch.as_tensor(batched.images), torch.as_tensor(other.images), rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched.table["vis_score"], other.table["vis_score"], rtol=1e-10)
        np.testing.assert_allclose(batched.table["softmax_entropy"], other.table["softmax_entropy"], rtol=1e-10)
    # a subset optimized on its own, by the private entry point the benchmark times
    plan, _, _ = fv._build_plan(adapter, part, (1, 8, 8), **kw)
    rows = [2, 9, 17]
    images, scores, _, _ = fv._optimize(adapter, plan, rows)
    assert torch.allclose(images, torch.as_tensor(batched.images[rows]), rtol=0, atol=1e-10)


def test_same_seed_same_images_and_table():
    adapter, part = _tiny(2)
    a = feature_vis_test(adapter, part, (1, 8, 8), n_random=2, steps=8, random_state=11)
    b = feature_vis_test(adapter, part, (1, 8, 8), n_random=2, steps=8, random_state=11)
    c = feature_vis_test(adapter, part, (1, 8, 8), n_random=2, steps=8, random_state=12)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


# ----------------------------------------------------------------------------- the table


def test_table_schema_and_random_controls():
    adapter, part = _tiny()
    res = feature_vis_test(adapter, part, (1, 8, 8), n_random=4, steps=2, random_state=5)
    t = res.table
    assert list(t.columns) == COLUMNS
    assert res.images.shape == (len(t), 1, 8, 8)
    subs = part.subclusters()
    assert len(t) == 5 * len(subs)
    assert (t["kind"] == "true").sum() == len(subs)
    assert t.groupby(["layer", "cluster"])["draw"].apply(list).map(lambda d: d == [0, 1, 2, 3, 4]).all()
    rng = as_generator(5)  # the lesion test's draws for the same random_state
    expected = []
    for sc in subs:
        expected += [",".join(map(str, sc.neurons))] + [",".join(map(str, s)) for s in random_sets(12, sc.size, 4, rng)]
    assert t["neurons"].tolist() == expected
    assert (t["size"] == t["neurons"].str.count(",") + 1).all()


def test_scores_and_entropy_recomputed_from_images():
    adapter, part = _tiny(3)

    def preprocess(x):
        return 2 * x - 1

    res = feature_vis_test(adapter, part, (1, 8, 8), n_random=2, steps=6, preprocess=preprocess)
    x = torch.as_tensor(res.images)
    for layer in (0, 1):
        rows = np.flatnonzero(res.table["layer"] == layer)
        z = adapter.values([layer])(preprocess(x[rows])).detach()
        for r, row in zip(rows, z):
            members = [int(i) for i in res.table["neurons"].iloc[r].split(",")]
            assert res.table["vis_score"].iloc[r] == pytest.approx(row[members].abs().sum().item(), rel=1e-12)
    logp = torch.log_softmax(adapter.model(preprocess(x)), 1)
    entropy = -(logp.exp() * logp).sum(1)
    np.testing.assert_allclose(res.table["softmax_entropy"], entropy.detach().numpy(), rtol=1e-12)
    # a model that ends in a softmax is not normalized twice
    soft = NetworkAdapter(nn.Sequential(adapter.model, nn.Softmax(dim=1)))
    res2 = feature_vis_test(soft, part, (1, 8, 8), n_random=2, steps=6, preprocess=preprocess)
    np.testing.assert_allclose(res2.table["softmax_entropy"], res.table["softmax_entropy"], rtol=1e-12)


def test_value_range_original_preset_and_model_untouched():
    adapter, part = _tiny(4)
    adapter.model.train()
    part = Partition.from_labels([np.arange(12) % 6, np.arange(12) % 4], adapter.layer_names, adapter.layer_sizes)
    res = feature_vis_test(adapter, part, (1, 8, 8), n_random=2, steps=10, lr=0.3, value_range=(-1.0, 1.0))
    assert res.images.min() >= -1.0 and res.images.max() <= 1.0 and res.images.max() > 0.9
    assert adapter.model.training  # eval only during the optimization
    assert all(p.grad is None for p in adapter.model.parameters())
    orig = feature_vis_test(adapter, part, (1, 8, 8), n_random=2, **{**ORIGINAL, "steps": 5})
    assert orig.config["parameterization"] == "fourier" and orig.config["objective"] == "spatial_mean_abs"
    assert (orig.table["layer"] == 1).all()  # row 7: size >= 3 (layer 0 has size-2 clusters only)
    assert 0 < orig.images.min() and orig.images.max() < 1  # sigmoid
    rgb = feature_vis_test(NetworkAdapter(mlp([192, 12, 12, 10], generator=torch.Generator().manual_seed(0))), part,
                           (3, 8, 8), n_random=1, **{**ORIGINAL, "steps": 3})
    assert rgb.images.shape[1:] == (3, 8, 8)
    with pytest.raises(ValueError, match="input_shape"):
        feature_vis_test(adapter, part, (1, 1, 8, 8), n_random=1, steps=1)
    with pytest.raises(ValueError, match="parameterization"):
        feature_vis_test(adapter, part, (1, 8, 8), parameterization="cppn")


# ----------------------------------------------------------------------------- planted modules


def test_planted_modules_score_higher_than_random_sets():
    adapter, part = _planted()
    res = feature_vis_test(adapter, part, (1, 8, 8), n_random=9, steps=20, random_state=0)
    t = res.table
    true = t[t["kind"] == "true"]["vis_score"].to_numpy()
    rand = t[t["kind"] == "random"]["vis_score"].to_numpy().reshape(len(true), -1)
    pct = stats.percentiles(true, rand, higher_is_modular=True)
    assert (pct <= 0.1).all(), pct  # every module beats all (or all but one) of its 9 random sets
    assert stats.fisher(pct)[1] < 1e-3
    assert (stats.pairwise_effect_values(true, rand) > 1).mean() > 0.9


# ----------------------------------------------------------------------------- stats + figure


def test_pairwise_effect_values():
    got = stats.pairwise_effect_values([1.0, 0.0, 2.0], [[1.0, 3.0], [0.0, 1.0], [2.0, 6.0]])
    np.testing.assert_allclose(got, [[1.0, 0.5], [1.0, 0.0], [1.0, 0.5]])
    mean, se = stats.effect_measure(got.ravel())
    assert mean == pytest.approx(np.mean(got)) and se > 0
    with pytest.raises(ValueError, match="shape"):
        stats.pairwise_effect_values([1.0], [[1.0], [2.0]])


def test_vis_grids_are_written_and_readable(tmp_path):
    import matplotlib.image as mpimg

    from modlens.analysis.figures import save_vis_grids

    adapter, part = _tiny()
    res = feature_vis_test(adapter, part, (1, 8, 8), n_random=3, steps=2, name="weights/global")
    paths = save_vis_grids(res, tmp_path)
    assert [p.name for p in paths] == ["feature_vis_weights-global_layer0.png", "feature_vis_weights-global_layer1.png"]
    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 100
    for channels in (2, 3):  # two channels side by side; three as RGB
        res2 = fv.VisResult(res.table, np.repeat(res.images, channels, axis=1), res.config)
        assert all(mpimg.imread(p).size for p in save_vis_grids(res2, tmp_path / str(channels)))


def test_separable_jitter_scale_equals_grid_sample():
    """The jitter-scale transform's two matrix products are grid_sample with reflection."""
    g = torch.Generator().manual_seed(0)
    for h, w in [(8, 8), (7, 12)]:
        img = torch.rand(20, 2, h, w, generator=g, dtype=torch.float64)
        scale = 0.5 + torch.rand(20, generator=g, dtype=torch.float64)
        dx, dy = (torch.randint(-6, 7, (20,), generator=g).double() for _ in range(2))
        theta = torch.zeros(20, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, 0, 2], theta[:, 1, 2] = -2 * dx / w, -2 * dy / h
        grid = torch.nn.functional.affine_grid(theta, list(img.shape), align_corners=False)
        want = torch.nn.functional.grid_sample(img, grid, padding_mode="reflection", align_corners=False)
        rows = fv._reflect_resample(h, scale, dy, torch.float64)[:, None]
        cols = fv._reflect_resample(w, scale, dx, torch.float64)[:, None]
        assert torch.allclose(rows @ img @ cols.transpose(-1, -2), want, rtol=0, atol=1e-12)


def test_partition_without_testable_subclusters_gives_an_empty_table():
    adapter, _ = _tiny()
    whole = Partition.from_labels([np.zeros(12), np.zeros(12)], adapter.layer_names, adapter.layer_sizes)
    res = feature_vis_test(adapter, whole, (1, 8, 8), n_random=2, steps=2)
    assert list(res.table.columns) == COLUMNS and len(res.table) == 0 and res.images.shape == (0, 1, 8, 8)


def test_default_transforms_follow_the_input_size():
    from modlens.experiments.feature_vis import default_transforms

    assert default_transforms((1, 28, 28)) == "jitter-scale"
    assert default_transforms((3, 32, 32)) == "jitter-scale"
    assert default_transforms((3, 224, 224)) == "lucid"
