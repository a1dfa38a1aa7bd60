"""gMLP's channel MLP (issue 20; docs/transformers.md, "Token-mixing MLPs"): ``fc1`` (d -> 2h), an
activation, ``u, v = x.chunk(2, -1)``, the spatial gating unit ``u * proj(norm(v)^T)^T`` and ``fc2``.
Its neurons are the h gated units: unit j pairs ``fc1`` rows j (u) and h + j (v), like a GLU's
gate and value, and is lesioned where ``fc2`` reads it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from torch import nn

import modlens
from modlens.nn.adapter import NetworkAdapter
from planted import block_masks, planted_data
from test_ops_families import _oracle_check


class GatedMLP(nn.Module):
    def __init__(self, d, h, tokens, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * h), nn.Linear(h, d)
        self.drop = nn.Dropout(dropout)   # on the gated units (planted modules: each unit dispensable)
        self.norm, self.proj = nn.LayerNorm(h), nn.Linear(tokens, tokens)
        with torch.no_grad():   # gMLP's initialization: the gate starts near 1
            self.proj.weight.normal_(0, 0.1)
            self.proj.bias.fill_(1.0)

    def forward(self, x):
        u, v = F.gelu(self.fc1(x)).chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
        return self.fc2(self.drop(u * v))


class TinyGMLP(nn.Module):
    """(B, T, d_in) tokens -> Linear embedding -> blocks ``x + mlp(norm(x))`` -> norm -> mean -> head."""

    def __init__(self, d_in=6, d=8, h=6, tokens=4, n_blocks=2, n_classes=4, dropout=0.0):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_blocks))
        self.mlps = nn.ModuleList(GatedMLP(d, h, tokens, dropout) for _ in range(n_blocks))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, n_classes)

    def forward(self, x):
        x = self.embed(x)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_gated_units_are_the_neurons(capture):
    torch.manual_seed(0)
    m = TinyGMLP().eval()
    x = torch.randn(5, 4, 6)
    a = NetworkAdapter(m, x[:2], capture=capture)
    assert a.capture_method == capture and a.is_transformer
    # the half that meets the product directly names the neuron (u); the other goes through the gating unit
    gate, value = "part1", "part2"
    assert a.layer_names == [f"mlps.0.fc1_{gate}", f"mlps.1.fc1_{gate}"] and a.layer_sizes == [6, 6]
    with torch.no_grad():
        torch.testing.assert_close(a.gm(x), m(x))
    mlp = a.structure.mlps[0]
    assert (mlp.up.target, mlp.down.target) == (f"mlps.0.fc1_{value}", "mlps.0.fc2")
    assert sorted(n.target for n in a.structure.token_mixers) == ["mlps.0.proj", "mlps.1.proj"]
    # the halves share fc1's parameters (views of rows :h and h:), never copies
    assert a.gm.get_submodule("mlps.0.fc1_part2").weight.data_ptr() == m.mlps[0].fc1.weight[6:].data_ptr()
    # the residual graph reads unit j through rows j and h + j of fc1, as a GLU's gate and value
    block = a.residual_parts()["blocks"][0]
    w = m.mlps[0].fc1.weight.detach().double().numpy()
    rows = {"part1": w[:6], "part2": w[6:]}
    np.testing.assert_allclose(block.w_gate, rows[gate])
    np.testing.assert_allclose(block.w_in, rows[value])
    assert len(modlens.partition(a, "weights/global", n_clusters=2, random_state=0).labels) == 2


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_incremental_lesions_equal_the_plain_oracle(capture):
    torch.manual_seed(0)
    _oracle_check(TinyGMLP(), (4, 6), capture=capture)


# ----- planted modules --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def planted_gmlp(n_modules=4, per_module=4, units_per_module=8, n_blocks=2, tokens=3, epochs=30, seed=0):
    """As the planted transformer of test_transformers.py, with gMLP blocks and no attention: module m
    reads input block m, owns residual dims and gated units (both halves of fc1) and writes only its
    own classes."""
    torch.manual_seed(seed)
    d, d_in, h = n_modules * per_module, n_modules * 6, n_modules * units_per_module
    m = TinyGMLP(d_in=d_in, d=d, h=h, tokens=tokens, n_blocks=n_blocks, n_classes=2 * n_modules, dropout=0.3)
    mask = lambda out, inp: block_masks([inp, out], n_modules)[0]  # noqa: E731
    masked = [(m.embed, mask(d, d_in)), (m.head, mask(2 * n_modules, d))]
    for mlp in m.mlps:
        masked += [(mlp.fc1, torch.cat([mask(h, d), mask(h, d)])), (mlp.fc2, mask(d, h))]

    def apply():
        with torch.no_grad():
            for lin, mk in masked:
                lin.weight.mul_(mk)

    def tokens_of(x, s):
        g = torch.Generator().manual_seed(s)
        sign = torch.randint(0, 2, (x.shape[0], 1, 1), generator=g) * 2.0 - 1
        return sign * x[:, None, :] + 0.3 * torch.randn(x.shape[0], tokens, x.shape[1], generator=g)

    x, y = planted_data(1500, seed=seed)
    x = tokens_of(x, 100 + seed)
    apply()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    m.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 100):
            idx = perm[s:s + 100]
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
            apply()
    m.eval()
    groups = [np.repeat(np.arange(n_modules), units_per_module) for _ in range(n_blocks)]
    test, held = planted_data(600, seed=1), planted_data(300, seed=2)[0]
    return m, groups, (tokens_of(test[0], 1), test[1]), tokens_of(held, 2)


def test_planted_gmlp_modules_are_recovered_and_detected():
    model, groups, test, held = planted_gmlp()
    with torch.no_grad():
        assert (model(test[0]).argmax(-1) == test[1]).float().mean() > 0.9
    part = modlens.partition(model, "weights/global", n_clusters=4, data=held, random_state=0)
    assert len(part.labels) == 2
    for labels, truth in zip(part.labels, groups):
        assert adjusted_rand_score(truth, labels) == 1.0
    res = modlens.analyze(model, test, activation_data=held, n_clusters=4, random_state=0, n_random=99,
                          partitionings=["weights/global"])
    row = res.summary.set_index(["partitioning", "metric"]).loc[("weights/global", "acc_drop")]
    assert row["n_subclusters"] == 8
    assert row["p_value"] < 1e-4 and row["significant"]


def test_halves_used_apart_stay_one_layer():
    """A cut whose halves are not multiplied together after a map is a channel split of one layer."""
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(5, 8), nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            a, b = self.fc1(x).chunk(2, dim=-1)
            return self.head(F.relu(self.fc2(F.relu(a) + F.relu(b))))

    torch.manual_seed(0)
    a = NetworkAdapter(Halves(), torch.randn(2, 5))
    assert a.layer_names == ["fc1", "fc2"] and a.layer_sizes == [8, 6]


# ----- a gated MLP whose maps each clamp their input (Gemma-4's clipped Linears) -----------------------
class ClampedGLU(nn.Module):
    def __init__(self, d=8, h=6, tokens=4):
        super().__init__()
        self.norm, self.tok = nn.LayerNorm(d), nn.Linear(tokens, tokens)
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.embed, self.head = nn.Linear(6, d), nn.Linear(d, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.tok(x.transpose(1, 2)).transpose(1, 2)
        h = self.norm(x)
        g = self.gate(h.clamp(-3.0, 3.0))   # each map clamps its own copy of the input
        u = self.up(h.clamp(-2.5, 2.5))
        x = x + self.down(F.gelu(g) * u).clamp(-4.0, 4.0)
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_gate_and_value_reading_the_stream_through_their_own_clamps_are_one_glu(capture):
    torch.manual_seed(0)
    a = _oracle_check(ClampedGLU(), (4, 6), capture=capture)
    assert a.layer_names == ["gate"] and a.structure.mlps[0].up.target == "up"
