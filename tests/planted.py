"""Networks whose modules we know: MLPs trained with block-diagonal weight masks.

Module m reads only its own block of input features, owns a block of units in every hidden
layer, and writes only to its own classes. The data make each module necessary: a sample of
class c carries its class pattern only in the input block of module c // classes_per_module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def planted_data(n: int, *, n_modules: int = 4, block_inputs: int = 6, classes_per_module: int = 2,
                 noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_classes = n_modules * classes_per_module
    protos = np.random.default_rng(12345).normal(size=(n_classes, block_inputs))
    y = rng.integers(0, n_classes, size=n)
    x = rng.normal(scale=noise, size=(n, n_modules * block_inputs))
    for i, c in enumerate(y):
        m = c // classes_per_module
        x[i, m * block_inputs:(m + 1) * block_inputs] += protos[c]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def block_masks(sizes, n_modules):
    masks = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        ma = np.repeat(np.arange(n_modules), a // n_modules)
        mb = np.repeat(np.arange(n_modules), b // n_modules)
        masks.append(torch.tensor(mb[:, None] == ma[None, :], dtype=torch.float32))
    return masks


def planted_mlp(*, n_modules: int = 4, block_inputs: int = 6, width: int = 48, depth: int = 3,
                classes_per_module: int = 2, epochs: int = 40, seed: int = 0, n_train: int = 2000,
                dropout: float = 0.3):
    """A trained MLP with ``n_modules`` planted modules; returns (model, module_of_unit per hidden layer).

    Dropout during training makes every module robust to losing a few of its units, as
    trained networks are, so a random set of units does much less harm than a whole module.
    """
    n_classes = n_modules * classes_per_module
    sizes = [n_modules * block_inputs] + [width] * depth + [n_classes]
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) * (2.0 / (a / n_modules)) ** 0.5)
            lin.bias.zero_()
        layers.append(lin)
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    model = nn.Sequential(*layers)
    masks = block_masks(sizes, n_modules)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, mask in zip(linears, masks):
            lin.weight.mul_(mask)
    x, y = planted_data(n_train, n_modules=n_modules, block_inputs=block_inputs,
                        classes_per_module=classes_per_module, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 100):
            idx = perm[start:start + 100]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            with torch.no_grad():
                for lin, mask in zip(linears, masks):
                    lin.weight.mul_(mask)
    model.eval()
    modules = [np.repeat(np.arange(n_modules), width // n_modules) for _ in range(depth)]
    return model, modules
