"""Next-token data and lesions at the torch boundary (issue 18): nn/tokens.py and nn/token_lesion.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from modlens.data import BYTE_CLASSES, GENRES, make_text_split
from modlens.nn import NetworkAdapter
from modlens.nn.token_lesion import IncrementalTokenLesions, PlainTokenLesions, token_counts_plain, token_scores
from modlens.nn.tokens import IGNORE, as_token_data, position_values, sample_positions
from tiny_decoders import FAMILIES, MLP, T, V, decoder, logits, token_ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


# ----- what users pass ---------------------------------------------------------------------------------
def test_ids_alone_score_each_position_against_the_next_token():
    ids = token_ids(3)
    d = as_token_data(ids)
    np.testing.assert_array_equal(d.targets[:, :-1].numpy(), ids[:, 1:].numpy())
    assert (d.targets[:, -1] == IGNORE).all() and d.n_scored == 3 * (T - 1)
    assert d.class_names == () and d.label_names == () and d.n_cells == 1


def test_labels_targets_and_right_padding():
    ids = token_ids(2)
    labels = ids.clone()
    labels[0, 3] = IGNORE
    d = as_token_data({"input_ids": ids, "labels": labels})  # HF: aligned with the ids
    assert d.targets[0, 2] == IGNORE and d.targets[0, 3] == ids[0, 4] and d.targets[1, 2] == ids[1, 3]
    shifted = torch.full_like(ids, IGNORE)
    shifted[:, 1] = 5
    d = as_token_data({"input_ids": ids, "targets": shifted})   # already shifted
    assert d.n_scored == 2 and (d.targets[:, 1] == 5).all()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0   # right padding: sequence 1 has 5 real tokens
    d = as_token_data({"input_ids": ids, "attention_mask": mask})
    assert d.scored[1].tolist() == [True] * 4 + [False] * 4 and d.scored[0, :-1].all()
    np.testing.assert_array_equal(d.positions()[:, 0], np.r_[np.zeros(T), np.ones(5)])
    mask[0, 0] = 0   # left padding
    with pytest.raises(ValueError, match="not right padding"):
        as_token_data({"input_ids": ids, "attention_mask": mask})
    with pytest.raises(ValueError, match="ambiguous.*'labels'.*'targets'"):
        as_token_data((ids, labels))
    with pytest.raises(ValueError, match="not both"):
        as_token_data({"input_ids": ids, "labels": labels, "targets": shifted})


def test_dataloaders_classes_and_labels():
    ids = token_ids(6)
    loader = DataLoader([{"input_ids": r} for r in ids], batch_size=4)
    classes = {int(t): int(t) % 2 for t in range(V)}
    d = as_token_data(loader, token_classes=classes, position_classes=np.r_[0, 1, 0, 1, 0, -1],
                      label_names=["a", "b"])
    np.testing.assert_array_equal(d.ids.numpy(), ids.numpy())
    assert d.class_names == ("class 0", "class 1") and d.label_names == ("a", "b")
    np.testing.assert_array_equal(d.token_class[:, :-1].numpy(), ids[:, 1:].numpy() % 2)
    assert (d.label[5] == -1).all() and (d.label[1] == 1).all()
    # cells: class * (labels + 1) + label; "none" is the last class / label
    cells = d.cells()
    assert cells[5, 0] == d.token_class[5, 0] * 3 + 2 and (cells[:, -1] == -1).all()
    assert d.cell_sizes().sum() == d.n_scored and d.n_cells == 9
    with pytest.raises(ValueError, match=r"position_classes must have shape \(6,\)"):
        as_token_data(ids, position_classes=np.zeros(5, dtype=int))


def test_a_text_dataset_brings_its_byte_classes_and_genres():
    streams = {"prose": b"The cat sat on the mat. " * 400, "code": b"def f(x):\n    return x + 1\n" * 400}
    ds = make_text_split(streams, "test", context=16, seed=0, chunk_bytes=512)
    d = as_token_data(ds)
    assert d.class_names == BYTE_CLASSES and d.label_names == GENRES
    np.testing.assert_array_equal(d.targets.numpy(), ds.targets)     # TextDataset targets are already shifted
    np.testing.assert_array_equal(d.label.numpy(), ds.position_genre())
    np.testing.assert_array_equal(d.token_class.numpy(), ds.target_classes())


def test_token_scores_are_accuracy_and_cross_entropy_per_cell():
    g = torch.Generator().manual_seed(0)
    logits_ = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[0, 0] = IGNORE
    cells = torch.randint(0, 4, (3, 5), generator=g)
    correct, ce = token_scores(logits_, targets, cells, 4)
    for s in range(2):
        keep = targets != IGNORE
        nll = F.cross_entropy(logits_[s][keep], targets[keep], reduction="none")
        hit = (logits_[s].argmax(-1) == targets)[keep].double()
        for c in range(4):
            sel = cells[keep] == c
            assert correct[s, c] == hit[sel].sum() and torch.isclose(ce[s, c], nll[sel].sum())


# ----- lesions ---------------------------------------------------------------------------------------------
def _data(n=24, seed=1):
    return as_token_data(token_ids(n, seed=seed), token_classes=np.arange(V) % 3, position_classes=np.arange(n) % 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_token_lesions_equal_the_plain_oracle(family):
    model = decoder(family, "causal")
    data = _data()
    a = NetworkAdapter(model, data.ids, input_name="input_ids")
    ev = IncrementalTokenLesions(a, data)
    # the intact model's cross-entropy is the model's own loss
    lg = logits(model, data.ids)
    want = F.cross_entropy(lg[:, :-1].reshape(-1, V), data.ids[:, 1:].reshape(-1), reduction="sum")
    assert np.isclose(ev.baseline_ce.sum(), float(want), rtol=1e-12)
    rng = np.random.default_rng(0)
    moved = 0
    for layer in range(2):
        sets = [rng.choice(MLP, k, replace=False) for k in (1, 8, 8, MLP)]
        correct, ce = ev.lesion_counts(layer, sets)
        c2, e2 = token_counts_plain(a, layer, sets, data)
        np.testing.assert_array_equal(correct, c2)
        np.testing.assert_allclose(ce, e2, rtol=1e-10)
        moved += int((np.abs(ce.sum(1) - ev.baseline_ce.sum()) > 1e-9).sum())
    assert moved >= 6
    plain = PlainTokenLesions(a, data)
    np.testing.assert_array_equal(plain.baseline, ev.baseline)


def test_lesion_sets_share_one_pass_of_the_prefix():
    model = decoder("plain", "causal")
    data = _data(16)
    a = NetworkAdapter(model, data.ids, input_name="input_ids")
    ev = IncrementalTokenLesions(a, data)
    calls = {"block0": 0, "block1": 0}
    hooks = [a.gm.get_submodule("blocks.0.fc").register_forward_hook(lambda *_: calls.__setitem__("block0", calls["block0"] + 1)),
             a.gm.get_submodule("blocks.1.fc").register_forward_hook(lambda *_: calls.__setitem__("block1", calls["block1"] + 1))]
    ev.lesion_counts(1, [np.arange(i, i + 4) for i in range(12)])   # 12 lesion sets of block 1
    for h in hooks:
        h.remove()
    assert calls["block0"] == 1 and calls["block1"] == 1  # block 0 (and block 1's fc) ran once, for all 12 sets
    assert ev.last_stats["cache_chunks"] == 1


def test_the_memory_budget_counts_the_logits():
    model = decoder("plain", "causal", dtype=torch.float32)
    data = _data(32)
    a = NetworkAdapter(model, data.ids, input_name="input_ids")
    budget = 4 << 20
    ev = IncrementalTokenLesions(a, data, memory_budget_bytes=budget)
    assert ev.extra_elements == 2 * T * V
    plan = a.lesion_plan(0)
    ev.lesion_counts(0, [np.arange(i, i + 2) for i in range(20)])
    per_pair = (plan.work_elements(ev.shapes) + ev.extra_elements) * 4
    pairs = ev.last_stats["sets_per_block"] * ev.last_stats["samples_per_block"]
    assert pairs * per_pair <= budget // 2 and pairs * T * V * 4 <= budget // 2   # sets x N x T x V logits fit
    assert pairs < 20 * 32   # and the budget did bind


def test_position_values_are_the_pre_activations_at_those_positions():
    model = decoder("plain", "causal")
    ids = token_ids(10)
    a = NetworkAdapter(model, ids, input_name="input_ids")
    positions = sample_positions(np.argwhere(np.ones((10, T), bool)), 25, np.random.default_rng(0))
    assert len(positions) == 25 and (np.diff(positions[:, 0]) >= 0).all()
    got = position_values(a, ids, positions, batch_size=3)
    with torch.no_grad():
        full = a.values()(ids)   # per layer (B, C, T)
    for layer in range(2):
        np.testing.assert_array_equal(got[layer], full[layer][positions[:, 0], :, positions[:, 1]].numpy())
