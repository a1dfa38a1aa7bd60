"""End to end on networks whose answer is known: planted modules and null partitions."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from sklearn.metrics import adjusted_rand_score

import modlens
from modlens.core.partition import Partition
from modlens.experiments.partitioning import METHODS

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


@pytest.mark.parametrize("method", ["weights/global", "weights/local"])
def test_weight_clustering_recovers_planted_modules_exactly(planted, method):
    model, modules, _, _ = planted
    part = modlens.partition(model, method, n_clusters=4, random_state=0)
    assert part.layer_sizes == (48, 48, 48)
    for labels, truth in zip(part.labels, modules):
        assert adjusted_rand_score(truth, labels) == 1.0
    if method == "weights/global":
        assert part.ncut == pytest.approx(0.0, abs=1e-12)  # modules are disconnected


def test_activation_clustering_finds_planted_modules(planted):
    model, modules, _, (xa, _) = planted
    part = modlens.partition(model, "activations/global", n_clusters=4, data=xa)
    assert np.mean([adjusted_rand_score(t, l) for t, l in zip(modules, part.labels)]) > 0.9


def test_planted_modules_are_detected_as_important(planted):
    model, modules, test, (xa, _) = planted
    res = modlens.analyze(model, test, activation_data=xa, n_clusters=4, random_state=0)
    s = res.summary.set_index(["partitioning", "metric"])
    for method in METHODS:
        row = s.loc[(method, "acc_drop")]
        assert row["n_subclusters"] == 12
        assert row["p_value"] < 1e-6
        assert row["effect"] > 1.5 and row["significant"]
    # the smallest p Fisher can give for 12 subclusters at the lowest percentile 1/40
    floor = sps.chi2.sf(-2 * 12 * np.log(1 / 40), 24)
    assert s.loc[("weights/global", "acc_drop"), "p_value"] == pytest.approx(floor, rel=1e-9)


def test_user_partition_of_true_modules(planted):
    model, modules, test, _ = planted
    res = modlens.analyze(model, test, partition=[m.tolist() for m in modules], n_random=9)
    assert list(res.summary["partitioning"]) == ["user", "user"]
    assert res.summary.iloc[0]["p_value"] < 1e-5
    assert set(res.subclusters["draw"]) == set(range(10))


def test_random_partitions_are_not_found_modular(planted):
    """Null: partitions drawn at random must give p values consistent with uniform."""
    model, _, (x, y), _ = planted
    x, y = x[:300], y[:300]
    rng = np.random.default_rng(7)
    pvals, pcts = [], []
    for rep in range(120):
        labels = [rng.integers(0, 4, size=48) for _ in range(3)]
        res = modlens.analyze(model, (x, y), partition=labels, n_random=9, random_state=rep)
        pvals.append(res.summary.set_index("metric").loc["acc_drop", "p_value"])
        pcts.extend(res.tests.loc[res.tests["metric"] == "acc_drop", "percentile"])
    pvals, pcts = np.array(pvals), np.array(pcts)
    # at most alpha plus three binomial standard errors
    assert np.mean(pvals < 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(pvals))
    # Fisher on coarse centred percentiles is conservative (paper, footnote 5): p skews high
    assert np.mean(pvals) >= 0.5
    # the percentiles themselves are exactly calibrated: mean 0.5 under the null (ties count half)
    assert abs(pcts.mean() - 0.5) < 4 * 0.287 / np.sqrt(len(pcts))
    # and the true subcluster is no more often ranked first than chance (1 in 10)
    assert np.mean(pcts == 0.05) <= 0.1 + 4 * np.sqrt(0.09 / len(pcts))


def test_same_seed_same_tables(planted):
    model, _, test, (xa, _) = planted
    a = modlens.analyze(model, test, activation_data=xa, n_clusters=4, n_random=5, random_state=3)
    b = modlens.analyze(model, test, activation_data=xa, n_clusters=4, n_random=5, random_state=3)
    pd.testing.assert_frame_equal(a.subclusters, b.subclusters)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    c = modlens.analyze(model, test, activation_data=xa, n_clusters=4, n_random=5, random_state=4)
    assert not c.subclusters["neurons"].equals(a.subclusters["neurons"])


def test_partition_alone_matches_analyze(planted):
    model, _, test, (xa, _) = planted
    res = modlens.analyze(model, test, activation_data=xa, n_clusters=4, n_random=2, random_state=5,
                          partitionings=["activations/local"])
    alone = modlens.partition(model, "activations/local", n_clusters=4, data=xa, random_state=5)
    for a, b in zip(res.partitions["activations/local"].labels, alone.labels):
        np.testing.assert_array_equal(a, b)


def test_dataloader_and_tensors_give_the_same_result(planted):
    model, modules, (x, y), _ = planted
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    a = modlens.analyze(model, (x, y), partition=modules, n_random=4)
    b = modlens.analyze(model, loader, partition=modules, n_random=4)
    pd.testing.assert_frame_equal(a.summary, b.summary)


def test_bad_input_errors(planted):
    model, modules, (x, y), (xa, _) = planted
    with pytest.raises(ValueError, match="larger than the 144 hidden neurons"):
        modlens.partition(model, "weights/global", n_clusters=145)
    with pytest.raises(ValueError, match="unknown partitioning method"):
        modlens.partition(model, "weights/sideways")
    with pytest.raises(ValueError, match="activation data"):
        modlens.partition(model, "activations/global")
    with pytest.raises(ValueError, match="labels must lie in"):
        modlens.analyze(model, (x, y + 8), partition=modules)
    with pytest.raises(ValueError, match="100 inputs.*99 labels"):
        modlens.analyze(model, (x[:100], y[:99]), partition=modules)
    with pytest.raises(ValueError, match="empty"):
        modlens.analyze(model, (x[:0], y[:0]), partition=modules)
    with pytest.raises(ValueError, match="layer '0' have shape"):
        modlens.analyze(model, (x, y), partition=[np.zeros(47, int)] + modules[1:])
    with pytest.raises(ValueError, match="out of range"):
        modlens.analyze(model, (x, y), partition=[np.full(48, -3)] + modules[1:])
    with pytest.raises(ValueError, match="expected 3 label arrays"):
        modlens.analyze(model, (x, y), partition=modules[:2])
    with pytest.raises(ValueError, match="held-out"):
        data = (x, y)
        modlens.analyze(model, data, activation_data=data)


def test_save_writes_tables_and_leaves_nothing_on_failure(planted, tmp_path, monkeypatch):
    model, modules, test, _ = planted
    res = modlens.analyze(model, test, partition=modules, n_random=3)
    out = res.save(tmp_path / "run")
    names = sorted(p.name for p in out.iterdir())
    assert {"summary.parquet", "summary.csv", "subclusters.parquet", "subclusters.csv", "manifest.json",
            "partitions.json"} <= set(names)
    back = pd.read_parquet(out / "subclusters.parquet")
    pd.testing.assert_frame_equal(back, res.subclusters)
    with pytest.raises(FileExistsError):
        res.save(out)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError):
        res.save(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_original_code_options_propagate(planted):
    """Rows 9-11 and 14 of the notes: each option changes what it should and nothing else."""
    model, modules, (x, y), _ = planted
    base = modlens.analyze(model, (x, y), partition=modules, n_random=4, random_state=2)
    bal = modlens.analyze(model, (x, y), partition=modules, n_random=4, random_state=2, accuracy="balanced")
    assert not np.allclose(base.subclusters["acc_drop"], bal.subclusters["acc_drop"])
    np.testing.assert_array_equal(base.subclusters["neurons"], bal.subclusters["neurons"])
    norm = modlens.analyze(model, (x, y), partition=modules, n_random=4, random_state=2, class_range="normalized")
    np.testing.assert_allclose(base.subclusters["acc_drop"], norm.subclusters["acc_drop"])
    assert not np.allclose(base.subclusters["class_range"], norm.subclusters["class_range"])
    orig = modlens.analyze(model, (x, y), partition=modules, n_random=4, random_state=2, ties="original",
                           effect_rule="original")
    # ties counted in favour of modularity can only lower a percentile
    assert (orig.tests["percentile"].to_numpy() <= base.tests["percentile"].to_numpy() + 1e-12).all()
    assert "ncut" in base.summary.columns and "n_unclustered" in base.summary.columns
