"""Replicates trained together equal the networks trained alone with the same seeds."""

from __future__ import annotations

import json

import pytest
import torch

from modlens.cli import main
from modlens.data import load_dataset
from modlens.experiments._stacked import StackedNet, stackable
from modlens.experiments.replicates import train_classifiers_together, train_replicates
from modlens.experiments.train import train_classifier, train_reference
from modlens.nn.io import load_model
from modlens.nn.models import build_model

SEEDS = [3, 0, 7]
MLP = {"type": "mlp", "sizes": [64, 32, 32, 10]}
CNN = {"type": "cnn", "input_shape": [1, 8, 8], "n_classes": 10, "conv": [6, 6, "M", 6, "M"], "dense": [12]}


@pytest.fixture(scope="module")
def digits():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    return torch.from_numpy(tr.x), torch.from_numpy(tr.y), torch.from_numpy(te.x), torch.from_numpy(te.y)


def _subsets(n, k=400):
    """A different training subset per replicate (as each seed's held-out split gives)."""
    return [torch.randperm(n, generator=torch.Generator().manual_seed(100 + s))[:k] for s in SEEDS]


def _max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("arch,conv,extra", [
    (MLP, "grouped", {}),
    (CNN, "grouped", {}),
    (CNN, "loop", {"weight_decay_l2": 1e-3, "augment": {"rotation": 10.0, "shift": 0.1, "flip": True}}),
])
def test_parameters_equal_the_single_path_in_float64(digits, arch, conv, extra):
    x, y = digits[0].double(), digits[1]
    if arch["type"] == "mlp":
        x = x.reshape(len(x), -1)
    idx = _subsets(len(x))
    together = [build_model(arch, generator=torch.Generator().manual_seed(s)).double() for s in SEEDS]
    hist = train_classifiers_together(together, x, y, seeds=SEEDS, indices=idx, epochs=2, batch_size=48, conv=conv, **extra)
    for r, s in enumerate(SEEDS):
        alone = build_model(arch, generator=torch.Generator().manual_seed(s)).double()
        ref = train_classifier(alone, x[idx[r]], y[idx[r]], epochs=2, batch_size=48, seed=s, **extra)
        assert _max_diff(together[r], alone) < 1e-12, (arch["type"], conv, s)
        assert hist[r]["loss"] == pytest.approx(ref["loss"], rel=1e-12, abs=1e-12)
        assert hist[r]["cross_entropy"] == pytest.approx(ref["cross_entropy"], rel=1e-12, abs=1e-12)
    # and the replicates did move apart: different seeds, different networks
    assert _max_diff(together[0], together[1]) > 1e-2


def test_stacked_forward_equals_each_model(digits):
    x = digits[0][:20].double()
    models = [build_model(CNN, generator=torch.Generator().manual_seed(s)).double() for s in SEEDS]
    xs = torch.stack([x, x.flip(0), x * 0.5])
    for conv in ("grouped", "loop"):
        out = StackedNet(models, conv=conv)(xs)
        for r, m in enumerate(models):
            torch.testing.assert_close(out[r], m(xs[r]), rtol=1e-12, atol=1e-12)


def test_mlp_replicates_match_train_reference_in_float32(digits):
    """Stated tolerance, float32: test accuracies equal within one test example (of 451) and
    weights within 1e-4; on one thread the MLP is in fact bit-identical (dense products are the
    kernels F.linear uses)."""
    x_tr, y_tr, x_te, y_te = digits
    got = train_replicates({"type": "mlp"}, x_tr, y_tr, x_te, y_te, seeds=SEEDS[:2], epochs=4, n_val=200,
                           together="together")
    for (model, info), s in zip(got, SEEDS[:2]):
        ref, ref_info = train_reference({"type": "mlp"}, x_tr, y_tr, x_te, y_te, seed=s, epochs=4, n_val=200)
        assert info["trained"] == "together" and not model.training
        assert abs(info["test_accuracy"] - ref_info["test_accuracy"]) <= 1 / len(y_te) + 1e-12
        assert _max_diff(model, ref) < 1e-4
        assert info["val_seed"] == s and info["n_train"] == ref_info["n_train"]
        if torch.get_num_threads() == 1:
            assert _max_diff(model, ref) == 0.0
        assert {k: v for k, v in info.items() if k not in ("trained", "test_accuracy", "val_accuracy", "train_loss")} == \
               {k: v for k, v in ref_info.items() if k not in ("test_accuracy", "val_accuracy", "train_loss")}


