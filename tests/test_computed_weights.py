"""Layers whose weight is computed in forward from parameters only (issue 20, modlens.nn._computed):
weight-standardized convs (NFNet's ``ScaledStdConv2d``), ``F.linear``/``F.conv2d`` with a parameter
in a graph torch.fx traces through, and ``x @ W`` with a 2-D parameter. Each is a layer with its
effective weight on both capture paths: the weight graph reads that weight, the incremental lesion
engine equals the plain oracle in float64, and planted modules are recovered and detected."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from planted import block_masks
from test_capture_ops import _train, check_planted
from test_cnn_models import planted_images


class StdConv(nn.Conv2d):
    """Weight standardization with a learned gain, as timm's ScaledStdConv2d."""

    def __init__(self, cin, cout, k, **kw):
        super().__init__(cin, cout, k, **kw)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def effective_weight(self):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return w * self.gain

    def forward(self, x):
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = StdConv(3, 8, 3, padding=1)
        self.c2 = StdConv(8, 12, 3, padding=1, groups=2)
        self.c3 = StdConv(12, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        h = F.relu(self.c3(h)) + h[:, :8]
        return self.head(h.mean((2, 3)))


class ProductMLP(nn.Module):
    """Hidden layers written as ``x @ W`` with a 2-D parameter and as ``F.linear`` with a transposed one."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 16) / 2)
        self.w2 = nn.Parameter(torch.randn(16, 12) / 3)
        self.b2 = nn.Parameter(torch.randn(12) / 4)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(x @ self.w1)
        h = F.relu(F.linear(h, self.w2.t(), self.b2))
        return self.head(h)


def _oracle_check(model, x, capture):
    torch.manual_seed(0)
    a = NetworkAdapter(model, x[:2], capture=capture)
    assert a.capture_method == capture
    with torch.no_grad():
        np.testing.assert_allclose(a.gm(x).numpy(), model(x).numpy(), atol=1e-12)
        for _ in range(4):
            a.output_module.bias -= model(x).mean(0)
        y = model(x).argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, max(1, width // 3), max(1, width // 2))]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1
    return a


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_standardized_conv_is_a_layer_with_its_effective_weight(capture):
    torch.manual_seed(0)
    m = StdConvNet().double().eval()
    a = _oracle_check(m, torch.randn(48, 3, 8, 8, dtype=torch.float64), capture)
    assert a.layer_names == ["c1", "c2", "c3"]
    eff = {name: getattr(m, name).effective_weight().detach().abs().sum((2, 3)).numpy() for name in ("c2", "c3")}
    blocks = {(a.layer_names[i], a.layer_names[j]): b for i, j, b in a.weight_blocks(bn_fold="none")}
    c2 = np.zeros((12, 8))
    c2[:6, :4], c2[6:, 4:] = eff["c2"][:6], eff["c2"][6:]   # two groups
    np.testing.assert_allclose(blocks[("c1", "c2")], c2)
    np.testing.assert_allclose(blocks[("c2", "c3")], eff["c3"])
    # the user's parameters are untouched by the oracle's edits of the effective weight
    assert not (m.c2.weight == 0).any()


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_matrix_products_with_parameters_are_linear_layers(capture):
    torch.manual_seed(0)
    m = ProductMLP().double().eval()
    a = _oracle_check(m, torch.randn(64, 6, dtype=torch.float64), capture)
    assert a.layer_names == ["w1", "w2"] and a.layer_sizes == [16, 12]
    # a parameter used as the weight is shared (a view of W.T), not copied
    assert a.gm.get_submodule("w1").weight.data_ptr() == m.w1.data_ptr()
    blocks = {(i, j): b for i, j, b in a.weight_blocks()}
    np.testing.assert_allclose(blocks[(0, 1)], m.w1.detach().abs().numpy().T)  # 0: the input
    np.testing.assert_allclose(blocks[(1, 2)], m.w2.detach().abs().numpy().T)


class PlantedStdCNN(nn.Module):
    """Weight-standardized grouped convs, one group per planted module (channel dropout spreads each
    module's work over its channels, as in the other planted CNNs)."""

    def __init__(self, n_modules=4, width=16):
        super().__init__()
        self.stem = StdConv(n_modules, width, 3, padding=1, groups=n_modules)
        self.mid = StdConv(width, width, 3, padding=1, groups=n_modules)
        self.mix = StdConv(width, width, 3, padding=1, groups=n_modules)
        self.out = nn.Linear(width, 2 * n_modules)
        self.drop = nn.Dropout2d(0.2)

    def forward(self, x):
        h = self.drop(F.relu(self.stem(x)))
        h = self.drop(F.max_pool2d(F.relu(self.mid(h)), 2))
        h = F.relu(self.mix(h))
        return self.out(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


@functools.lru_cache(maxsize=None)
def planted_std_cnn(n_modules=4, width=16, epochs=12, seed=0):
    torch.manual_seed(seed)
    model = PlantedStdCNN(n_modules, width)
    x, y = planted_images(2000, n_modules=n_modules, seed=seed)
    _train(model, x, y, epochs, seed, [(model.out, block_masks([width, 2 * n_modules], n_modules)[0])])
    whole = np.repeat(np.arange(n_modules), width // n_modules)
    return model.eval(), (whole, whole, whole)


def test_planted_modules_in_standardized_convs_are_recovered_and_detected():
    model, groups = planted_std_cnn()
    test, held = planted_images(600, seed=1), planted_images(300, seed=2)[0]
    check_planted(model, groups, test, held, n_layers=3)


# ----- a product whose operands depend on the input's sizes only -------------------------------------
class OneHotPositions(nn.Module):
    """Position embeddings read as ``one_hot(grid) @ table`` with the grid expanded over the batch
    (Gemma-4's ViT): the product depends on the input's sizes, not on its data, so it is no layer; the
    MLP units are the neurons."""

    def __init__(self, d_in=6, d=8, n_positions=10):
        super().__init__()
        from tiny_transformers import Block
        self.n_positions = n_positions
        self.embed = nn.Linear(d_in, d)
        self.table = nn.Parameter(torch.randn(n_positions, d) * 0.3)
        self.blocks = nn.Sequential(Block(d, 12), Block(d, 12))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)   # per sample, as Gemma-4's grid
        one_hot = F.one_hot(positions, self.n_positions).to(self.table.dtype)
        h = self.blocks(self.embed(x) + one_hot @ self.table)
        return self.head(self.norm(h).mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_product_of_size_only_values_and_a_table_is_a_position_embedding(capture):
    from test_ops_families import _oracle_check as family_oracle_check
    torch.manual_seed(0)
    a = family_oracle_check(OneHotPositions(), (5, 6), capture=capture)
    assert a.is_transformer and a.layer_names == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]


class LayerNorm1P(nn.LayerNorm):
    """Nemotron's layer norm: the scale is ``1 + weight``, computed in forward."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class ShiftedRMSNorm(nn.RMSNorm):
    """An RMS norm whose scale is computed in forward (timm's RmsNormFp32 casts it: ``weight.float()``)."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight * 0.5 + 0.5, self.eps)


@pytest.mark.parametrize("norm", [LayerNorm1P, ShiftedRMSNorm])
def test_norms_with_a_computed_scale_are_norms_with_their_effective_scale(norm):
    """Under torch.export (before: 'its weight is computed in forward, not a parameter'); the weight
    graph folds the effective scale, and lesions equal the plain oracle."""
    from tiny_transformers import TokenClassifier

    torch.manual_seed(0)
    m = TokenClassifier(n_blocks=2)
    for block in m.blocks:
        block.ln1, block.ln2 = norm(8), norm(8)
    m.norm = norm(8)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, norm):
                mod.weight.normal_()
    m = m.double().eval()
    a = _oracle_check(m, torch.randn(64, 5, 6, dtype=torch.float64), "export")
    assert a.is_transformer and a.layer_names == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    effective = (lambda w: w + 1) if norm is LayerNorm1P else (lambda w: w * 0.5 + 0.5)
    blocks = a.residual_parts()["blocks"]
    for k, block in enumerate(m.blocks):
        np.testing.assert_allclose(np.abs(blocks[k].gamma), np.abs(effective(block.ln2.weight).detach().numpy()))
    assert not any(isinstance(a.gm.get_submodule(n.target), norm) for n in a.gm.graph.nodes if n.op == "call_module")
