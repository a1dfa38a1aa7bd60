"""Neuron layers, weight graphs and activation summaries of CNNs and residual networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from modlens.core.graph import kernel_slice_norms, spearman_squared
from modlens.experiments.partitioning import Partitioner
from modlens.nn import _spearman
from modlens.nn._bn import bn_scale
from modlens.nn import ModelTraceError, NetworkAdapter, UnsupportedModelError
from test_cnn_models import TinyResNet, calibrate_bn, resnet_case


def l1(w):
    return w.detach().abs().reshape(w.shape[0], w.shape[1], -1).sum(-1).double().numpy()


def test_resnet_layers_and_weight_blocks():
    model, _, _ = resnet_case()
    a = NetworkAdapter(model)
    assert NetworkAdapter is NetworkAdapter
    # CNN graphs use conv channels only (paper 3.1, row 4): the hidden Linear is not analysed
    assert a.layer_names == ["stem", "b1.conv1", "b1.conv2", "b2.conv1", "b2.conv2", "b2.down.0", "side", "mix"]
    assert a.node_layer_sizes() == a.layer_sizes == [6, 6, 6, 8, 8, 8, 4, 8]
    assert a.hidden_node_layers() == list(range(8)) and a.n_classes == 5
    blocks = {(i, j): b for i, j, b in a.weight_blocks(bn_fold="original")}
    # residual additions are followed: the stem and b1's last conv both feed b2 (conv1 and the 1x1 shortcut)
    assert set(blocks) == {(0, 1), (0, 3), (0, 5), (1, 2), (2, 3), (2, 5), (3, 4), (4, 6), (4, 7), (5, 6), (5, 7), (6, 7)}
    scale = bn_scale(model.b1.bn1).numpy()[:, None]
    np.testing.assert_allclose(blocks[(0, 1)], l1(model.b1.conv1.weight) * scale)
    np.testing.assert_allclose(blocks[(0, 3)], blocks[(2, 3)])  # the same input channels of b2.conv1
    # the concatenation [block output, side] places side's channels at 8..11 of mix's input
    np.testing.assert_allclose(blocks[(6, 7)], l1(model.mix.weight[:, 8:]))
    np.testing.assert_allclose(blocks[(4, 7)], l1(model.mix.weight[:, :8]))
    dense = NetworkAdapter(model, include_dense=True)
    assert dense.layer_names[-1] == "fc1" and dense.layer_sizes[-1] == 10
    # channel-major flatten: channel c of mix owns the 4 columns 4c..4c+3 of fc1
    fc = {(i, j): b for i, j, b in dense.weight_blocks(bn_fold="original")}[(7, 8)]
    w = model.fc1.weight.detach().abs().double().numpy().reshape(10, 8, 4).sum(-1)
    np.testing.assert_allclose(fc, w * bn_scale(model.bnf).numpy()[:, None])


def test_matrix_one_norm_reproduces_the_original_code():
    ones = np.ones((1, 1, 3, 3))
    assert kernel_slice_norms(ones)[0, 0] == 9 and kernel_slice_norms(ones, "matrix_1_norm")[0, 0] == 3
    k = np.array([[[[1, -2], [3, 0.5]]]])
    assert kernel_slice_norms(k, "matrix_1_norm")[0, 0] == 4  # columns: |1|+|3|, |-2|+|0.5|
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    a = NetworkAdapter(model)
    assert a.weight_blocks()[0][2].tolist() == [[9, 9], [9, 9]]
    assert a.weight_blocks(conv_edge="matrix_1_norm")[0][2].tolist() == [[3, 3], [3, 3]]
    with pytest.raises(ValueError, match="conv_edge"):
        a.weight_blocks(conv_edge="max")


def test_mlp_with_residual_connection_is_supported():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + h)

    m = Skip()
    a = NetworkAdapter(m)
    assert a.layer_names == ["a", "b"] and a.node_layer_sizes() == [4, 4, 4, 2]
    assert [(i, j) for i, j, _ in a.weight_blocks()] == [(0, 1), (1, 2), (1, 3), (2, 3)]


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_names_the_operation_and_how_to_wrap_it():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), Gate(), nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ModelTraceError) as info:
        NetworkAdapter(model)
    msg = str(info.value)
    assert "submodule '2' (Gate)" in msg and "if x.sum() > 0:" in msg and "leaf_modules=['2']" in msg
    a = NetworkAdapter(model, leaf_modules=["2"])  # opaque and channel-wise: followed through
    assert a.layer_names == ["0", "3"]
    assert NetworkAdapter(model, leaf_modules=[Gate]).layer_names == ["0", "3"]


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Linear(4, 2)), "without a flatten"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)),
     r"'1' \(ConvTranspose2d\)"),
    (nn.Sequential(nn.Conv2d(2, 4, 3)), "no hidden"),
])
def test_unsupported_models_get_clear_errors(model, match):
    with pytest.raises(UnsupportedModelError, match=match):
        NetworkAdapter(model)


def test_gated_ops_are_followed():
    # x * sigmoid(g(x)) gates are supported since the capture rebuild (issue 8): both factors
    # pass their channels to the next layer in the weight graph
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.Linear(2, 2)

        def forward(self, x):
            h = self.a(x) * torch.sigmoid(self.b(x))
            return self.out(h.mean((2, 3)))

    a = NetworkAdapter(Gated())
    assert a.layer_names == ["a", "b"]
    assert [s.kind for s in a.structure.sinks[a.layer_node(0)]] == ["mask"]


def test_activation_summaries_are_l1_norms_of_preactivation_maps():
    model, x, _ = resnet_case()
    a = NetworkAdapter(model)
    with torch.no_grad():
        z = model.b1.bn1(model.b1.conv1(F.relu(model.bn(model.stem(x)))))
    # the pre-activation of b1.conv1 is what its ReLU receives: the batch-norm output
    torch.testing.assert_close(a.values([1])(x), z)
    assert a.values([1])(x).shape == (64, 6, 8, 8)
    whole = a.record(iter([x]))
    streamed = a.record(iter([x[:7], x[7:30], x[30:]]))
    assert [s.shape for s in whole] == [(64, n) for n in a.layer_sizes]
    np.testing.assert_allclose(whole[1], z.abs().sum((2, 3)).numpy())
    for w, s in zip(whole, streamed):
        np.testing.assert_allclose(w, s, rtol=1e-12)
    m1 = a.record(iter([x]), reduce="matrix_1_norm")[1]
    np.testing.assert_allclose(m1, z.abs().sum(2).amax(-1).numpy())
    assert a.record(iter([x]))[0].shape == (64, 6)


def test_torch_spearman_matches_numpy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(40, 6)).astype(float)
    x[:, 2] = 1.0
    np.testing.assert_array_equal(_spearman.average_ranks(torch.tensor(x)).numpy(), rankdata(x, axis=0))
    np.testing.assert_allclose(_spearman.spearman_squared(torch.tensor(x)).numpy(), spearman_squared(x), atol=1e-12)


def test_residual_local_clustering_uses_graph_neighbours():
    torch.manual_seed(0)
    x = torch.randn(60, 2, 8, 8)
    model = calibrate_bn(TinyResNet(), x, 0)
    p = Partitioner(NetworkAdapter(model), activation_data=x, n_clusters=3, random_state=0)
    for method in ("weights/global", "weights/local", "activations/local"):
        part = p.partition(method)
        assert part.layer_sizes == (6, 6, 6, 8, 8, 8, 4, 8)
        assert all(((l >= -1) & (l < 8)).all() for l in part.labels)
    _, _, _, neighbours = p._graph("weights")
    assert neighbours[0] == [1, 3, 5] and neighbours[7] == [4, 5, 6]
