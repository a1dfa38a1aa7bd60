"""Feature visualization of inputs that are not images: vectors (D,), sequences (T, D), and
integer inputs (token ids), which are refused with one line while the lesion tests still run."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as sps
from scipy.linalg import hadamard
from torch import nn

import modlens
from modlens.core import stats
from modlens.core.partition import Partition
from modlens.experiments import _vis_transforms as vt
from modlens.experiments.feature_vis import continuous_input_problem, feature_vis_test
from modlens.experiments.partitioning import METHODS
from modlens.nn import NetworkAdapter
from modlens.nn.models import mlp

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def coherent_mlp(d=32, k=4, per=6, seed=0):
    """A 32-feature MLP with ``k`` planted modules of ``per`` units in each of two hidden layers.

    Layer-1 units of module m share a +-1 pattern over all d features (row m + 1 of a Hadamard
    matrix: the patterns are orthogonal) plus noise, and a bias that makes them agree in sign;
    layer-2 units read only their own module. The patterns compete for the same features, so a
    set mixing modules cannot be maximized by one input, while a module can."""
    g = np.random.default_rng(seed)
    pats = hadamard(d)[1:k + 1].astype(float)
    n = k * per
    w1 = np.repeat(pats, per, 0) * (1 + 0.3 * g.standard_normal((n, d)))
    w2 = np.kron(np.eye(k), np.ones((per, per))) * (0.5 + 0.5 * g.random((n, n)))
    model = nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 8))
    with torch.no_grad():
        for lin, w in zip(model[::2], [w1, w2, g.standard_normal((8, n))]):
            lin.weight.copy_(torch.as_tensor(w))
            lin.bias.zero_()
        model[0].bias.fill_(3.0)
    return model.eval(), [np.repeat(np.arange(k), per)] * 2


def _labelled(model, shape, n, seed):
    """Inputs drawn from N(0, 1) and the model's own predictions as labels."""
    x = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


