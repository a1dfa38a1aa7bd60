"""Lesions of conv channels: the incremental path against the plain oracle, lesion semantics
with batch norm and flatten, chunking under a memory budget, and cost accounting."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modlens.core.partition import Partition
from modlens.experiments.lesion_test import lesion_test
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain, lesion_engine
from test_cnn_models import resnet_case


def random_sets(rng, width):
    return [rng.choice(width, size=s, replace=False) for s in (1, 2, 2, 3, 3, width - 1, width)] + [[]]


@pytest.mark.parametrize("seed", [0, 3])
def test_incremental_equals_plain_on_a_residual_bn_network(seed):
    model, x, y = resnet_case(seed)
    adapter = NetworkAdapter(model, include_dense=True)
    ev = IncrementalLesions(adapter, x, y, batch_size=25)
    rng = np.random.default_rng(seed)
    changed = 0
    for layer, width in enumerate(adapter.layer_sizes):
        sets = random_sets(rng, width)
        fast = ev.correct_counts(layer, sets)
        plain = correct_counts_plain(adapter, layer, sets, x, y, batch_size=17)
        np.testing.assert_array_equal(fast, plain, err_msg=adapter.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 6, "lesions should change predictions in most layers"
    # the plan of a residual branch's last conv masks the addition's input and caches the skip
    plan = adapter.lesion_plan(adapter.layer_names.index("b2.conv2"))
    assert not plan.corrections and [m.value.name for m in plan.masks] == ["b2_bn2"]
    assert [n.name for n in plan.frontier] == ["b2_down_1"]


def test_lesion_zeroes_the_channel_after_batch_norm():
    """The channel contributes nothing downstream: not conv output 0 (BN would turn it into a constant)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Sigmoid(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].bias.fill_(1.0)
    x = torch.randn(80, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        h = model[3](model[2](model[1](model[0](x))))
        h[:, [1, 3]] = 0                                   # removed at the consumer's input
        expected = model[6](model[5](model[4](h))).argmax(-1)
        h2 = model[3](model[2](model[1](model[0](x))))
        h2[:, [1, 3]] = 0
        y = expected.clone()
    adapter = NetworkAdapter(model)
    counts = IncrementalLesions(adapter, x, y).correct_counts(0, [[1, 3]])
    assert counts.sum() == len(y)
    assert correct_counts_plain(adapter, 0, [[1, 3]], x, y).sum() == len(y)


def test_flattened_channel_owns_its_columns():
    """A channel read by a Linear after channel-major flatten: its H*W columns are removed."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        w = model[5].weight.clone()
        w[:, 2 * 16:3 * 16] = 0
        y = F.linear(F.relu(F.linear(model[:5](x), w, model[5].bias)), model[7].weight, model[7].bias).argmax(-1)
    adapter = NetworkAdapter(model, include_dense=True)
    assert adapter.layer_names == ["0", "2", "5"]
    assert IncrementalLesions(adapter, x, y).correct_counts(1, [[2]]).sum() == len(y)


def test_tiny_memory_budget_chunks_and_gives_identical_counts():
    model, x, y = resnet_case(0)
    adapter = NetworkAdapter(model, include_dense=True)
    big = IncrementalLesions(adapter, x, y)
    small = IncrementalLesions(adapter, x, y, memory_budget_bytes=40_000)
    rng = np.random.default_rng(3)
    for layer in (0, 2, 5, 8):
        sets = random_sets(rng, adapter.layer_sizes[layer])
        np.testing.assert_array_equal(small.correct_counts(layer, sets), big.correct_counts(layer, sets))
        assert big.last_stats["cache_chunks"] == 1
        if layer in (0, 2):
            assert small.last_stats["cache_chunks"] > 1 and small.last_stats["samples_per_block"] < len(x)
    assert small.batch_size < big.batch_size
    # a layer's whole cache is kept for the next call when it fits
    assert list(big._caches) == [0, 2, 5, 8] and 0 not in small._caches


def _count_passes(engine):
    """Wrap ``engine``'s probe passes (one per :meth:`_fill_many` call) and return the list of their layer groups."""
    passes, real = [], engine._fill_many

    def counted(plans, start, stop):
        passes.append([p.layer.name for p in plans])
        return real(plans, start, stop)

    engine._fill_many = counted
    return passes


def test_prepared_layers_share_probe_passes_and_give_identical_counts():
    """prepare(): a layer's probe pass fills the caches of the announced layers after it, as many as the
    budget holds; the counts equal those of one pass per layer and the plain oracle's."""
    model, x, y = resnet_case(0)
    adapter = NetworkAdapter(model, include_dense=True)
    layers = list(range(len(adapter.layer_sizes)))
    rng = np.random.default_rng(1)
    sets = [random_sets(rng, w) for w in adapter.layer_sizes]
    alone = IncrementalLesions(adapter, x, y, batch_size=25)
    per_layer = _count_passes(alone)
    expected = [alone.correct_counts(l, sets[l]) for l in layers]
    assert len(per_layer) == len(layers)
    shapes = adapter.node_shapes(x)
    sizes = [len(x) * adapter.lesion_plan(l).cache_elements(shapes) * 8 for l in layers]
    for budget, most in [(None, 1), (2 * (sum(sizes) // 2), len(layers) - 1)]:
        grouped = IncrementalLesions(adapter, x, y, batch_size=25, memory_budget_bytes=budget)
        passes = _count_passes(grouped)
        grouped.prepare(layers)
        for l in layers:
            np.testing.assert_array_equal(grouped.correct_counts(l, sets[l]), expected[l], err_msg=adapter.layer_names[l])
        assert 1 <= len(passes) <= most and sum(map(len, passes)) == len(layers), passes
        if budget is not None:   # half the caches fit at a time: at least two passes, none over the budget
            assert len(passes) >= 2 and max(sizes) <= budget // 2
    for l in (0, 4, len(layers) - 1):
        np.testing.assert_array_equal(expected[l], correct_counts_plain(adapter, l, sets[l], x, y, batch_size=17))


def test_float32_block_shapes_do_not_change_counts():
    model, x, y = resnet_case(3)
    model, x = model.float(), x.float()
    adapter = NetworkAdapter(model)
    sets = [np.arange(s) for s in (2, 2, 3, 5)]
    a = IncrementalLesions(adapter, x, y).correct_counts(3, sets)
    b = IncrementalLesions(adapter, x, y, memory_budget_bytes=30_000).correct_counts(3, sets)
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - correct_counts_plain(adapter, 3, sets, x, y)).max() <= 1


def test_flops_of_both_paths():
    model, x, _ = resnet_case(0)
    adapter = NetworkAdapter(model)
    shapes = adapter.node_shapes(x)
    first, last = adapter.lesion_plan(0).macs(shapes, 2), adapter.lesion_plan(7).macs(shapes, 2)
    assert first["forward"] == last["forward"] > first["lesion"] > last["lesion"] > 0
    assert first["probe"] < last["probe"] < first["forward"]
    # stem (2->6, 3x3, 8x8) + b1.conv1 (6->6, 3x3, 8x8) are the only layers the stem's probe runs
    assert first["probe"] == 64 * 6 * 2 * 9 + 64 * 6 * 6 * 9


def test_lesion_test_on_a_cnn_agrees_between_engines():
    model, x, y = resnet_case(3)
    adapter = NetworkAdapter(model)
    labels = [np.arange(n) % 2 for n in adapter.layer_sizes]
    part = Partition.from_labels(labels, adapter.layer_names, adapter.layer_sizes)
    fast = lesion_test(lesion_engine("incremental", adapter, x, y), part, n_random=3, random_state=0)
    plain = lesion_test(lesion_engine("plain", adapter, x, y), part, n_random=3, random_state=0)
    assert len(fast) == 2 * 8 * 4
    np.testing.assert_array_equal(fast["accuracy"].to_numpy(), plain["accuracy"].to_numpy())


def test_conv1d_and_convolutional_classifier():
    """Conv1d layers, a strided dilated conv and a 1x1-conv output layer (no Linear at all)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(3, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ELU(),
                          nn.Conv1d(6, 5, 3, stride=2, dilation=2), nn.Tanh(), nn.AdaptiveMaxPool1d(1),
                          nn.Conv1d(5, 4, 1), nn.Flatten()).double().eval()
    x = torch.randn(50, 3, 20, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::4] = 0
    adapter = NetworkAdapter(model)
    assert adapter.layer_names == ["0", "3"] and adapter.n_classes == 4
    ev = IncrementalLesions(adapter, x, y)
    for layer, width in enumerate(adapter.layer_sizes):
        sets = [[0], [1, 2], [width - 1], list(range(width))]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(adapter, layer, sets, x, y))


# ----- channels-last layout, fused conv correction, pool-before-ReLU rewrite (the CPU fast path) -----

def _small_cnn(dtype, seed=0, n=120):
    """The paper's small CNN shape at toy size: conv-relu-conv-relu-pool-conv-relu-pool-dense."""
    from modlens.nn.models import build_model
    model = build_model({"type": "cnn", "input_shape": [2, 12, 12], "n_classes": 5, "conv": [8, 8, "M", 8, "M"],
                         "dense": [16]}, generator=torch.Generator().manual_seed(seed)).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # larger weights and non-zero biases, so that lesions change predictions
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.0)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=dtype))
    x = torch.randn(n, 2, 12, 12, generator=g, dtype=dtype)
    with torch.no_grad():
        model.out.bias.sub_(model(x).mean(0))             # centre the logits: every class gets predicted
        y = model(x).argmax(-1)
    y[::3] = (y[::3] + 1) % 5
    return model, x, y


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_engine_equals_plain_in_float64(channels_last):
    model, x, y = _small_cnn(torch.float64)
    adapter = NetworkAdapter(model)
    ev = IncrementalLesions(adapter, x, y, channels_last=channels_last, batch_size=50)
    assert ev.channels_last is channels_last
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(adapter.layer_sizes):
        sets = random_sets(rng, width)
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(adapter, layer, sets, x, y), err_msg=str(layer))
        changed += int((fast != ev.baseline).any())
    assert changed == len(adapter.layer_sizes)


