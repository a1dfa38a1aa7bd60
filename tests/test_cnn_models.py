"""Hand-built CNNs for the CNN tests (residual, batch norm, concatenation, planted modules),
and the batch-norm folding check they rely on."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn._bn import bn_scale, fold_into_conv
from modlens.nn.adapter import NetworkAdapter


class Block(nn.Module):
    """A ResNet basic block; ``out += identity`` as torchvision writes it."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        out += identity
        return F.relu(out)


class TinyResNet(nn.Module):
    """Stem, an identity block, a downsampling block, a conv reading the block output next to a
    concatenation of it (footnote 1), a reflect-padded conv, pooling, flatten and a BN dense layer."""

    def __init__(self, n_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b1 = Block(6, 6)
        self.b2 = Block(6, 8, stride=2)
        self.side = nn.Conv2d(8, 4, 1)
        self.mix = nn.Conv2d(12, 8, 3, padding=1, padding_mode="reflect")
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * 4, 10)
        self.bnf = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 1)
        x = self.b2(self.b1(x))
        x = torch.cat([x, torch.sigmoid(self.side(x))], dim=1)
        x = self.pool(F.relu(self.mix(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.bnf(self.fc1(x))))


def calibrate_bn(model, x, seed):
    """Running statistics from ``x`` (so the outputs depend on the input), random affine terms
    (negative gammas included)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype) * 0.1)
    return model


def resnet_case(seed=0, n=64):
    """A float64 TinyResNet with calibrated batch norms and noisy labels."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    model = TinyResNet().double()
    with torch.no_grad():  # no constant offsets: predictions must depend on the input
        for m in (model.stem, model.mix, model.side, model.fc1):
            m.bias.zero_()
        model.fc2.bias.mul_(0.1)  # small but not zero: a fully lesioned fc1 leaves no exact ties
    model = calibrate_bn(model, x, seed)
    with torch.no_grad():
        y = model(x).argmax(-1)
    flip = torch.rand(n, generator=g) < 0.3
    y[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=g)
    return model, x, y


# ----- planted modules ----------------------------------------------------------------------------
def planted_images(n, *, n_modules=4, classes_per_module=2, size=8, noise=0.5, seed=0):
    """Class c puts its pattern into input channel c // classes_per_module; the rest is noise."""
    rng = np.random.default_rng(seed)
    n_classes = n_modules * classes_per_module
    protos = np.random.default_rng(12345).normal(size=(n_classes, size, size))
    y = rng.integers(0, n_classes, size=n)
    x = rng.normal(scale=noise, size=(n, n_modules, size, size))
    x[np.arange(n), y // classes_per_module] += protos[y]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


class PlantedCNN(nn.Module):
    def __init__(self, n_modules=4, width=16, n_classes=8, dropout=0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(n_modules, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout2d(dropout)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(width, n_classes)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.drop(torch.relu(self.bn2(self.conv2(x)))))
        x = self.drop(torch.relu(self.conv3(x)))
        return self.out(torch.flatten(self.gap(x), 1))


def _block_mask(n_out, n_in, n_modules):
    mo = np.repeat(np.arange(n_modules), n_out // n_modules)
    mi = np.repeat(np.arange(n_modules), n_in // n_modules)
    return torch.tensor(mo[:, None] == mi[None, :], dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def planted_cnn(n_modules=4, width=16, epochs=12, seed=0):
    """A trained CNN whose channel groups are wired only within their group: group m reads input
    channel m and writes only to its classes. Returns (model, group of every channel per conv layer)."""
    torch.manual_seed(seed)
    model = PlantedCNN(n_modules, width, 2 * n_modules)
    masks = {name: _block_mask(*getattr(model, name).weight.shape[:2], n_modules) for name in
             ("conv1", "conv2", "conv3", "out")}

    def apply():
        with torch.no_grad():
            for name, m in masks.items():
                w = getattr(model, name).weight
                w.mul_(m.view(*m.shape, *([1] * (w.dim() - 2))))

    apply()
    x, y = planted_images(2000, n_modules=n_modules, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 100):
            idx = perm[s:s + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            apply()
    model.eval()
    return model, tuple(np.repeat(np.arange(n_modules), width // n_modules) for _ in range(3))


# ----- batch-norm folding ---------------------------------------------------------------------------
@pytest.mark.parametrize("conv_cls", [nn.Conv2d, nn.Conv1d])
def test_bn_fold_matches_a_numerically_folded_conv(conv_cls):
    torch.manual_seed(0)
    conv = conv_cls(3, 5, 3, padding=1).double()
    bn = (nn.BatchNorm2d if conv_cls is nn.Conv2d else nn.BatchNorm1d)(5).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.2, -2.0, 1.0]))
        bn.bias.uniform_(-1, 1)
    bn.eval()
    fused = fold_into_conv(conv, bn)
    x = torch.randn(4, 3, *([7, 6] if conv_cls is nn.Conv2d else [9]), dtype=torch.float64)
    torch.testing.assert_close(fused(x), bn(conv(x)))
    # bn_fold="original" (row 3): the edges into the normalized channels are the L1 norms of the
    # folded kernel slices (the paper's default reading is tested in test_capture_ops.py)
    first = conv_cls(2, 3, 3, padding=1).double()
    pool = nn.AdaptiveAvgPool2d(1) if conv_cls is nn.Conv2d else nn.AdaptiveAvgPool1d(1)
    model = nn.Sequential(first, nn.ReLU(), conv, bn, nn.ReLU(), pool, nn.Flatten(), nn.Linear(5, 2)).double()
    blocks = NetworkAdapter(model).weight_blocks(bn_fold="original")
    assert [(i, j) for i, j, _ in blocks] == [(0, 1)]
    expected = fused.weight.detach().abs().reshape(5, 3, -1).sum(-1).numpy()
    np.testing.assert_allclose(blocks[0][2], expected, rtol=1e-12)
    np.testing.assert_allclose(bn_scale(bn).numpy(), (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).detach().numpy())
    unfolded = NetworkAdapter(model).weight_blocks(bn_fold="none")[0][2]
    np.testing.assert_allclose(unfolded, conv.weight.detach().abs().reshape(5, 3, -1).sum(-1).numpy(), rtol=1e-12)