class SeqNet(nn.Module):
    """A sequence classifier on (T, D) inputs: a Linear over D at every position (a 1x1
    convolution), a convolution along T, the mean over T, a Linear head."""

    def __init__(self, d=5, h=8, n_classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv1d(d, h, 1)
        self.mix = nn.Conv1d(h, h, 3, padding=1)
        self.head = nn.Linear(h, n_classes)

    def forward(self, x):  # x: (B, T, D)
        z = torch.relu(self.embed(x.transpose(1, 2)))
        return self.head(torch.relu(self.mix(z)).mean(2))


class TokenNet(nn.Module):
    """Token ids (B, L) in [0, 10), one-hot encoded inside: the input reaches no layer by gradient."""

    def __init__(self, length=5, vocab=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = vocab
        self.l1, self.l2, self.out = nn.Linear(length * vocab, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = F.one_hot(x.long(), self.vocab).float().flatten(1)
        return self.out(torch.relu(self.l2(torch.relu(self.l1(h)))))


# ----------------------------------------------------------------------------- transforms


def test_input_kinds_and_default_transforms():
    assert [vt.input_kind(s) for s in [(32,), (8, 5), (1, 8, 8)]] == ["vector", "sequence", "image"]
    assert [vt.default_transforms(s) for s in [(32,), (8, 5), (1, 28, 28), (3, 224, 224)]] == [
        "noise", "noise-shift", "jitter-scale", "lucid"]
    with pytest.raises(ValueError, match=r"\(D,\) for a vector"):
        vt.input_kind((1, 2, 3, 4))
    with pytest.raises(ValueError, match="does not apply to vector inputs"):
        vt.check_transforms("jitter-scale", (32,))
    assert [vt.max_shift(t) for t in (1, 3, 4, 16, 40, 64)] == [0, 0, 1, 1, 2, 4]


def test_noise_shift_is_noise_then_a_circular_roll():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 40, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 40, 3, generator=g, dtype=torch.float64)
    u = torch.rand(6, 1, generator=g, dtype=torch.float64)
    got = vt.apply_transform(x, u, "noise-shift", (-1.0, 3.0), noise)
    shifts = (torch.floor(u[:, 0] * 5) - 2).long()  # T = 40: shifts in [-2, 2]
    want = torch.stack([torch.roll(x[b] + 0.02 * 4.0 * noise[b], int(shifts[b]), 0) for b in range(6)])
    assert torch.equal(got, want)
    assert set(shifts.tolist()) != {0}
    assert torch.equal(vt.apply_transform(x[:, 0], u, "noise", (0.0, 1.0), noise[:, 0]), x[:, 0] + 0.02 * noise[:, 0])


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("shape,transforms", [((32,), "noise"), ((32,), "none"), ((12, 5), "noise-shift")])
def test_batched_equals_one_at_a_time_for_vectors_and_sequences(shape, transforms):
    if len(shape) == 1:  # zero biases, inputs start near 0: the noise flips signs, so it matters
        adapter = NetworkAdapter(mlp([32, 12, 12, 10], generator=torch.Generator().manual_seed(0)).double())
        modules = [np.arange(12) % 3, np.arange(12) % 4]
    else:
        adapter = NetworkAdapter(SeqNet().double())
        modules = [np.arange(8) % 2, np.arange(8) % 3]
    part = Partition.from_labels(modules, adapter.layer_names, adapter.layer_sizes)
    kw = dict(n_random=3, steps=10, random_state=7, transforms=transforms, value_range=(-2.0, 2.0))
    batched = feature_vis_test(adapter, part, shape, **kw)
    assert batched.images.shape == (len(batched.table),) + shape
    for other in (feature_vis_test(adapter, part, shape, batched=False, **kw),
                  feature_vis_test(adapter, part, shape, batch_size=5, **kw)):
        assert np.allclose(batched.images, other.images, rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched.table["vis_score"], other.table["vis_score"], rtol=1e-10)
        np.testing.assert_allclose(batched.table["softmax_entropy"], other.table["softmax_entropy"], rtol=1e-10)
    if transforms != "none":  # the transform is applied
        assert not np.allclose(batched.images, feature_vis_test(adapter, part, shape, **{**kw, "transforms": "none"}).images)
    start = feature_vis_test(adapter, part, shape, **{**kw, "steps": 0})
    assert (batched.table["vis_score"] > start.table["vis_score"]).mean() > 0.9
    assert batched.images.min() >= -2.0 and batched.images.max() <= 2.0
    with pytest.raises(ValueError, match="images"):
        feature_vis_test(adapter, part, shape, **{**kw, "transforms": "none"}, parameterization="fourier")


# ----------------------------------------------------------------------------- analyze


def test_planted_vector_modules_score_higher_than_random_sets(tmp_path):
    model, modules = coherent_mlp()
    test, act = _labelled(model, (32,), 400, 1), _labelled(model, (32,), 300, 2)[0]
    res = modlens.analyze(model, test, activation_data=act, n_clusters=4, n_random=9, feature_vis=True,
                          vis_options={"steps": 30})
    s = res.summary.set_index(["partitioning", "metric"])
    for method in METHODS:  # every partitioning gets both coherence rows
        for metric in ("vis_score", "softmax_entropy"):
            assert s.loc[(method, metric), "n_subclusters"] >= 1
    assert set(res.visualizations["partitioning"]) == set(METHODS)
    assert res.config["feature_vis"]["transforms"] == "noise"
    lo, hi = res.config["feature_vis"]["value_range"]
    assert (lo, hi) == (float(test[0].min()), float(test[0].max()))  # the data's range

    planted = [m.tolist() for m in modules]
    kw = dict(partition=planted, n_random=19, random_state=3, feature_vis=True, vis_options={"steps": 30})
    a = modlens.analyze(model, test, **kw)
    row = a.summary.set_index("metric").loc["vis_score"]
    assert row["n_subclusters"] == 8 and row["p_value"] < 1e-3, a.summary
    t = a.visualizations
    true = t[t["kind"] == "true"]["vis_score"].to_numpy()
    rand = t[t["kind"] == "random"]["vis_score"].to_numpy().reshape(len(true), -1)
    fisher = sps.combine_pvalues(stats.percentiles(true, rand, higher_is_modular=True), method="fisher")[1]
    assert fisher == pytest.approx(row["p_value"], rel=1e-9)  # independent reference: scipy
    b = modlens.analyze(model, test, **kw)
    pd.testing.assert_frame_equal(a.visualizations, b.visualizations)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    assert np.array_equal(a.vis_results[0].images, b.vis_results[0].images)

    out = a.save(tmp_path / "run")  # vector figures: heat strips, one panel per subcluster
    import matplotlib.image as mpimg

    figs = sorted((out / "figures").glob("*.png"))
    assert [p.name for p in figs] == ["feature_vis_user_layer0.png", "feature_vis_user_layer1.png"]
    assert all(mpimg.imread(p).shape[0] > 200 for p in figs)


def test_block_input_planted_mlp_runs_with_feature_vis(planted):
    """The lesion tests' planted MLP (24 features, 4 modules reading disjoint input blocks).
    Its modules are important, but not coherent in this sense: a random set spread over the
    blocks is maximized block by block, so no vis_score significance is expected here."""
    model, modules, test, (xa, _) = planted
    res = modlens.analyze(model, test, activation_data=xa, n_clusters=4, n_random=4, feature_vis=True,
                          vis_options={"steps": 5})
    got = res.summary.groupby("partitioning")["metric"].apply(set)
    assert all(got[m] == {"acc_drop", "class_range", "vis_score", "softmax_entropy"} for m in METHODS)
    assert res.vis_results[0].images.shape[1:] == (24,)


def test_sequence_model_end_to_end(tmp_path):
    model = SeqNet()
    test, act = _labelled(model, (12, 5), 300, 1), _labelled(model, (12, 5), 200, 2)[0]
    res = modlens.analyze(model, test, activation_data=act, partitionings=["weights/global", "activations/global"],
                          n_clusters=3, n_random=4, feature_vis=True, vis_options={"steps": 10})
    assert set(res.summary["metric"]) == {"acc_drop", "class_range", "vis_score", "softmax_entropy"}
    assert res.config["feature_vis"]["transforms"] == "noise-shift"
    assert all(r.images.shape[1:] == (12, 5) for r in res.vis_results)
    assert np.isfinite(res.visualizations[["vis_score", "softmax_entropy"]].to_numpy()).all()
    out = res.save(tmp_path / "seq")
    assert len(list((out / "figures").glob("feature_vis_*.png"))) == 2 * 2  # 2 partitionings x 2 conv layers


def test_integer_inputs_skip_feature_vis_and_keep_the_lesions():
    model = TokenNet()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (300, 5), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    part = [np.arange(16) % 2, np.arange(16) % 2]
    with pytest.warns(UserWarning, match="needs continuous inputs") as caught:
        res = modlens.analyze(model, (x, y), partition=part, n_random=4, feature_vis=True)
    message = str(caught[0].message)
    # integer inputs stay integer at the boundary (token ids), so the dtype itself is the reason given
    assert "\n" not in message and "are int64 (token ids" in message and "lesion tests ran" in message
    assert res.config["feature_vis"] == {"skipped": message}
    assert set(res.summary["metric"]) == {"acc_drop", "class_range"}
    assert len(res.subclusters) == 4 * 5 and res.visualizations is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without feature_vis: no warning
        modlens.analyze(model, (x, y), partition=part, n_random=4)
    adapter = NetworkAdapter(model)
    with pytest.raises(ValueError, match="continuous inputs"):
        feature_vis_test(adapter, Partition.from_labels(part, adapter.layer_names, adapter.layer_sizes), (5,))
    assert "int64 (token ids" in continuous_input_problem(adapter, x)
    assert continuous_input_problem(NetworkAdapter(coherent_mlp()[0]), torch.zeros(2, 32)) is None
