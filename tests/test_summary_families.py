"""Benjamini-Hochberg within families, degenerate-metric diagnostics and their rendering."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from modlens.analysis.diagnostics import add_diagnostics, clusterability_rows
from modlens.analysis.text import format_summary
from modlens.analysis.statistics import correct_by_family, subcluster_tests, summarize


def _tests(pcts_by_metric):
    rows = []
    for part, metric, pcts in pcts_by_metric:
        for i, p in enumerate(pcts):
            rows.append(dict(network="0", partitioning=part, layer=0, layer_name="l0", cluster=i, size=2,
                             metric=metric, value=1.0, random_mean=1.0, percentile=p, effect=1.0,
                             n_ties=0, n_random=19))
    return pd.DataFrame(rows)


def test_lesion_and_visualization_rows_are_corrected_separately():
    # one subcluster per row: Fisher of one percentile is that percentile, so the rows' p values
    # are 0.02 (best lesion row), 0.5 x 3, and 0.001 x 4 (visualization rows). Pooled, the tiny
    # visualization p values let the 0.02 row through (rank 5 of 8: 0.02 <= 5/8 * 0.05); within
    # its own family it needs 0.02 <= 1/4 * 0.05 and fails, as in the paper's Table 4.
    lesion = [("weights/global", "acc_drop", [0.02]), ("weights/global", "class_range", [0.5]),
              ("weights/local", "acc_drop", [0.5]), ("weights/local", "class_range", [0.5])]
    vis = [(p, m, [0.001]) for p in ("weights/global", "weights/local") for m in ("vis_score", "softmax_entropy")]
    summary = summarize(_tests(lesion + vis), alpha=0.05)
    assert set(summary["family"]) == {"lesion", "visualization"}
    for fam in ("lesion", "visualization"):
        rows = summary[summary["family"] == fam]
        ref = sps.false_discovery_control(rows["p_value"].to_numpy(), method="bh")
        np.testing.assert_allclose(rows["q_value"].to_numpy(), ref)
        np.testing.assert_array_equal(rows["significant"].to_numpy(), ref <= 0.05)
    # pooled, the four tiny visualization p values would let the best lesion row through
    pooled = sps.false_discovery_control(summary["p_value"].to_numpy(), method="bh")
    best = summary[summary["family"] == "lesion"]["p_value"].idxmin()
    assert pooled[best] <= 0.05 and not summary.loc[best, "significant"]


def test_correct_by_family_matches_scipy_per_family():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"family": rng.choice(["a", "b", "c"], 40), "p_value": rng.uniform(0, 0.2, 40) ** 2})
    out = correct_by_family(df.copy(), alpha=0.1)
    for fam, g in out.groupby("family"):
        np.testing.assert_allclose(g["q_value"], sps.false_discovery_control(g["p_value"], method="bh"))


def _lesion_table(drops_true, drops_rand):
    rows = []
    for i, (t, rs) in enumerate(zip(drops_true, drops_rand)):
        for d, v in enumerate([t, *rs]):
            rows.append(dict(network="0", partitioning="weights/global", layer=0, layer_name="l0", cluster=i, size=2,
                             kind="true" if d == 0 else "random", draw=d, neurons="0,1", accuracy=1 - v,
                             acc_drop=v, class_range=v))
    return pd.DataFrame(rows)


def test_diagnostics_flag_no_change_ties_and_saturation():
    # 3 subclusters x (1 + 4) lesions; 12 of 15 change nothing, and most pairs tie
    table = _lesion_table([0.0, 0.0, 0.01], [[0, 0, 0, 0], [0, 0, 0, 0.02], [0, 0, 0, 0.01]])
    tests = subcluster_tests(table)
    assert tests.loc[tests["metric"] == "acc_drop", "n_ties"].tolist() == [4, 3, 1]
    vis = table.rename(columns={"acc_drop": "vis_score", "class_range": "softmax_entropy"})
    vis["softmax_entropy"] = [1e-9] * 10 + [0.5] * 5  # 10 of 15 images saturated
    vtests = subcluster_tests(vis, metrics=("vis_score", "softmax_entropy"))
    all_tests = pd.concat([tests, vtests], ignore_index=True)
    summary = summarize(all_tests)
    add_diagnostics(summary, table, vis, all_tests)
    row = summary.set_index("metric")
    assert row.loc["acc_drop", "n_unchanged"] == 12 and row.loc["acc_drop", "n_lesions"] == 15
    assert row.loc["acc_drop", "n_tied_pairs"] == 8 and row.loc["acc_drop", "n_pairs"] == 12
    assert row.loc["acc_drop", "degenerate"] == "ties,no-change"
    assert row.loc["softmax_entropy", "n_saturated"] == 10 and "saturated" in row.loc["softmax_entropy", "degenerate"]
    text = format_summary(summary)
    assert "! weights/global Acc. drop: ties: 8/12" in text and "no-change: 12/15 lesions" in text
    assert "saturated: 10/15 images" in text
    # a healthy table raises no flag
    rng = np.random.default_rng(1)
    ok = _lesion_table(rng.uniform(0.01, 0.1, 5), rng.uniform(0.01, 0.1, (5, 19)))
    t2 = subcluster_tests(ok)
    s2 = add_diagnostics(summarize(t2), ok, None, t2)
    assert (s2["degenerate"] == "").all() and "!" not in format_summary(s2)


def test_clusterability_rows_bates_over_networks():
    table = pd.DataFrame({"network": ["0", "1"], "partitioning": ["weights/global"] * 2, "ncut": [1.0, 1.2],
                          "null_mean": [2.0, 2.2], "null_sd": [0.1, 0.2], "z": [-10.0, -5.0],
                          "p_value": [0.05, 0.05], "n_null": [19, 19]})
    rows = clusterability_rows(table)
    assert len(rows) == 1 and rows.loc[0, "family"] == "clusterability"
    assert rows.loc[0, "p_value"] == pytest.approx(2 * 0.05 ** 2)  # Bates(2) CDF at v <= 1/2: 2 v^2
    assert rows.loc[0, "z"] == pytest.approx(-7.5)
