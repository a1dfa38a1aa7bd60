import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.nn import NetworkAdapter, ModelTraceError, UnsupportedModelError


class CustomMLP(nn.Module):
    """A custom forward that calls functional activations, with an input reshape."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 7)
        self.fc2 = nn.Linear(7, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = F.gelu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return F.log_softmax(self.out(x), dim=-1)


def seq(inplace=False):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(inplace=inplace), nn.Dropout(0.5),
                         nn.Linear(7, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))


def test_sequential_layers_in_forward_order():
    a = NetworkAdapter(seq())
    assert a.layer_names == ["1", "4"]
    assert a.layer_sizes == [7, 5]
    assert a.node_layer_sizes() == [12, 7, 5, 3]
    blocks = a.weight_blocks()
    assert [(i, j, b.shape) for i, j, b in blocks] == [(0, 1, (7, 12)), (1, 2, (5, 7)), (2, 3, (3, 5))]
    assert all((b >= 0).all() for _, _, b in blocks)


def test_custom_forward_and_functional_activations():
    torch.manual_seed(0)
    m = CustomMLP()
    a = NetworkAdapter(m)
    assert a.layer_names == ["fc1", "fc2"]
    x = torch.randn(9, 3, 4)
    z1, z2 = a.record(iter([x]))
    np.testing.assert_allclose(z1, m.fc1(x.view(9, -1)).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(z2, m.fc2(F.gelu(m.fc1(x.view(9, -1)))).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_inplace_relu_does_not_overwrite_preactivations():
    torch.manual_seed(0)
    m = seq(inplace=True)
    x = torch.randn(50, 12)
    z1, _ = NetworkAdapter(m).record(iter([x]))
    assert (z1 < 0).any(), "pre-activations must keep their negative values"
    with torch.no_grad():
        np.testing.assert_allclose(z1, m[1](x).numpy(), rtol=1e-6)


def test_training_mode_is_restored():
    m = seq()
    m.train()
    NetworkAdapter(m).record(iter([torch.randn(4, 12)]))
    assert m.training and m[3].training


def test_unsupported_layer_is_named():
    # LayerNorm and gates are supported since the capture rebuild (issue 8); these are not
    m = nn.Sequential(nn.ConvTranspose2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"'0' \(ConvTranspose2d\)"):
        NetworkAdapter(m)

    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 1))

    with pytest.raises(UnsupportedModelError, match=r"unsupported operation 'cumsum.*after layer 'a'"):
        NetworkAdapter(Cumulative(), torch.randn(3, 4))


def test_untraceable_model_gets_actionable_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ModelTraceError, match="leaf"):
        NetworkAdapter(Branchy())


def test_needs_a_hidden_layer_and_finite_weights():
    with pytest.raises(UnsupportedModelError, match="hidden layer"):
        NetworkAdapter(nn.Sequential(nn.Linear(4, 2)))
    m = seq()
    with torch.no_grad():
        m[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"4\.weight.*NaN"):
        NetworkAdapter(m)
