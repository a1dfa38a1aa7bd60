"""Convolutional reference architectures: the paper's small CNN, the CIFAR VGG, test nets, torchvision."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import fx, nn

from modlens.nn.io import load_model, save_model
from modlens.nn.models import (
    CIFAR_VGG_CONV,
    build_model,
    cifar_vgg,
    small_cnn,
    small_resnet,
    small_vgg,
    torchvision_model,
    vgg_dropout_rates,
)

TINY_VGG = {"type": "vgg", "input_shape": [3, 8, 8], "conv": [4, 4, "M", 8, "M"], "dense": [8, 8]}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.children()]


# ---- the paper's small CNN -------------------------------------------------------------------

def test_small_cnn_matches_the_paper():
    model = build_model({"type": "cnn"}, generator=_gen())
    assert _kinds(model) == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
                             "Flatten", "Linear", "ReLU", "Linear"]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 64, (3, 3), (1, 1)), (64, 64, (3, 3), (1, 1)), (64, 64, (3, 3), (1, 1))]
    assert model.fc1.in_features == 64 * 7 * 7 and model.fc1.out_features == 128 and model.out.out_features == 10
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    stack = build_model({"type": "cnn", "input_shape": [2, 28, 28]}, generator=_gen())
    assert stack.conv1.in_channels == 2 and stack(torch.rand(3, 2, 28, 28)).shape == (3, 10)


def test_conv_glorot_bounds_and_zero_biases():
    model = small_cnn(generator=_gen(1))
    for conv in (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        w = conv.weight.detach()
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert 0.95 * bound < float(w.abs().max()) <= bound
        assert torch.count_nonzero(conv.bias) == 0


# ---- the CIFAR VGG ---------------------------------------------------------------------------

def test_cifar_vgg_follows_the_notes():
    model = build_model({"type": "vgg"}, generator=_gen())
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [w for w in CIFAR_VGG_CONV if w != "M"] and len(convs) == 13
    names = list(dict(model.named_children()))
    # conv -> ReLU -> [maxpool] -> batch norm -> [dropout], per convolution
    assert names[:8] == ["conv1", "act1", "bn1", "drop1", "conv2", "act2", "pool2", "bn2"]
    rates = [getattr(model, f"drop{k}").p if hasattr(model, f"drop{k}") else None for k in range(1, 14)]
    assert rates == [0.3, None, 0.4, None, 0.4, 0.4, None, 0.4, 0.4, None, 0.4, 0.4, 0.5]
    assert names[-8:] == ["flatten", "fc1", "act_fc1", "bn_fc1", "drop_fc1", "fc2", "act_fc2", "out"]
    assert model.drop_fc1.p == 0.5 and model.fc1.in_features == 512 and model.fc2.out_features == 512
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 14 and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 5
    conv_params = sum((c.in_channels * 9 + 1) * c.out_channels for c in convs)
    expected = conv_params + 2 * sum(c.out_channels for c in convs) + (513 * 512 + 2 * 512) + 513 * 512 + 513 * 10
    assert sum(p.numel() for p in model.parameters()) == expected
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_without_dropout_and_rates_rule():
    model = cifar_vgg(dropout=False, generator=_gen())
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert vgg_dropout_rates([(4, False), (4, True), (8, False), (8, True)]) == [0.3, None, 0.4, 0.5]


# ---- small test networks ---------------------------------------------------------------------

def test_small_resnet_is_a_resnet():
    model = small_resnet(3, 5, widths=(4, 8, 8), blocks=(2, 1, 1), generator=_gen()).eval()
    names = dict(model.named_modules())
    assert "layer1.1.conv2" in names and names["layer1.0"].downsample is None
    down = names["layer2.0.downsample"]
    assert isinstance(down[0], nn.Conv2d) and down[0].stride == (2, 2) and isinstance(down[1], nn.BatchNorm2d)
    assert names["layer2.0.conv1"].stride == (2, 2) and names["layer3.0"].downsample is not None
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))
    x = torch.rand(2, 3, 12, 12)
    assert model(x).shape == (2, 5)
    # the residual: a block's output is relu(main path + shortcut)
    block, inp = model.layer2[0], torch.rand(2, 4, 6, 6)
    main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(inp)))))
    assert torch.allclose(block(inp), torch.relu(main + block.downsample(inp)))


def test_small_vgg_styles():
    cifar = small_vgg(generator=_gen())
    assert isinstance(cifar.bn1, nn.BatchNorm2d) and cifar.fc1.in_features == 16 * 4 * 4
    tv = small_vgg(style="torchvision", generator=_gen())
    assert [type(m).__name__ for m in tv.features[:3]] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert isinstance(tv.avgpool, nn.AdaptiveAvgPool2d) and isinstance(tv.classifier[2], nn.Dropout)
    plain = small_vgg(style="torchvision", batch_norm=False, generator=_gen())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    for m in (cifar, tv, plain):
        assert m.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 10)


ALL_SPECS = [
    ({"type": "cnn"}, (1, 28, 28)),
    ({"type": "cnn", "input_shape": [1, 28, 28], "n_classes": 10, "conv": [8, "M", 8, "M"], "dense": [16]},
     (1, 28, 28)),
    (TINY_VGG, (3, 8, 8)),
    ({"type": "small_vgg"}, (3, 16, 16)),
    ({"type": "small_vgg", "style": "torchvision", "batch_norm": False}, (3, 16, 16)),
    ({"type": "small_resnet", "widths": [4, 8], "blocks": [1, 2]}, (3, 8, 8)),
]


@pytest.mark.parametrize("spec, shape", ALL_SPECS)
def test_traceable_non_inplace_seeded(spec, shape):
    state = torch.random.get_rng_state()
    a, b, c = (build_model(spec, generator=_gen(s)) for s in (3, 3, 4))
    assert torch.equal(state, torch.random.get_rng_state())  # building never touches the global RNG
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert any(not torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())
    assert all(not m.inplace for m in a.modules() if isinstance(m, (nn.ReLU, nn.Dropout)))
    a.eval()
    gm = fx.symbolic_trace(a)
    x = torch.rand(2, *shape)
    assert torch.equal(gm(x), a(x))


@pytest.mark.parametrize("spec, shape", [ALL_SPECS[1], ALL_SPECS[2], ALL_SPECS[5]])
def test_save_load_round_trip(tmp_path, spec, shape):
    model = build_model(spec, generator=_gen())
    model.train()
    model(torch.rand(4, *shape))  # move batch-norm running statistics away from their initial values
    model.eval()
    loaded, _ = load_model(save_model(model, tmp_path / "m", {"architecture": spec}))
    x = torch.rand(3, *shape)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"type": "cnn", "input_shape": [28, 28]}, "input_shape"),
        ({"type": "cnn", "input_shape": [1, 4, 4], "conv": [8, "M", 8, "M", 8, "M"]}, "too small"),
        ({"type": "cnn", "conv": ["M", 8]}, "does not follow"),
        ({"type": "cnn", "conv": [8, 0]}, r"conv\[1\]"),
        ({"type": "cnn", "activation": "swish"}, "swish"),
        ({"type": "vgg", "dropout": 0.5}, "dropout"),
        ({"type": "vgg", "n_classes": 0}, "n_classes"),
        ({"type": "vgg", "width": 3}, "width"),
        ({"type": "small_vgg", "style": "keras"}, "keras"),
        ({"type": "small_vgg", "batch_norm": False}, "torchvision"),
        ({"type": "small_resnet", "widths": [4, 8], "blocks": [1]}, "blocks"),
        ({"type": "torchvision"}, "name"),
        ({"type": "torchvision", "name": "alexnet"}, "alexnet"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        build_model(spec)
    assert "\n" not in str(info.value)


# ---- torchvision (optional) ------------------------------------------------------------------

def test_torchvision_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"resnet18.*pip install 'modlens\[torchvision\]'"):
        build_model({"type": "torchvision", "name": "resnet18"})


def test_torchvision_plumbing_with_a_stand_in(monkeypatch):
    calls = []

    def resnet18(*, weights, num_classes):
        calls.append({"weights": weights, "num_classes": num_classes})
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4, num_classes))
        nn.init.normal_(model[0].weight)  # torchvision draws from the global generator
        return model

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(resnet18=resnet18)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    state = torch.random.get_rng_state()
    a = build_model({"type": "torchvision", "name": "resnet18", "num_classes": 7}, generator=_gen(1))
    b = torchvision_model("resnet18", 7, generator=_gen(1))
    assert torch.equal(state, torch.random.get_rng_state())
    assert calls == [{"weights": None, "num_classes": 7}] * 2
    assert torch.equal(a[0].weight, b[0].weight) and not a[1].inplace


@pytest.mark.zoo
def test_real_torchvision_resnet18():
    from model_helpers import zoo_import

    zoo_import("torchvision.models")
    model = build_model({"type": "torchvision", "name": "resnet18", "num_classes": 10}, generator=_gen()).eval()
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(fx.symbolic_trace(model)(x), model(x))
