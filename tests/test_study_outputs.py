"""Study-level statistics (BH per table family, bold rule, agreement with the paper), the
paper's tables, the figures and the report files, without the study runner."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from modlens.report.paper import (bold_effect, compare_with_paper, agreement_counts, family_bh, reported_results,
                                 check_rows)
from modlens.report.tables import build_tables, format_p, main_k

SHARED_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "paper" / "reported-results.csv"


def synthetic_rows(seed=0, groups=("a", "b", "c"), ks=(16,)):
    rng = np.random.default_rng(seed)
    rows = []
    for g in groups:
        for k in ks:
            for part in ("weights/global", "weights/local", "activations/global", "activations/local"):
                for fam, metrics in (("lesion", ("acc_drop", "class_range")), ("vis", ("vis_score", "softmax_entropy"))):
                    for m in metrics:
                        p = float(rng.choice([rng.uniform(0, 1), 10 ** rng.uniform(-12, -1)]))
                        rows.append({"table_family": fam, "group": g, "network_label": f"Net {g}", "k": k,
                                     "partitioning": part, "metric": m, "p_value": p, "effect": rng.uniform(0.7, 1.3),
                                     "effect_se": rng.uniform(0.01, 0.1), "n_networks": 5, "n_subclusters": 40})
    return pd.DataFrame(rows)


def test_family_bh_is_scipy_bh_within_each_family():
    rows = synthetic_rows(ks=(8, 16))
    rows.loc[3, "p_value"] = np.nan  # a missing p value is left out of its family's count
    out, info = family_bh(rows, alpha=0.05)
    for fam in ("lesion", "vis"):
        sel = out["table_family"] == fam
        p = out.loc[sel, "p_value"].to_numpy()
        ok = np.isfinite(p)
        ref = sps.false_discovery_control(p[ok], method="bh")
        np.testing.assert_allclose(out.loc[sel, "q_value"].to_numpy()[ok], ref, rtol=1e-12)
        sig = out.loc[sel, "significant"].to_numpy()
        assert (sig[ok] == (ref <= 0.05)).all() and not sig[~ok].any()
        assert info[fam]["m"] == ok.sum() and info[fam]["critical_p"] == p[ok][ref <= 0.05].max()
    # the families are independent: moving every vis p value changes no lesion decision
    moved = rows.copy()
    moved.loc[moved["table_family"] == "vis", "p_value"] = 1e-30
    again, _ = family_bh(moved)
    lesion = out["table_family"] == "lesion"
    np.testing.assert_array_equal(again.loc[lesion, "q_value"], out.loc[lesion, "q_value"])
    joint, jinfo = family_bh(rows, scope="joint")
    ok = rows["p_value"].notna().to_numpy()
    np.testing.assert_allclose(joint["q_value"].to_numpy()[ok],
                               sps.false_discovery_control(rows["p_value"].to_numpy()[ok], method="bh"), rtol=1e-12)


def _paper_rows(tables=(4, 5)):
    rep = reported_results()
    rep = rep[rep["table"].isin(tables)]
    return rep.rename(columns={"network": "network_label"}).assign(
        table_family=np.where(rep["table"] == 4, "lesion", "vis"), group=rep["network"], n_networks=5, n_subclusters=0)


def test_paper_critical_value_needs_tables_4_and_5_together():
    """Appendix A.7 states p_crit = 0.025. BH over the paper's own p values of Tables 4 and 5
    together gives exactly that and every bold p of both tables; per table it gives 0.021
    and 0.013, and Table 5 would lose two of its marks (the reason for scope="joint")."""
    rows = _paper_rows()
    joint, jinfo = family_bh(rows, scope="joint")
    assert jinfo["lesion"]["critical_p"] == jinfo["vis"]["critical_p"] == 0.025
    assert (joint["significant"].to_numpy() == rows["significant"].to_numpy()).all()
    sep, info = family_bh(rows, scope="table")
    assert (info["lesion"]["critical_p"], info["vis"]["critical_p"]) == (0.021, 0.013)
    differ = sep[sep["significant"].to_numpy() != rows["significant"].to_numpy()]
    assert sorted(differ["p_value"]) == [0.023, 0.025] and set(differ["metric"]) == {"softmax_entropy"}


def test_bold_rule_two_standard_errors_on_the_modular_side():
    assert bold_effect(1.123, 0.058, "acc_drop")          # 1.007 > 1
    assert not bold_effect(1.061, 0.048, "acc_drop")      # 0.965
    assert not bold_effect(1.1, 0.05, "acc_drop")         # exactly two SE: not "more than"
    assert not bold_effect(0.5, 0.01, "class_range")      # far from 1 but on the wrong side
    assert bold_effect(0.931, 0.016, "softmax_entropy")   # low is modular: 0.963 < 1
    assert not bold_effect(1.105, 0.021, "softmax_entropy")
    assert bold_effect(1.011, float("nan"), "vis_score")  # no SE (Tables 2, 3): the side of 1
    assert not bold_effect(float("nan"), 0.1, "vis_score")


def test_format_p_like_the_paper():
    assert format_p(1.19e-17)[0] == "1.19 × 10^-17"
    assert format_p(1.19e-17)[1] == "1.19 × 10<sup>-17</sup>"
    assert format_p(0.063)[0] == "0.063" and format_p(1.0)[0] == "1.000" and format_p(0.001)[0] == "0.001"
    assert format_p(9.999e-4)[0] == "1.00 × 10^-3"
    assert format_p(float("nan"))[0] == "n/a"


def test_agreement_cell_by_cell():
    base = {"group": "g", "network_label": "MLP, MNIST", "k": 16, "partitioning": "weights/global", "n_networks": 5,
            "n_subclusters": 80}
    rows = pd.DataFrame([
        {**base, "table_family": "lesion", "metric": "acc_drop", "p_value": 1e-6, "effect": 1.2, "effect_se": 0.05},
        {**base, "table_family": "lesion", "metric": "class_range", "p_value": 1e-6, "effect": 0.5, "effect_se": 0.05},
        {**base, "table_family": "vis", "metric": "vis_score", "p_value": 0.5, "effect": 0.9, "effect_se": 0.05},
        {**base, "network_label": "Not in the paper", "group": "h", "table_family": "vis", "metric": "vis_score",
         "p_value": 0.5, "effect": 0.9, "effect_se": 0.05},
    ])
    out, _ = family_bh(rows)
    cmp_ = compare_with_paper(out).set_index("metric")
    assert len(cmp_) == 3  # the unknown network has no paper value
    # paper: acc_drop 1.19e-17 sig, effect 1.123; class_range 0.817 n.s., 0.701; vis_score 0.001 sig, 1.003
    assert cmp_.loc["acc_drop", ["agree_significance", "agree_side", "agree"]].tolist() == [True, True, True]
    assert cmp_.loc["class_range", ["agree_significance", "agree_side", "agree"]].tolist() == [False, True, False]
    assert cmp_.loc["vis_score", ["agree_significance", "agree_side", "agree"]].tolist() == [False, False, False]
    assert agreement_counts(compare_with_paper(out)) == {"cells": 3, "significance": 1, "side": 2, "both": 1}


def test_packaged_paper_values():
    rep = reported_results()
    assert len(rep) == 112 and set(rep["table"]) == {2, 3, 4, 5}
    assert not rep.duplicated(["network", "k", "partitioning", "metric"]).any()
    t45 = rep[rep["table"].isin([4, 5])]
    assert (t45["significant"] == (t45["p_value"] <= 0.025)).all()
    if SHARED_CSV.is_file():
        shared = pd.read_csv(SHARED_CSV)
        shared["significant"] = shared["significant"].astype(str).str.lower().eq("true")
        pd.testing.assert_frame_equal(rep, shared)


def test_check_rows_names_the_problem():
    rows = synthetic_rows()
    with pytest.raises(ValueError, match="lack columns.*effect_se"):
        check_rows(rows.drop(columns="effect_se"))
    bad = rows.copy()
    bad.loc[0, "table_family"] = "vis"
    with pytest.raises(ValueError, match="filed under table_family 'vis'"):
        check_rows(bad)
    with pytest.raises(ValueError, match="duplicate study row"):
        check_rows(pd.concat([rows, rows.iloc[:1]]))


def test_tables_laid_out_like_the_paper():
    rows, info = family_bh(synthetic_rows(ks=(8, 12, 16)))
    assert main_k(rows) == 16
    tables = {t.name: t for t in build_tables(rows, info)}
    assert set(tables) == {"table1", "table2", "table3", "table4", "table5"}
    t4 = tables["table4"]
    assert t4.columns[:3] == ["Network", "Partitioning", "Importance: Acc. Drop: p Value"]
    assert len(t4.rows) == 3 * 4 and [c.text for c in t4.rows[0][:2]] == ["Net a", "Weight/Global"]
    assert len(tables["table2"].rows) == 3 * 3 * 4 and tables["table2"].columns[1] == "k"
    r = rows[(rows["k"] == 16) & (rows["table_family"] == "lesion")].iloc[0]
    assert t4.rows[0][2].bold == bool(r["significant"]) and t4.rows[0][3].bold == bool(r["bold"])
    md = t4.to_markdown()
    assert "critical p" in md and md.count("\n| ") == 1 + 12
    assert all(c.text.startswith("**") is False for row in t4.rows for c in row)
    one_k = {t.name for t in build_tables(*family_bh(synthetic_rows()))}
    assert one_k == {"table1", "table4", "table5"}


def test_figure3_shades_significant_cells(tmp_path):
    from PIL import Image
    from modlens.report.plots import figure3

    rows, info = family_bh(synthetic_rows(groups=("a",)))
    rows["significant"] = [i % 2 == 0 for i in range(len(rows))]
    f = figure3(rows, {"a": "Net a"}, 16, {"lesion": 0.01}, tmp_path)
    rgb = np.asarray(Image.open(f.png).convert("RGB"))
    assert ((rgb == (158, 202, 225)).all(axis=-1)).sum() > 1000  # the shade
    assert f.svg.read_text().count("n.s.") >= 8 or "n.s." in f.svg.read_text()
    rows["significant"] = False
    f = figure3(rows, {"a": "Net a"}, 16, {}, tmp_path / "none")
    assert ((np.asarray(Image.open(f.png).convert("RGB")) == (158, 202, 225)).all(axis=-1)).sum() == 0


def test_study_outputs_files(tiny_study):
    from modlens.report.outputs import write_study_outputs

    out = write_study_outputs(tiny_study)
    names = {p.name for p in (tiny_study / "tables").iterdir()}
    assert {"table1.csv", "table1.md", "table4.csv", "table5.md", "study_rows.csv", "paper_comparison.csv"} <= names
    figs = {p.name for p in (tiny_study / "figures").iterdir()}
    assert {"figure3.png", "figure3.svg", "figure5_mlp-mnist.png", "figure7_mlp-digits.svg"} <= figs
    rows = pd.read_csv(tiny_study / "tables" / "study_rows.csv")
    for fam in ("lesion", "vis"):
        sel = rows[rows["table_family"] == fam]
        np.testing.assert_allclose(sel["q_value"], sps.false_discovery_control(sel["p_value"], method="bh"))
    assert out["agreement"]["cells"] == 16  # the "MLP, MNIST" group at k = 16
    html = out["report"].read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    import re
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(l.startswith(("#", "data:")) for l in links)  # nothing outside the file
    assert html.count("<img ") == html.count('<img src="data:image/png;base64,') == len(
        [p for p in out["figures"] if p.suffix == ".png"])
    assert "Detecting Modularity in Deep Neural Networks" in html and "Agreement with the paper" in html
    assert "Networks and seeds" in html and "analyze mlp-mnist-s0 k=16" in html and "random_state" in html
    before = {p.name: p.read_bytes() for p in (tiny_study / "tables").iterdir()}
    again = write_study_outputs(tiny_study)
    assert {p.name: p.read_bytes() for p in (tiny_study / "tables").iterdir()} == before
    assert again["report"].read_bytes() == out["report"].read_bytes()


def test_cli_report_on_a_saved_analyze_result(tiny_study, tmp_path, capsys):
    from modlens.cli import main

    net = tiny_study / "networks" / "mlp-mnist-s0"
    assert main(["report", str(net), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Table 4: lesion experiments" in html and "figure7" in html and "feature_vis_" in html
    assert not (net / "report.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a saved analysis result" in capsys.readouterr().err


def test_correlation_figures_for_halves_groups(tiny_study, tmp_path):
    """A group whose label says halves gets Figures 1/6: from a given callable, or from the
    model folder study.json records; without either, or with a folder that is gone, a note."""
    import json
    import shutil

    import torch
    from modlens.nn.io import save_model
    from modlens.nn.models import build_model
    from modlens.report.outputs import write_study_outputs

    study = tmp_path / "halves"
    shutil.copytree(tiny_study, study, ignore=shutil.ignore_patterns("tables", "figures", "report.html"))
    rows = pd.read_parquet(study / "study_rows.parquet")
    rows.loc[rows["group"] == "mlp-digits", "network_label"] = "MLP, halves-digits"
    rows.to_parquet(study / "study_rows.parquet", index=False)
    out = write_study_outputs(study)
    assert any("Figures 1/6 skipped for mlp-digits" in n for n in out["notes"])
    assert not list((study / "figures").glob("figure6*"))

    arch = {"type": "mlp", "sizes": [64, 32, 32, 10]}
    save_model(build_model(arch, generator=torch.Generator().manual_seed(0)), study / "models" / "m2",
               {"architecture": arch, "dataset": {"name": "digits", "data_seed": 0, "activation_split": {"split": "val"}}})
    record = json.loads((study / "study.json").read_text())
    for n in record["networks"]:
        n["model_dir"] = "models/m2" if n["id"] == "mlp-digits-s2" else "models/gone"
        n["k"] = 4
    (study / "study.json").write_text(json.dumps(record))
    out = write_study_outputs(study)
    assert (study / "figures" / "figure6_mlp-digits.png").is_file() and (study / "figures" / "figure6_mlp-digits.svg").is_file()
    assert "Figures 1/6 (MLP, halves-digits" in out["report"].read_text()

    calls = []
    rows.loc[rows["group"] == "mlp-mnist", "network_label"] = "MLP, stack-same"
    rows.to_parquet(study / "study_rows.parquet", index=False)
    def maps_of(network_id):
        calls.append(network_id)
        raise FileNotFoundError("no such model")

    out = write_study_outputs(study, correlation_maps=maps_of)
    assert sorted(calls) == ["mlp-digits-s2", "mlp-mnist-s0"]
    assert sum("no such model" in n for n in out["notes"]) == 2


def test_figure7_uses_the_images_of_the_first_network(tmp_path):
    """Images are saved for a combined result's first network only; Figure 7 must pair them
    with that network's rows, and draw the largest first-layer subcluster's true image first."""
    from PIL import Image
    from modlens.report.plots import figure7

    rows = []
    for net in ("n0", "n1"):
        for cluster, size in ((0, 3), (1, 5)):
            for draw in range(3):
                rows.append({"network": net, "partitioning": "weights/global", "layer": 0, "layer_name": "l0",
                             "cluster": cluster, "size": size, "draw": draw})
    table = pd.DataFrame(rows)
    images = np.zeros((6, 1, 8, 8))
    images[3] = 0.5  # network n0, cluster 1 (the largest), draw 0: the only grey image
    f = figure7({"g": (table, {"weights__global": images}, (0.0, 1.0))}, {"g": "G"}, tmp_path)
    assert len(f) == 1
    rgb = np.asarray(Image.open(f[0].png).convert("L"))
    grey_cols = np.flatnonzero(((rgb > 110) & (rgb < 145)).sum(axis=0) > 30)
    black_cols = np.flatnonzero((rgb < 5).sum(axis=0) > 30)
    assert len(grey_cols) > 30 and len(black_cols) > 60  # one grey image, two black ones
    assert grey_cols.max() < black_cols.min()  # the true image is drawn left of its random sets


def test_network_groups_from_study_json_or_ids():
    from modlens.report.outputs import network_groups

    ids = ["mlp-mnist-s0", "mlp-mnist-s1", "cnn-x-s0"]
    assert network_groups({}, ids) == {"mlp-mnist-s0": "mlp-mnist", "mlp-mnist-s1": "mlp-mnist", "cnn-x-s0": "cnn-x"}
    listed = {"networks": [{"id": "mlp-mnist-s0", "group": "A"}, {"id": "mlp-mnist-s1", "group": "B"}]}
    assert network_groups(listed, ids) == {"mlp-mnist-s0": "A", "mlp-mnist-s1": "B", "cnn-x-s0": "cnn-x"}
    mapped = {"networks": {"cnn-x-s0": {"group": "C"}}}
    assert network_groups(mapped, ids)["cnn-x-s0"] == "C"
