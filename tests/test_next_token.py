"""The next-token task through analyze (issue 18): metrics, the top-positions test, graphs, outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import modlens
from modlens.analysis import AnalysisConfig
from modlens.analysis.config import options
from modlens.analysis.statistics import FAMILIES, TASK_METRICS
from modlens.core.residual_graph import residual_weight_graph
from modlens.core.weight_share import weight_share
from modlens.experiments import top_positions
from modlens.experiments.partitioning import Partitioner
from modlens.experiments.token_graphs import VOCAB_MAX_NODES, vocab_parts
from modlens.experiments.token_lesion import token_lesion_metrics
from modlens.nn import NetworkAdapter
from modlens.nn.tokens import as_token_data
from tiny_decoders import MLP, T, V, decoder, token_ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


# ----- metrics by hand -----------------------------------------------------------------------------------
def test_token_lesion_metrics_by_hand():
    # 2 token classes x 2 labels (+ "none" of each): cells (class, label), 9 in all
    sizes = np.zeros((3, 3), dtype=int)
    sizes[0, 0], sizes[0, 1], sizes[1, 0], sizes[1, 1], sizes[2, 2] = 100, 100, 60, 40, 10
    base = np.zeros((3, 3))
    base[0, 0], base[0, 1], base[1, 0], base[1, 1], base[2, 2] = 80, 70, 30, 20, 5
    lesioned = base.copy()
    lesioned[0, 0] -= 40  # the lesion hurts class 0 at label 0 only
    base_ce, ce = sizes * 1.0, sizes * 1.0
    ce[0, 0] += 50
    m = token_lesion_metrics(lesioned.reshape(1, -1), ce.reshape(1, -1), base.ravel(), base_ce.ravel(), sizes.ravel(),
                             2, 2, min_positions=50)
    total = sizes.sum()
    assert np.isclose(m["acc_drop"][0], 40 / total) and np.isclose(m["ce_increase"][0], 50 / total)
    # class 0: drop 40/200; class 1: 0 -> range 0.2
    assert np.isclose(m["class_range"][0], 40 / 200)
    # label 0: drop 40/160, label 1: 0 -> range 0.25
    assert np.isclose(m["label_range"][0], 40 / 160)
    # with 110 positions needed, class 1 (100) drops out: one class left, no range
    m = token_lesion_metrics(lesioned.reshape(1, -1), ce.reshape(1, -1), base.ravel(), base_ce.ravel(), sizes.ravel(),
                             2, 2, min_positions=110)
    assert np.isnan(m["class_range"][0]) and np.isfinite(m["label_range"][0])


def test_concentration_by_hand():
    base = np.array([0.5, 0.25, 0.25])
    kl, h = top_positions.concentration(np.array([[0, 0, 0, 0], [0, 1, 2, 0], [1, 1, 1, 1]]), base)
    np.testing.assert_allclose(kl, [np.log(2), 0.0, np.log(4)])
    np.testing.assert_allclose(h, [0.0, -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)), 0.0])
    assert top_positions.n_top(50_000) == 500 and top_positions.n_top(2_000) == 100 and top_positions.n_top(30) == 30


def test_the_top_positions_of_a_set_that_fires_on_one_class_are_concentrated(monkeypatch):
    model = decoder("plain", "causal")
    data = as_token_data(token_ids(80, seed=3), token_classes=np.arange(V) % 4)   # ~140 class-0 targets > 100 top
    a = NetworkAdapter(model, data.ids, input_name="input_ids")
    cells = data.cells().numpy()

    def values(adapter, ids, positions, **kw):  # neurons 0-3 of layer 0 fire exactly where the target is of class 0
        rng = np.random.default_rng(0)
        z = [rng.normal(size=(len(positions), MLP)) for _ in range(2)]
        hit = cells[positions[:, 0], positions[:, 1]] == 0
        z[0][hit, :4] += 10.0
        return z

    monkeypatch.setattr(top_positions, "position_values", values)
    labels = [np.r_[np.zeros(4, int), np.ones(MLP - 4, int)], np.zeros(MLP, int)]
    part = modlens.Partition.from_labels(labels, a.layer_names, a.layer_sizes, method="user")
    table = top_positions.top_position_test(a, part, data, n_random=19, random_state=0)
    true = table[(table["kind"] == "true") & (table["size"] == 4)]["top_concentration"].iloc[0]
    rand = table[(table["kind"] == "random") & (table["size"] == 4)]
    pi0 = (cells[cells >= 0] == 0).mean()
    assert np.isclose(true, -np.log(pi0))                      # every top position is of class 0
    disjoint = [not {0, 1, 2, 3} & set(map(int, n.split(","))) for n in rand["neurons"]]
    assert sum(disjoint) >= 5 and (rand["top_concentration"][disjoint] < 0.2).all()
    assert (rand["top_concentration"] <= true + 1e-12).all()


# ----- analyze ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_result():
    model = decoder("plain", "causal")
    ids, act = token_ids(48, seed=1), token_ids(32, seed=2)
    kw = dict(activation_data=act, task="next-token", input_name="input_ids", n_clusters=4, n_random=4,
              token_classes=np.arange(V) % 3, position_classes=np.arange(48) % 2, feature_vis=True, random_state=0)
    return model, ids, kw, modlens.analyze(model, ids, **kw)


def test_analyze_next_token_rows_facts_and_families(tiny_result):
    model, ids, kw, res = tiny_result
    metrics = TASK_METRICS["next-token"]
    want = list(metrics["lesion"]) + list(metrics["visualization"])
    assert list(res.summary["metric"].unique()) == want and len(res.summary) == 4 * len(want)
    assert all(res.summary["family"] == [FAMILIES[m] for m in res.summary["metric"]])
    assert res.config["task"] == "next-token" and res.config["n_test_positions"] == 48 * (T - 1)
    with torch.no_grad():
        lg = model(ids)
    ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert np.isclose(res.config["test_cross_entropy"], float(ce))
    row = res.summary.set_index(["partitioning", "metric"])
    share = row.loc[("weights/global", "acc_drop")]
    assert 0 <= share["weight_share"] <= 1 and share["weight_share_uniform"] == pytest.approx(1 / 4)
    assert np.isnan(row.loc[("activations/global", "acc_drop"), "weight_share"])
    assert res.partitions["activations/global"].info["activation_rows"] == {"kind": "positions", "n": 32 * T}
    assert res.visualizations is not None and set(res.visualizations["kind"]) == {"true", "random"}


def test_both_engines_give_the_same_next_token_tables(tiny_result):
    model, ids, kw, res = tiny_result
    plain = modlens.analyze(model, ids, **{**kw, "partitionings": ["weights/global"], "feature_vis": False},
                            engine="plain")
    fast = res.subclusters[res.subclusters["partitioning"] == "weights/global"].reset_index(drop=True)
    assert fast["class_correct"].tolist() == plain.subclusters["class_correct"].tolist()
    for col in ("acc_drop", "ce_increase", "class_range", "label_range"):
        np.testing.assert_allclose(fast[col].to_numpy(float), plain.subclusters[col].to_numpy(float), atol=1e-9)


def test_a_next_token_result_saves_and_reports(tiny_result, tmp_path):
    from modlens.report import write_report

    *_, res = tiny_result
    res.save(tmp_path / "r")
    html = write_report(tmp_path / "r").read_text()
    assert "CE increase" in html and "Top-position KL" in html and "Label range" in html
    shown = res._repr_html_()  # the notebook display of a next-token result
    assert "CE increase" in shown and "Top-position KL" in shown and "next-token" in shown
    assert shown.count('src="data:image/png;base64,') == 1  # the percentile figure; top positions draw no grid


def test_the_next_token_task_needs_a_language_model():
    mlp = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Flatten(), torch.nn.Linear(8 * T, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, V))
    with pytest.raises(ValueError, match="next-token task needs a language model"):
        modlens.analyze(mlp, token_ids(8), task="next-token", n_clusters=2, partitionings=["weights/global"])


def test_task_options_reach_the_command_line_and_specs():
    opts = {o.name: o for o in options()}
    assert opts["task"].choices == ("classification", "next-token") and opts["task"].default == "classification"
    assert opts["vocab_nodes"].choices == ("auto", "tokens", "none", "groups")
    assert opts["act_tokens"].choices == ("auto", "positions", "aggregate") and opts["max_positions"].default == 4096
    with pytest.raises(ValueError, match="task must be one of"):
        AnalysisConfig(task="language")
    with pytest.raises(ValueError, match="token_classes and position_classes"):
        modlens.analyze(decoder("plain", "causal"), (token_ids(4), torch.zeros(4, dtype=torch.long)),
                        token_classes=np.zeros(V, int))


# ----- graphs ----------------------------------------------------------------------------------------
def test_vocabulary_nodes_tokens_none_and_groups():
    a = NetworkAdapter(decoder("plain", "causal"), token_ids(4), input_name="input_ids")
    parts = a.residual_parts()
    assert vocab_parts(parts)["embedding"] is not None                     # 64 tokens: one node each
    none = vocab_parts(parts, "none")
    assert none["embedding"] is None and none["head"] is None
    groups = np.arange(V) % 5
    groups[:3] = -1                                                        # three tokens left out
    grouped = vocab_parts(parts, "groups", groups)
    adj_g, sizes_g = residual_weight_graph(**grouped, mode="dense")
    adj_t, sizes_t = residual_weight_graph(**parts, mode="dense")
    assert sizes_g == [5, MLP, MLP, 5] and sizes_t == [V, MLP, MLP, V]
    # contracting the token graph's groups gives the grouped graph: every cut between neurons is kept
    m = np.zeros((sum(sizes_t), sum(sizes_g)))
    m[np.flatnonzero(groups >= 0), groups[groups >= 0]] = 1
    m[V:V + 2 * MLP, 5:5 + 2 * MLP] = np.eye(2 * MLP)
    m[V + 2 * MLP + np.flatnonzero(groups >= 0), 5 + 2 * MLP + groups[groups >= 0]] = 1
    contracted = m.T @ adj_t.toarray() @ m
    np.fill_diagonal(contracted, 0)
    np.testing.assert_allclose(contracted[5:5 + 2 * MLP], adj_g.toarray()[5:5 + 2 * MLP], rtol=1e-12)
    big = {"blocks": parts["blocks"], "embedding": np.ones((parts["embedding"].shape[0], VOCAB_MAX_NODES + 1)),
           "head": None, "final_gamma": None}
    assert vocab_parts(big)["embedding"] is None                           # above 4,096 tokens: left out by default
    with pytest.raises(ValueError, match="needs token_groups"):
        vocab_parts(parts, "groups")


def test_weight_share_by_hand():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])              # layer 0 -> layer 1, A[b, a]
    labels = [np.array([0, 1]), np.array([0, 1])]
    got = weight_share([(0, 1, a)], labels, [0, 1])
    assert np.isclose(got["share"], (1 + 16) / 30) and got["uniform"] == 0.5 and np.isclose(got["expected"], 0.5)
    got = weight_share([(0, 1, a)], [np.array([0, 0]), np.array([0, -1])], [0, 1])
    assert np.isclose(got["share"], (1 + 4) / 30) and np.isclose(got["expected"], 0.5) and got["k"] == 1


def test_activation_rows_per_position_or_per_sequence():
    model = decoder("plain", "causal")
    act = as_token_data(token_ids(20, seed=4))
    a = NetworkAdapter(model, act.ids, input_name="input_ids")
    pos = Partitioner(a, activation_data=act, n_clusters=3, task="next-token", max_positions=100).partition(
        "activations/global")
    assert pos.info["activation_rows"] == {"kind": "positions", "n": 100}
    agg = Partitioner(a, activation_data=act, n_clusters=3, task="next-token", act_tokens="aggregate").partition(
        "activations/global")
    assert "activation_rows" not in agg.info and pos.labels[0].shape == agg.labels[0].shape == (MLP,)
