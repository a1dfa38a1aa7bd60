"""Training conv nets: recipes, the Keras-style L2 penalty, seeded augmentation, train_reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from modlens.experiments.train import (
    PAPER_AUGMENT,
    augment_images,
    complete_architecture,
    l2_penalty,
    recipe,
    train_classifier,
    train_reference,
    train_reference_mlp,
)
from modlens.nn.io import load_model, save_model
from modlens.nn.models import build_model

TINY_CNN = {"type": "cnn", "conv": [4, "M"], "dense": [8]}
TINY_VGG = {"type": "vgg", "conv": [4, "M", 8, "M"], "dense": [8, 8]}


def _images(n=120, seed=0, channels=1, side=8):
    """Two classes told apart by where the bright stripe is (left or right half)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.uniform(0, 0.2, size=(n, channels, side, side)).astype(np.float32)
    for i, label in enumerate(y):
        cols = slice(0, side // 2) if label == 0 else slice(side // 2, side)
        x[i, :, :, cols] += 0.7
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def test_recipes_follow_the_notes():
    assert recipe({"type": "cnn"}) == {"epochs": 10, "batch_size": 64, "weight_decay_l2": 0.0, "augment": None}
    assert recipe({"type": "vgg"}) == {"epochs": 200, "batch_size": 128, "weight_decay_l2": 5e-4,
                                       "augment": {"rotation": 15.0, "shift": 0.1, "flip": True}}
    assert recipe({"type": "mlp"})["epochs"] == 20 and recipe({"type": "small_resnet"}) == recipe({"type": "mlp"})


def test_l2_penalty_is_the_sum_of_squared_kernels():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1, generator=torch.Generator().manual_seed(p.numel()))
    # kernels only: no biases, no batch-norm gamma
    by_hand = sum(float((m.weight.detach().double() ** 2).sum()) for m in (model[0], model[4]))
    assert float(l2_penalty(model).detach()) == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        l2_penalty(nn.Sequential(nn.ReLU()))


