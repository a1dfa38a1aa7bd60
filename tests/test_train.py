"""Training: seeded determinism, accuracy, validation split, the reference recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modlens.data import split_validation
from modlens.experiments.train import accuracy, train_classifier, train_reference_mlp
from modlens.nn.models import mlp


def _blobs(n=500, n_classes=10, dim=20, seed=0, image=False):
    """Linearly separable classes: well-separated Gaussian blobs, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.1, 0.9, size=(n_classes, dim))
    y = rng.integers(0, n_classes, size=n)
    x = np.clip(centers[y] + rng.normal(0, 0.03, size=(n, dim)), 0, 1).astype(np.float32)
    x_t = torch.from_numpy(x)
    if image:
        x_t = x_t.reshape(n, 1, 4, dim // 4)
    return x_t, torch.from_numpy(y.astype(np.int64))


def _model(seed=0, dim=20, n_classes=10):
    return mlp([dim, 32, 32, n_classes], generator=torch.Generator().manual_seed(seed))


def test_learns_separable_problem():
    x, y = _blobs()
    model = _model()
    calls = []
    hist = train_classifier(model, x, y, epochs=15, batch_size=32, seed=0,
                            progress=lambda e, n, loss: calls.append((e, n, loss)))
    assert len(hist["loss"]) == 15 and hist["loss"][-1] < hist["loss"][0]
    assert [c[:2] for c in calls] == [(e, 15) for e in range(1, 16)]
    assert accuracy(model, x, y) > 0.9
    assert model.training  # mode restored


def test_training_is_deterministic_for_a_seed():
    x, y = _blobs(n=300)
    states, losses = [], []
    for _ in range(2):
        model = _model(seed=3)
        losses.append(train_classifier(model, x, y, epochs=3, batch_size=50, seed=11)["loss"])
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = _model(seed=3)
    train_classifier(other, x, y, epochs=3, batch_size=50, seed=12)
    assert not torch.equal(other.state_dict()["1.weight"], states[0]["1.weight"])


def test_adam_uses_keras_defaults(monkeypatch):
    seen = {}
    real = torch.optim.Adam

    def spy(params, **kwargs):
        seen.update(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    x, y = _blobs(n=40)
    train_classifier(_model(), x, y, epochs=1)
    assert seen == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}


def test_accuracy_batch_size_invariant_and_eval_mode():
    x, y = _blobs(n=257)
    model = _model()
    model.train()
    a = accuracy(model, x, y, batch_size=1024)
    assert a == accuracy(model, x, y, batch_size=10)
    assert 0.0 <= a <= 1.0 and model.training
    manual = float((model(x).argmax(1) == y).float().mean())
    assert a == pytest.approx(manual)


def test_input_validation():
    x, y = _blobs(n=20)
    with pytest.raises(ValueError, match="int64"):
        train_classifier(_model(), x, y.to(torch.int32), epochs=1)
    with pytest.raises(ValueError, match="19"):
        accuracy(_model(), x, y[:19])


def test_split_validation():
    tr, va = split_validation(100, 30, seed=5)
    assert len(tr) == 70 and len(va) == 30
    assert not set(tr) & set(va) and sorted(set(tr) | set(va)) == list(range(100))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    tr2, va2 = split_validation(100, 30, seed=5)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(va, split_validation(100, 30, seed=6)[1])
    with pytest.raises(ValueError, match="n_val"):
        split_validation(10, 10, seed=0)


def test_train_reference_mlp():
    x, y = _blobs(n=600, image=True, seed=1)
    x_test, y_test = _blobs(n=200, image=True, seed=1)  # same centers (same seed), new draws below
    x_test = torch.clamp(x_test + 0.01 * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(0)), 0, 1)
    kwargs = dict(seed=4, epochs=12, batch_size=32, n_val=100, hidden=(32, 32))
    model, info = train_reference_mlp(x, y, x_test, y_test, **kwargs)
    assert not model.training
    json.dumps(info)
    assert info["architecture"] == {"type": "mlp", "sizes": [20, 32, 32, 10], "activation": "relu"}
    assert info["n_train"] == 500 and info["n_val"] == 100 and info["val_seed"] == 4
    for key in ("seed", "epochs", "batch_size", "lr", "test_accuracy", "val_accuracy", "train_loss"):
        assert key in info
    assert info["test_accuracy"] > 0.9 and info["val_accuracy"] > 0.9
    assert len(info["train_loss"]) == 12
    model2, info2 = train_reference_mlp(x, y, x_test, y_test, **kwargs)
    assert info2 == info
    assert all(torch.equal(model.state_dict()[k], model2.state_dict()[k]) for k in model.state_dict())


def test_reference_mlp_never_trains_on_validation(monkeypatch):
    import modlens.experiments.train as train_mod

    x, y = _blobs(n=120)
    x = x.clone()
    x[:, 0] = torch.arange(120, dtype=torch.float32) / 1000  # tag each sample with its index
    seen = {}
    real = train_mod.train_classifier

    def spy(model, xt, yt, **kw):
        seen["idx"] = set(torch.round(xt[:, 0] * 1000).long().tolist())
        return real(model, xt, yt, **kw)

    monkeypatch.setattr(train_mod, "train_classifier", spy)
    _, info = train_reference_mlp(x, y, x, y, seed=2, epochs=1, n_val=20, hidden=(8,))
    _, val_idx = split_validation(120, 20, info["val_seed"])
    assert len(seen["idx"]) == 100 and not seen["idx"] & set(val_idx.tolist())
