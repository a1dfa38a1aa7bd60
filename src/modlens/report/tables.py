"""The paper's Tables 1-5 from study rows (after :func:`modlens.report.paper.family_bh`), as
CSV and Markdown laid out like the paper, and as cells the HTML report renders (the cells of
:mod:`modlens.analysis.display`, which a notebook's display of a result uses too).

Table 1: effect measures of every metric; Table 4: lesion p values and effects; Table 5:
visualization p values and effects (all at the study's main k); Tables 2 and 3: the same as 4
and 5 for every k, written only when the study has several k values. A p value is bold when
significant after Benjamini-Hochberg within its family, an effect when it lies more than two
standard errors from 1 on the modular side.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from modlens.analysis.display import effect_cell, format_effect, format_p, p_cell
from modlens.analysis.statistics import METRICS
from modlens.analysis.text import PARTITION_LABELS
from modlens.core.html import Cell, Table
from modlens.experiments.partitioning import METHODS
from modlens.report.paper import FAMILIES, PAPER_CRITICAL_P

_METRIC_HEAD = {"acc_drop": ("Importance: Acc. Drop", "High→Imp."), "class_range": ("Coherence: Class Range", "High→Coh."),
                "vis_score": ("Coherence: Vis Score", "High→Coh."), "softmax_entropy": ("Coherence: Softmax H", "Low→Coh.")}


def metric_head(metric: str) -> tuple[str, str]:
    """(column head, direction) of a metric in the paper's tables; metrics beyond the paper's four
    (the next-token task's) get theirs from :data:`~modlens.analysis.statistics.METRICS`."""
    if metric in _METRIC_HEAD:
        return _METRIC_HEAD[metric]
    spec = METRICS[metric]
    return (f"{spec.proxy.capitalize()}: {spec.label}",
            f"{'High' if spec.higher_is_modular else 'Low'}→{'Imp.' if spec.proxy == 'importance' else 'Coh.'}")


def main_k(rows: pd.DataFrame) -> int:
    """The k of Tables 1, 4 and 5: 16 (the paper's) when the study has it, else the largest."""
    ks = sorted({int(k) for k in rows["k"]})
    return 16 if 16 in ks else ks[-1]


def _ordered(values, order) -> list:
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def network_names(rows: pd.DataFrame) -> dict[str, str]:
    """group -> the name shown in the Network column (the paper label, or the group when
    two groups share a label or a label is missing)."""
    labels = rows.drop_duplicates("group").set_index("group")["network_label"]
    counts = labels.value_counts()
    return {g: (str(l) if isinstance(l, str) and l and counts[l] == 1 else (f"{l} [{g}]" if isinstance(l, str) and l else str(g)))
            for g, l in labels.items()}


def _lookup(rows: pd.DataFrame) -> dict:
    return {(r.group, int(r.k), r.partitioning, r.metric): r for r in rows.itertuples(index=False)}


def _p_cell(r) -> Cell:
    return Cell("") if r is None else p_cell(r.p_value, r.significant)


def _effect_cell(r, with_se: bool = True) -> Cell:
    return Cell("") if r is None else effect_cell(r.effect, r.effect_se if with_se else None, r.bold)


def _caption(what: str, info: dict, families: list[str], k_text: str) -> str:
    parts = [what, k_text]
    for fam in families:
        if fam in info:
            f = info[fam]
            crit = ("none (no p value significant)" if not f["n_significant"] else
                    f"{f['critical_p']:.3g}" if f["critical_p"] >= 1e-3 else format_p(f["critical_p"])[0])
            which = f"{fam}" if f.get("scope", "table") == "table" else "lesion and visualization"
            parts.append(f"Benjamini-Hochberg across all {f['m']} {which} p values of the study at α = {f['alpha']:g}: "
                         f"critical p = {crit} (the paper's was {PAPER_CRITICAL_P}).")
    parts.append("Bold p value: significant; bold effect: more than two standard errors from 1 on the modular side.")
    return " ".join(parts)


def _p_effect_table(rows, info, family: str, name: str, title: str, ks: list[int], with_k: bool) -> Table | None:
    metrics = [m for m in FAMILIES[family] if m in set(rows["metric"])]
    sub = rows[(rows["table_family"] == family) & rows["k"].astype(int).isin(ks)]
    if sub.empty or not metrics:
        return None
    columns = ["Network"] + (["k"] if with_k else []) + ["Partitioning"]
    for m in metrics:
        head, arrow = metric_head(m)
        columns += [f"{head}: p Value", f"{head}: Effect Meas. ({arrow})"]
    look, names = _lookup(sub), network_names(rows)
    table = Table(name, title, "", columns)
    for g in list(dict.fromkeys(sub["group"])):
        for k in ks:
            parts = _ordered(sub[(sub["group"] == g) & (sub["k"].astype(int) == k)]["partitioning"], METHODS)
            for part in parts:
                cells = [Cell(names[g])] + ([Cell(str(k))] if with_k else []) + [Cell(PARTITION_LABELS.get(part, part))]
                for m in metrics:
                    r = look.get((g, k, part, m))
                    cells += [_p_cell(r), _effect_cell(r)]
                table.rows.append(cells)
    k_text = f"k = {', '.join(map(str, ks))}."
    what = ("Lesion experiments: importance (accuracy drop) and coherence (class-wise range of drops)."
            if family == "lesion" else "Feature-visualization experiments: coherence (visualization score, softmax entropy).")
    table.caption = _caption(what, info, [family], k_text)
    return table


def effect_table(rows: pd.DataFrame, info: dict) -> Table | None:
    """Table 1: effect measures ± SE of every metric, one row per network and partitioning."""
    k = main_k(rows)
    sub = rows[rows["k"].astype(int) == k]
    metrics = [m for m in METRICS if m in set(sub["metric"])]
    if sub.empty:
        return None
    columns = ["Network", "Partitioning"] + [f"{METRICS[m].label} ({metric_head(m)[1]})" for m in metrics]
    look, names = _lookup(sub), network_names(rows)
    table = Table("table1", "Table 1: effect measures", "", columns)
    for g in list(dict.fromkeys(sub["group"])):
        for part in _ordered(sub[sub["group"] == g]["partitioning"], METHODS):
            table.rows.append([Cell(names[g]), Cell(PARTITION_LABELS.get(part, part))]
                              + [_effect_cell(look.get((g, k, part, m))) for m in metrics])
    table.caption = (f"Effect measures (mean of 2x/(x+μ) over subclusters ± standard error), k = {k}. Above 1 is modular "
                     "except for softmax entropy (below 1). Bold: more than two standard errors from 1 on the modular side.")
    return table


def build_tables(rows: pd.DataFrame, info: dict) -> list[Table]:
    k = main_k(rows)
    ks = sorted({int(v) for v in rows["k"]})
    tables = [effect_table(rows, info),
              _p_effect_table(rows, info, "lesion", "table4", "Table 4: lesion experiments", [k], False),
              _p_effect_table(rows, info, "vis", "table5", "Table 5: feature-visualization experiments", [k], False)]
    if len(ks) > 1:
        tables += [_p_effect_table(rows, info, "lesion", "table2", "Table 2: lesion experiments for every k", ks, True),
                   _p_effect_table(rows, info, "vis", "table3", "Table 3: feature-visualization experiments for every k",
                                   ks, True)]
    return [t for t in tables if t is not None]


def comparison_table(comparison: pd.DataFrame) -> Table | None:
    """Measured beside reported, cell by cell, with the agreement marks."""
    if comparison is None or comparison.empty:
        return None
    columns = ["Network", "k", "Partitioning", "Metric", "p (measured)", "p (paper)", "Effect (measured)",
               "Effect (paper)", "Same significance", "Same side of 1", "Agree"]
    caption = ("Bold p: significant (measured: Benjamini-Hochberg within the table family; paper: its own marking, "
               "p ≤ 0.025). A cell agrees when both the significance decision and the side of 1 of the effect match.")
    table = Table("paper_comparison", "Measured beside the paper's reported values", caption, columns)
    for r in comparison.itertuples(index=False):
        mp, mph = format_p(r.p_value)
        pp, pph = format_p(r.paper_p)
        table.rows.append([
            Cell(str(r.network_label)), Cell(str(int(r.k))), Cell(PARTITION_LABELS.get(r.partitioning, r.partitioning)),
            Cell(METRICS[r.metric].label), Cell(mp, bool(r.significant), mph), Cell(pp, bool(r.paper_significant), pph),
            Cell(format_effect(r.effect, r.effect_se), bool(r.bold)), Cell(format_effect(r.paper_effect, r.paper_se)),
            Cell("yes" if r.agree_significance else "NO"), Cell("yes" if r.agree_side else "NO"),
            Cell("✓" if r.agree else "✗")])
    return table


def write_tables(tables: list[Table], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tables:
        for suffix, text in ((".csv", t.to_csv()), (".md", t.to_markdown())):
            path = directory / f"{t.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    return paths


__all__ = ["Cell", "Table", "PARTITION_LABELS", "format_p", "format_effect", "main_k", "network_names", "effect_table", "build_tables",
           "comparison_table", "write_tables"]