def test_l2_penalty_is_added_to_the_loss_not_to_adam(monkeypatch):
    x, y = _images(n=40)
    model = build_model(complete_architecture(TINY_CNN, (1, 8, 8), 2), generator=torch.Generator().manual_seed(0))
    penalty = float(l2_penalty(model).detach())
    seen = {}
    real = torch.optim.Adam

    def spy(params, **kwargs):
        seen.update(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    hist = train_classifier(model, x, y, epochs=1, batch_size=16, lr=0.0, weight_decay_l2=0.01)
    assert "weight_decay" not in seen
    # lr 0 keeps the weights, so every batch's loss is its cross-entropy plus the same penalty
    assert hist["loss"][0] - hist["cross_entropy"][0] == pytest.approx(0.01 * penalty, rel=1e-5)


def test_augmentation_is_seeded_and_changes_images():
    x, _ = _images(n=16, channels=3)
    a = augment_images(x, torch.Generator().manual_seed(5))
    b = augment_images(x, torch.Generator().manual_seed(5))
    c = augment_images(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a - x).abs().flatten(1).amax(1) > 1e-3
    assert bool(changed.all())
    same = augment_images(x, torch.Generator().manual_seed(5), rotation=0.0, shift=0.0, flip=False)
    assert torch.allclose(same, x, atol=1e-6)


def test_flip_only_mirrors_about_half_the_images():
    x = torch.rand(64, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    out = augment_images(x, torch.Generator().manual_seed(1), rotation=0.0, shift=0.0, flip=True)
    flipped = torch.tensor([torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all()) and 16 < int(flipped.sum()) < 48


def _centroid(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    return torch.stack([(img * ys).sum(), (img * xs).sum()]) / img.sum()


def test_rotation_keeps_the_centre_and_shifts_stay_within_ten_percent():
    side = 31
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    blob = torch.exp(-((ys - 15) ** 2 + (xs - 15) ** 2 / 4) / 8)  # an elongated blob in the centre
    x = blob.expand(32, 1, side, side).contiguous()
    rot = augment_images(x, torch.Generator().manual_seed(0), rotation=15.0, shift=0.0, flip=False)
    for img in rot[:, 0]:
        assert torch.allclose(_centroid(img), torch.tensor([15.0, 15.0]), atol=0.05)
    assert (rot - x).abs().amax() > 0.05  # the elongated blob did turn
    moved = augment_images(x, torch.Generator().manual_seed(0), rotation=0.0, shift=0.1, flip=False)
    offsets = torch.stack([_centroid(img) for img in moved[:, 0]]) - 15.0
    assert offsets.abs().max() <= 0.1 * side + 0.05 and offsets.abs().max() > 0.5 * 0.1 * side


def test_augmented_training_is_deterministic_per_seed():
    x, y = _images(n=48, channels=3)
    states = []
    for seed in (3, 3, 4):
        model = build_model(complete_architecture(TINY_CNN, (3, 8, 8), 2), generator=torch.Generator().manual_seed(0))
        train_classifier(model, x, y, epochs=1, batch_size=16, seed=seed, augment=True)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["conv1.weight"], states[2]["conv1.weight"])
    with pytest.raises(ValueError, match="shift"):
        train_classifier(model, x, y, epochs=1, augment={"shift": 2.0})
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        train_classifier(build_model({"type": "mlp", "sizes": [192, 2]}), x.flatten(1), y, epochs=1, augment=True)


def test_train_reference_small_cnn_learns():
    x, y = _images(n=240, seed=1)
    xt, yt = _images(n=60, seed=2)
    model, info = train_reference(TINY_CNN, x, y, xt, yt, seed=0, epochs=4, batch_size=16, n_val=40)
    json.dumps(info)
    assert not model.training
    assert info["architecture"] == {**TINY_CNN, "input_shape": [1, 8, 8], "n_classes": 2}
    assert info["n_train"] == 200 and info["weight_decay_l2"] == 0.0 and info["augment"] is None
    assert info["train_loss"][-1] < info["train_loss"][0]
    assert info["test_accuracy"] > 0.9 and info["val_accuracy"] > 0.9


def test_train_reference_vgg_recipe_is_deterministic(tmp_path):
    x, y = _images(n=57, seed=3, channels=3)  # 49 training samples: the last batch of 16 would hold one
    kwargs = dict(seed=1, epochs=2, batch_size=16, n_val=8)
    model, info = train_reference(TINY_VGG, x, y, x[:20], y[:20], **kwargs)
    assert info["weight_decay_l2"] == 5e-4 and info["augment"] == PAPER_AUGMENT
    assert len(info["train_cross_entropy"]) == 2
    assert all(lo > ce for lo, ce in zip(info["train_loss"], info["train_cross_entropy"]))
    model2, info2 = train_reference(TINY_VGG, x, y, x[:20], y[:20], **kwargs)
    assert info2 == info and all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    _, plain = train_reference({**TINY_VGG, "dropout": False}, x, y, x[:20], y[:20], weight_decay_l2=0.0,
                               augment=False, **kwargs)
    assert plain["augment"] is None and "train_cross_entropy" not in plain
    loaded, _ = load_model(save_model(model, tmp_path / "vgg", {"architecture": info["architecture"]}))
    assert torch.equal(loaded(x[:5]), model(x[:5]))


def test_train_reference_mlp_is_train_reference_with_an_mlp():
    x, y = _images(n=80)
    a, info_a = train_reference_mlp(x, y, x[:10], y[:10], seed=2, epochs=1, batch_size=16, n_val=10, hidden=(8,))
    b, info_b = train_reference({"type": "mlp", "sizes": [64, 8, 2]}, x, y, x[:10], y[:10], seed=2, epochs=1,
                                batch_size=16, n_val=10)
    assert info_a == {**info_b, "architecture": {**info_b["architecture"], "activation": "relu"}}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    auto = complete_architecture({"type": "mlp"}, (1, 8, 8), 2)
    assert auto["sizes"] == [64, 256, 256, 256, 256, 2]


@pytest.mark.parametrize(
    "spec, shape, n_classes, match",
    [
        ({"type": "cnn", "input_shape": [1, 28, 28]}, (3, 32, 32), 10, r"\[3, 32, 32\]"),
        ({"type": "vgg", "n_classes": 5}, (3, 32, 32), 10, "at least 10"),
        ({"type": "mlp", "sizes": [10, 4, 10]}, (1, 4, 4), 10, "16"),
        ({"type": "cnn"}, (16,), 10, r"\(N, C, H, W\)"),
        ({"type": "small_resnet", "in_channels": 1}, (3, 8, 8), 10, "3 channels"),
        ({"kind": "cnn"}, (1, 8, 8), 10, "'type'"),
    ],
)
def test_complete_architecture_checks_the_data(spec, shape, n_classes, match):
    with pytest.raises(ValueError, match=match) as info:
        complete_architecture(spec, shape, n_classes)
    assert "\n" not in str(info.value)


# ----- channels-last training (the CPU default for conv nets): same recipe, same numbers to rounding -----

SMALL_CNN = {"type": "cnn", "input_shape": [1, 12, 12], "n_classes": 3, "conv": [8, 8, "M", 8, "M"], "dense": [16]}


def _stripes(n=96, seed=0, dtype=torch.float32):
    """Three classes: a bright stripe in the left, middle or right third of a 12x12 image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.uniform(0, 0.3, size=(n, 1, 12, 12))
    for i, label in enumerate(y):
        x[i, :, :, 4 * label:4 * label + 4] += 0.6
    return torch.from_numpy(x).to(dtype), torch.from_numpy(y.astype(np.int64))


def test_channels_last_is_chosen_for_conv_nets_on_the_cpu():
    from modlens.experiments.train import use_channels_last
    x, _ = _stripes(4)
    cnn, mlp = build_model(SMALL_CNN), build_model({"type": "mlp", "sizes": [144, 8, 3]})
    assert use_channels_last(cnn, x) and not use_channels_last(cnn, x, "contiguous")
    assert not use_channels_last(mlp, x.flatten(1)) and not use_channels_last(mlp, x.flatten(1), "channels_last")
    with pytest.raises(ValueError, match="memory_format"):
        use_channels_last(cnn, x, "nhwc")


def test_channels_last_training_equals_contiguous_in_float64():
    """Same initialization, batches and arithmetic: in float64 the layouts agree to rounding after two
    epochs (Adam, batch 16), and the parameters come back in the contiguous layout."""
    x, y = _stripes(dtype=torch.float64)
    models, hists = {}, {}
    for fmt in ("contiguous", "channels_last"):
        models[fmt] = build_model(SMALL_CNN, generator=torch.Generator().manual_seed(3)).double()
        hists[fmt] = train_classifier(models[fmt], x, y, epochs=2, batch_size=16, seed=5, memory_format=fmt)
    assert hists["contiguous"]["loss"] == pytest.approx(hists["channels_last"]["loss"], rel=1e-10)
    for (name, a), b in zip(models["contiguous"].state_dict().items(), models["channels_last"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
        assert b.is_contiguous(), name


def test_channels_last_float32_gradients_and_losses_match_contiguous():
    """float32: the layouts sum in other orders (oneDNN kernels), so gradients agree to float
    tolerance, and so do the losses of the first steps from one initialization."""
    import torch.nn.functional as F
    x, y = _stripes(n=64, seed=1)
    grads = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = build_model(SMALL_CNN, generator=torch.Generator().manual_seed(0)).to(memory_format=fmt)
        F.cross_entropy(model(x.contiguous(memory_format=fmt)), y).backward()
        grads[fmt] = [p.grad.contiguous() for p in model.parameters()]
    for a, b in zip(grads[torch.contiguous_format], grads[torch.channels_last]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    hists = {}
    for fmt in ("contiguous", "channels_last"):
        model = build_model(SMALL_CNN, generator=torch.Generator().manual_seed(0))
        hists[fmt] = train_classifier(model, x, y, epochs=3, batch_size=64, seed=0, memory_format=fmt)["loss"]
    assert hists["contiguous"] == pytest.approx(hists["channels_last"], rel=1e-4)