def test_channels_last_is_the_cpu_default_and_the_weights_are_restored():
    model, x, y = _small_cnn(torch.float32)
    adapter = NetworkAdapter(model)
    before = {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}
    ev = IncrementalLesions(adapter, x, y)
    assert ev.channels_last
    ev.correct_counts(0, [[1, 2]])
    cached = next(iter(ev._caches.values()))
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in cached.values() if v.dim() == 4)
    assert {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()} == before
    mlp = NetworkAdapter(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    assert not IncrementalLesions(mlp, torch.rand(10, 6), torch.zeros(10, dtype=torch.int64)).channels_last


def test_float32_layouts_agree_with_each_other_and_the_oracle():
    """float32: the NHWC and NCHW engines give the same counts (and the plain path's, within one
    sample for rounding near ties)."""
    model, x, y = _small_cnn(torch.float32, seed=4, n=300)
    adapter = NetworkAdapter(model)
    rng = np.random.default_rng(1)
    for layer in (0, 1):
        sets = [rng.choice(8, size=s, replace=False) for s in (1, 2, 2, 3, 5)]
        nhwc = IncrementalLesions(adapter, x, y).correct_counts(layer, sets)
        nchw = IncrementalLesions(adapter, x, y, channels_last=False).correct_counts(layer, sets)
        np.testing.assert_array_equal(nhwc, nchw)
        assert np.abs(nhwc - correct_counts_plain(adapter, layer, sets, x, y)).max() <= 1


def test_stacked_tail_inputs_keep_the_channels_last_layout():
    """Several sets stacked in the batch: each set's corrected consumer output, as a view in NHWC."""
    model, x, _ = _small_cnn(torch.float64, n=6)
    adapter = NetworkAdapter(model)
    plan = adapter.lesion_plan(0)
    idx = torch.tensor([[0, 3], [1, 2], [5, 7]])
    with torch.inference_mode():      # as the engine runs it
        cached = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                  for k, v in zip(plan.probe_outputs, plan.probe(x))}
        (z_new,) = plan.tail_inputs(cached, [idx], [])
    assert z_new.shape == (18, 8, 12, 12) and z_new.is_contiguous(memory_format=torch.channels_last)
    c = plan.corrections[0]
    for b in range(3):
        with torch.inference_mode():
            expected = cached[c.consumer] - F.conv2d(cached[c.value][:, idx[b]], c.module.weight[:, idx[b]], None, 1, 1)
        torch.testing.assert_close(z_new[6 * b:6 * (b + 1)], expected, rtol=1e-12, atol=1e-12)


def test_pool_before_relu_rewrite_is_exact_and_selective():
    from modlens.nn._fx import trace
    from modlens.nn._plan import pool_before_relu

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.act = nn.MaxPool2d(2), nn.ReLU()

        def forward(self, x):
            a = F.max_pool2d(torch.relu(x), 2)             # rewritten
            b = self.pool(self.act(x))                       # rewritten (modules)
            r = F.relu(x)
            c = F.max_pool2d(r, 2) + r[..., ::2, ::2]        # not: the ReLU has another user
            d, _ = F.max_pool2d(F.relu(x), 2, return_indices=True)   # not: indices would change
            return a + b + c + d

    net = Net()
    gm = trace(net)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    expected = net(x)
    assert pool_before_relu(gm) == 2
    assert torch.equal(gm(x), expected)
