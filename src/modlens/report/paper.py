"""Study-level statistics as the paper does them, and the paper's own numbers.

* :func:`family_bh`: Benjamini-Hochberg across all networks, partitionings and k values of
  one table family at a time (appendix A.7): the lesion metrics form one family (the paper's
  Table 4), the visualization metrics another (Table 5). Each family gets its own critical
  p value, which the paper reports as 0.025.
* :func:`bold_effect`: an effect is shown in bold when it lies more than two standard errors
  from 1 on the modular side (above 1, or below 1 for softmax entropy).
* :func:`reported_results` / :func:`compare_with_paper`: the values printed in the paper
  (packaged with modlens, see ``_paper/README.md``) beside measured ones, cell by cell.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pandas as pd

from modlens.core import stats
from modlens.analysis.statistics import METRICS, TABLE_FAMILIES, bold_effect, table_family

#: The metrics of each table family (``table_family`` of study rows -> metrics).
FAMILIES = {short: tuple(m for m in METRICS if m != "clusterability" and table_family(m) == short)
            for short in TABLE_FAMILIES.values()}
CITATION = ('"Detecting Modularity in Deep Neural Networks", anonymous authors, under double-blind review '
            "as a conference paper at ICLR 2022, Tables 2-5 (transcribed values packaged with modlens)")
PAPER_CRITICAL_P = 0.025
ROW_COLUMNS = ["table_family", "group", "network_label", "k", "partitioning", "metric",
               "p_value", "effect", "effect_se", "n_networks", "n_subclusters"]


def check_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Validate a study-rows frame (one row per group, k, partitioning and metric)."""
    missing = [c for c in ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"report.paper: study rows lack columns {missing}; each row needs {ROW_COLUMNS}")
    rows = rows.reset_index(drop=True).copy()
    wrong = [(m, f) for m, f in zip(rows["metric"], rows["table_family"]) if table_family(m) != f]
    if wrong:
        raise ValueError(f"report.paper: metric {wrong[0][0]!r} is filed under table_family {wrong[0][1]!r}, "
                         f"expected {table_family(wrong[0][0])!r}")
    key = ["group", "k", "partitioning", "metric"]
    dup = rows.duplicated(key)
    if dup.any():
        raise ValueError(f"report.paper: duplicate study row {rows.loc[dup, key].iloc[0].to_dict()}; "
                         "one row per (group, k, partitioning, metric)")
    p = rows["p_value"].to_numpy(dtype=float)
    bad = np.flatnonzero(np.isfinite(p) & ((p < 0) | (p > 1)))
    if bad.size:
        raise ValueError(f"report.paper: p_value {p[bad[0]]} in row {int(bad[0])} lies outside [0, 1]")
    return rows


BH_SCOPES = ("table", "joint")


def family_bh(rows: pd.DataFrame, *, alpha: float = 0.05, scope: str = "table") -> tuple[pd.DataFrame, dict[str, dict]]:
    """Add ``q_value``, ``significant``, ``critical_p`` and ``bold`` to ``rows``.

    ``scope="table"`` (the paper's text, appendix A.7: "within Tables 4 and 5 (separately)"):
    Benjamini-Hochberg runs once per ``table_family`` over every row of that family (all
    groups, partitionings and k values). ``scope="joint"``: one run over both families
    together; applied to the paper's own p values this is what reproduces its stated
    critical value 0.025 and every significance mark of Tables 4 and 5 (per table it gives
    0.021 and 0.013, and two softmax-entropy marks of Table 5 would not hold).
    Rows without a p value are left out of the count. Returns the frame and, per family,
    ``{"critical_p", "m", "n_significant", "alpha", "scope"}``.
    """
    if scope not in BH_SCOPES:
        raise ValueError(f"report.paper: scope must be one of {BH_SCOPES}, got {scope!r}")
    rows = check_rows(rows)
    rows["q_value"] = np.nan
    rows["significant"] = False
    rows["critical_p"] = np.nan
    info = {}
    blocks = [[f] for f in FAMILIES] if scope == "table" else [list(FAMILIES)]
    for fams in blocks:
        idx = rows.index[rows["table_family"].isin(fams)]
        if len(idx) == 0:
            continue
        p = rows.loc[idx, "p_value"].to_numpy(dtype=float)
        q, reject, critical = stats.benjamini_hochberg(p, alpha=alpha)
        rows.loc[idx, "q_value"] = q
        rows.loc[idx, "significant"] = reject
        rows.loc[idx, "critical_p"] = critical
        for family in fams:
            mine = (rows.loc[idx, "table_family"] == family).to_numpy()
            if mine.any():
                info[family] = {"critical_p": critical, "m": int(np.isfinite(p).sum()),
                                "n_significant": int(reject[mine].sum()), "alpha": alpha, "scope": scope}
    rows["significant"] = rows["significant"].astype(bool)
    rows["bold"] = [bold_effect(e, s, m) for e, s, m in zip(rows["effect"], rows["effect_se"], rows["metric"])]
    return rows, info


def side_of_one(effect: float) -> int:
    """+1 above 1, -1 below, 0 at 1 or unknown."""
    if effect is None or not math.isfinite(float(effect)):
        return 0
    return int(np.sign(float(effect) - 1.0))


def reported_results() -> pd.DataFrame:
    """The paper's Tables 2-5 as one tidy frame (packaged copy of reported-results.csv)."""
    with resources.files("modlens.report").joinpath("_paper/reported_results.csv").open("r", encoding="utf-8") as fh:
        frame = pd.read_csv(fh)
    frame["significant"] = frame["significant"].astype(str).str.lower().eq("true")
    return frame


def compare_with_paper(rows: pd.DataFrame, reported: pd.DataFrame | None = None) -> pd.DataFrame:
    """Measured rows (after :func:`family_bh`) beside the paper's, where the network label,
    k, partitioning and metric match. ``agree_significance``: the same BH decision;
    ``agree_side``: the effect on the same side of 1; ``agree``: both. Empty when nothing
    matches (e.g. a study of networks the paper did not report)."""
    reported = reported_results() if reported is None else reported
    key = ["network_label", "k", "partitioning", "metric"]
    paper = reported.rename(columns={"network": "network_label", "p_value": "paper_p", "effect": "paper_effect",
                                     "effect_se": "paper_se", "significant": "paper_significant",
                                     "table": "paper_table"})
    measured = rows.assign(k=rows["k"].astype(int))
    paper = paper.assign(k=paper["k"].astype(int))
    out = measured.merge(paper[key + ["paper_table", "paper_p", "paper_effect", "paper_se", "paper_significant"]],
                         on=key, how="inner")
    if out.empty:
        return out
    out["agree_significance"] = out["significant"].astype(bool) == out["paper_significant"].astype(bool)
    out["agree_side"] = [side_of_one(a) == side_of_one(b) for a, b in zip(out["effect"], out["paper_effect"])]
    out["agree"] = out["agree_significance"] & out["agree_side"]
    return out.reset_index(drop=True)


def agreement_counts(comparison: pd.DataFrame) -> dict[str, int]:
    n = int(len(comparison))
    if n == 0:
        return {"cells": 0, "significance": 0, "side": 0, "both": 0}
    return {"cells": n, "significance": int(comparison["agree_significance"].sum()),
            "side": int(comparison["agree_side"].sum()), "both": int(comparison["agree"].sum())}


__all__ = ["BH_SCOPES", "FAMILIES", "CITATION", "PAPER_CRITICAL_P", "ROW_COLUMNS", "check_rows", "family_bh",
           "bold_effect", "side_of_one", "reported_results", "compare_with_paper", "agreement_counts"]