def test_cnn_replicates_match_train_reference_in_float32(digits):
    """Grouped convolutions sum in another order than one network's: stated tolerance, float32,
    after 3 epochs: test accuracy within one test example (of 451), weights within 1e-2
    (measured: 3e-3 for this net; rounding differences grow chaotically over the steps)."""
    x_tr, y_tr, x_te, y_te = digits
    arch = {"type": "cnn", "conv": [8, 8, "M", 8, "M"], "dense": [16]}
    got = train_replicates(arch, x_tr, y_tr, x_te, y_te, seeds=[0, 1], epochs=3, n_val=100, together="together")
    for (model, info), s in zip(got, [0, 1]):
        ref, ref_info = train_reference(arch, x_tr, y_tr, x_te, y_te, seed=s, epochs=3, n_val=100)
        assert info["trained"] == "together"
        assert abs(info["test_accuracy"] - ref_info["test_accuracy"]) <= 1 / len(y_te) + 1e-12
        assert _max_diff(model, ref) < 1e-2


def test_vgg_is_trained_one_by_one_and_equals_the_single_path(digits):
    x_tr, y_tr, x_te, y_te = (t[:120] for t in digits)
    vgg = {"type": "vgg", "conv": [4, "M", 4, "M"], "dense": [8, 8]}
    assert "BatchNorm2d" in stackable(build_model(vgg | {"input_shape": [1, 8, 8], "n_classes": 10}))
    assert "dropout" in stackable(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)))
    assert stackable(build_model(CNN)) is None and stackable(build_model(MLP)) is None
    got = train_replicates(vgg, x_tr, y_tr, x_te, y_te, seeds=[0, 1], epochs=1, n_val=20)
    for (model, info), s in zip(got, [0, 1]):
        ref, _ = train_reference(vgg, x_tr, y_tr, x_te, y_te, seed=s, epochs=1, n_val=20)
        assert info["trained"] == "one-by-one"
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError, match="cannot be trained together.*BatchNorm2d"):
        train_replicates(vgg, x_tr, y_tr, x_te, y_te, seeds=[0, 1], epochs=1, n_val=20, together="together")


def test_auto_trains_one_by_one_on_the_cpu(digits):
    x_tr, y_tr, x_te, y_te = (t[:200] for t in digits)
    got = train_replicates(MLP | {"sizes": [64, 16, 10]}, x_tr, y_tr, x_te, y_te, seeds=[0, 1], epochs=1, n_val=20)
    ref, _ = train_reference(MLP | {"sizes": [64, 16, 10]}, x_tr, y_tr, x_te, y_te, seed=1, epochs=1, n_val=20)
    assert [i["trained"] for _, i in got] == ["one-by-one"] * 2
    assert all(torch.equal(a, b) for a, b in zip(got[1][0].state_dict().values(), ref.state_dict().values()))


def test_errors_name_the_problem(digits):
    x, y = digits[0].reshape(len(digits[0]), -1), digits[1]
    models = [build_model(MLP, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    with pytest.raises(ValueError, match="repeat"):
        train_classifiers_together(models, x, y, seeds=[1, 1])
    with pytest.raises(ValueError, match="2 models but 3 seeds"):
        train_classifiers_together(models, x, y, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="one length"):
        train_classifiers_together(models, x, y, seeds=[0, 1], indices=[torch.arange(10), torch.arange(9)])
    other = build_model({"type": "mlp", "sizes": [64, 16, 10]})
    with pytest.raises(ValueError, match="share one architecture"):
        StackedNet([models[0], other])


def test_cli_train_seeds_writes_one_model_per_seed(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--epochs", "2"]
    assert main(args + ["--seeds", "0,1", "--together", "--out", str(tmp_path / "set")]) == 0
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "alone")]) == 0
    out = capsys.readouterr()
    assert "trained together" in out.out and "loss" in out.err
    together, m_t = load_model(tmp_path / "set" / "seed1")
    alone, m_a = load_model(tmp_path / "alone")
    assert m_t["seed"] == 1 and m_t["dataset"] == m_a["dataset"] and m_t["architecture"] == m_a["architecture"]
    assert abs(m_t["accuracy"] - m_a["accuracy"]) <= 1 / 451 + 1e-12
    assert _max_diff(together, alone) < 1e-4
    if torch.get_num_threads() == 1:  # same kernels, same order: the same bytes
        assert (tmp_path / "set" / "seed1" / "model.safetensors").read_bytes() == \
               (tmp_path / "alone" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "set" / "seed0" / "manifest.json").read_text())["seed"] == 0
    with pytest.raises(SystemExit):
        main(args + ["--seeds", "0,0", "--out", str(tmp_path / "bad")])
    assert "distinct" in capsys.readouterr().err and not (tmp_path / "bad").exists()
