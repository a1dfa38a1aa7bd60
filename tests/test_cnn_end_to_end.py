"""The reference conv nets through the whole pipeline: partitions, lesions, visualizations."""

import numpy as np
import pytest
import torch

import modlens
from modlens.experiments.feature_vis import feature_vis_test
from modlens.nn import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from modlens.nn.models import small_resnet, small_vgg

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


def _data(shape, n, seed, n_classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g, dtype=torch.float64), torch.randint(0, n_classes, (n,), generator=g)


@pytest.mark.parametrize("build", [
    lambda g: small_vgg((3, 8, 8), conv=(6, 6, "M", 8), dense=(12,), style="torchvision", generator=g),
    lambda g: small_resnet(3, 10, widths=(6, 8), generator=g),
])
def test_reference_convnets_analyze_end_to_end(build):
    model = build(torch.Generator().manual_seed(0)).double().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x, _ = _data((3, 8, 8), 120, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    xa, _ = _data((3, 8, 8), 60, 2)
    res = modlens.analyze(model, (x, y), activation_data=xa, n_clusters=3, n_random=3, random_state=0,
                          feature_vis=True, vis_options={"steps": 3})
    assert set(res.summary["metric"]) == {"acc_drop", "class_range", "vis_score", "softmax_entropy"}
    assert (res.summary["n_subclusters"] > 0).all()
    adapter = NetworkAdapter(model)
    sets = [np.array([0, 2]), np.array([1, 3])]
    for layer in range(len(adapter.layers)):
        np.testing.assert_array_equal(IncrementalLesions(adapter, x, y).correct_counts(layer, sets),
                                      correct_counts_plain(adapter, layer, sets, x, y))


def test_conv_feature_vis_batched_equals_single():
    model = small_vgg((3, 8, 8), conv=(6, 6, "M", 8), dense=(12,), generator=torch.Generator().manual_seed(3)).double().eval()
    adapter = NetworkAdapter(model)
    part = modlens.partition(adapter, "weights/global", n_clusters=3)
    kw = dict(n_random=2, steps=4, random_state=5)
    batched = feature_vis_test(adapter, part, (3, 8, 8), **kw)
    single = feature_vis_test(adapter, part, (3, 8, 8), batched=False, **kw)
    np.testing.assert_allclose(batched.images, single.images, atol=1e-10)
    np.testing.assert_allclose(batched.table["vis_score"], single.table["vis_score"], rtol=1e-9)


def test_conv_feature_vis_channels_last_equals_contiguous():
    """The NHWC layout (the CPU default for conv nets) changes no value: float64, same images and
    scores as the NCHW layout to rounding; the model's weights keep their layout."""
    from modlens.nn.models import build_model
    model = build_model({"type": "cnn", "input_shape": [1, 10, 10], "n_classes": 4, "conv": [6, 6, "M", 6, "M"],
                         "dense": [8]}, generator=torch.Generator().manual_seed(1)).double().eval()
    adapter = NetworkAdapter(model)
    part = modlens.partition(adapter, "weights/global", n_clusters=3)
    strides = [p.stride() for p in model.parameters()]
    kw = dict(n_random=2, steps=6, random_state=3)
    nhwc = feature_vis_test(adapter, part, (1, 10, 10), **kw)
    nchw = feature_vis_test(adapter, part, (1, 10, 10), channels_last=False, **kw)
    assert len(nhwc.table) > 0
    np.testing.assert_allclose(nhwc.images, nchw.images, atol=1e-9)
    np.testing.assert_allclose(nhwc.table["vis_score"], nchw.table["vis_score"], rtol=1e-9)
    np.testing.assert_allclose(nhwc.table["softmax_entropy"], nchw.table["softmax_entropy"], rtol=1e-9)
    assert [p.stride() for p in model.parameters()] == strides


def test_hidden_ncut_makes_no_copy_of_the_weight_graph():
    # a partition's n-cut is taken on the hidden neurons' subgraph: with the other nodes left out as unclustered
    # ones, not a copy of a 10^8-entry graph (convnext_base ran out of memory there); same value as the copy's
    import tracemalloc

    import scipy.sparse as sp

    from modlens.core.graph import ncut
    from modlens.experiments.partitioning import _hidden_ncut

    rng = np.random.default_rng(1)
    sizes, hidden = [300, 1000, 1200, 500], [1, 2]
    n = sum(sizes)
    adj = sp.random_array((n, n), density=0.2, rng=rng, format="csr")
    adj = sp.csr_array(adj + adj.T)
    labels = [rng.integers(-1, 4, sizes[h]) for h in hidden]
    for distinct in (False, True):
        tracemalloc.start()
        got = _hidden_ncut(adj, sizes, hidden, labels, distinct_per_layer=distinct)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < adj.data.nbytes / 4, f"{peak / 2**20:.1f} MiB for a {adj.data.nbytes / 2**20:.1f} MiB graph"
        lab = np.concatenate([labels[0], labels[1] + (4 if distinct else 0) * (labels[1] >= 0)])
        sub = adj[300:2500][:, 300:2500].toarray()
        assert got == pytest.approx(ncut(sub, lab), rel=1e-12)
