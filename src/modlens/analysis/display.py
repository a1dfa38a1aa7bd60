"""How results show themselves: the cells of the paper's tables (p values with their significance,
effects in bold when they lie two standard errors from 1 on the modular side) and the notebook
display of an :class:`~modlens.analysis.AnalysisResult` (``_repr_html_``).

The HTML pieces are :mod:`modlens.core.html`'s, the report's own; the report's Tables 1-5
(:mod:`modlens.report.tables`) are made of the cells defined here, so a notebook and the report
mark significance and effects alike.
"""

from __future__ import annotations

import io
import math

import pandas as pd

from modlens.analysis.statistics import METRICS, bold_effect
from modlens.analysis.text import PARTITION_LABELS, degenerate_notes, empty_notes
from modlens.core.html import Cell, Table, figure_html, fragment, kv_html, notes_html, table_html


def format_p(p: float) -> tuple[str, str]:
    """(plain, html) in the paper's style: three decimals from 0.001 up, else m × 10^e."""
    if p is None or not math.isfinite(float(p)):
        return "n/a", "n/a"
    p = float(p)
    if p >= 0.001:
        s = f"{p:.3f}"
        return s, s
    if p == 0:
        return "< 1e-300", "&lt; 10<sup>-300</sup>"
    exp = math.floor(math.log10(p))
    mant = p / 10 ** exp
    if round(mant, 2) >= 10:
        mant, exp = mant / 10, exp + 1
    return f"{mant:.2f} × 10^{exp}", f"{mant:.2f} × 10<sup>{exp}</sup>"


def format_effect(effect: float, se: float | None) -> str:
    if effect is None or not math.isfinite(float(effect)):
        return "n/a"
    if se is None or not math.isfinite(float(se)):
        return f"{float(effect):.3f}"
    return f"{float(effect):.3f} ± {float(se):.3f}"


def p_cell(p: float, significant: bool) -> Cell:
    """A p value, bold when significant after Benjamini-Hochberg."""
    text, markup = format_p(p)
    return Cell(text, bool(significant), markup)


def effect_cell(effect: float, se: float | None, bold: bool, flag: str = "") -> Cell:
    """An effect ± SE, bold when two standard errors from 1 on the modular side; ``flag`` (a
    degenerate metric's flags) adds a ``!`` and shades the cell."""
    text = format_effect(effect, se)
    return Cell(text + (" !" if flag else ""), bool(bold), None, bool(flag))


def summary_table(summary: pd.DataFrame, title: str = "Summary", alpha: float = 0.05) -> Table:
    """A result's summary as one row per partitioning: its n-cut and number of subclusters, then per
    metric the p value (bold: significant after Benjamini-Hochberg) and the effect (bold: two
    standard errors from 1 on the modular side; ``!``: a degenerate metric); the clusterability
    test as its n-cut beside the shuffled networks'."""
    metrics = list(dict.fromkeys(summary["metric"]))
    columns = ["Partitioning", "n-cut", "Subclusters"]
    for m in metrics:
        spec = METRICS.get(m)
        label = spec.label if spec else m
        arrow = "" if spec is None else (" (high = modular)" if spec.higher_is_modular else " (low = modular)")
        columns += [f"{label}: p value", "n-cut vs shuffled" if m == "clusterability" else f"{label}: effect{arrow}"]
    table = Table("summary", title, "", columns)
    for part, sub in summary.groupby("partitioning", sort=False):
        first = sub.iloc[0]
        ncut = first.get("ncut")
        row = [Cell(PARTITION_LABELS.get(part, part)),
               Cell("n/a" if ncut is None or not math.isfinite(float(ncut)) else f"{float(ncut):.3f}"),
               Cell(str(int(sub["n_subclusters"].max())))]
        for m in metrics:
            hit = sub[sub["metric"] == m]
            if hit.empty:
                row += [Cell(""), Cell("")]
                continue
            r = hit.iloc[0]
            flag = str(r.get("degenerate", "") or "")
            flag = "" if flag == "nan" else flag
            row.append(p_cell(r["p_value"], r.get("significant", False)))
            if m == "clusterability":
                row.append(Cell(f"{float(r['clusterability_ncut']):.3f} vs {float(r['null_ncut_mean']):.3f} "
                                f"(z {float(r['z']):.1f})"))
            else:
                row.append(effect_cell(r["effect"], r["effect_se"], bold_effect(r["effect"], r["effect_se"], m), flag))
        table.rows.append(row)
    n_net = int(summary["n_networks"].max()) if len(summary) else 0
    table.caption = (("Fisher p per network" if n_net <= 1 else f"Fisher-Bates p over {n_net} networks")
                     + f"; bold p: significant after Benjamini-Hochberg at α = {alpha:g}; bold effect: "
                     "more than two standard errors from 1 on the modular side; ! and shading: a degenerate metric "
                     "(see the notes).")
    return table


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def result_figures(result) -> list[tuple[bytes, str]]:
    """The figures of a result as PNG bytes with captions: the percentile histograms of its true
    subclusters (Figure 5 of the report), and the feature-visualization grids when there are any."""
    from modlens.analysis.figures import percentile_figure, vis_grid_figures

    out = []
    if result.tests is not None and len(result.tests):
        fig = percentile_figure(result.tests, "")
        out.append((png_bytes(fig), "Percentiles of the true subclusters among their random sets, one histogram per "
                                    "metric (low = modular; uniform under no modularity)."))
    for res in result.vis_results:
        for (name, layer), fig in vis_grid_figures(res):
            out.append((png_bytes(fig), f"Feature visualization, {name}, layer {layer}: each true subcluster "
                                        "(first column) beside its random sets."))
    return out


def result_html(result, title: str = "modlens analysis") -> str:
    """The notebook display of an :class:`~modlens.analysis.AnalysisResult`."""
    cfg = result.config or {}
    facts = {k: cfg[k] for k in ("task", "n_test", "n_test_positions", "test_accuracy", "test_cross_entropy", "n_clusters",
                                 "n_random", "combine", "capture", "config_key") if cfg.get(k) is not None}
    if isinstance(cfg.get("networks"), list):
        facts["networks"] = ", ".join(map(str, cfg["networks"]))
    notes = degenerate_notes(result.summary) + empty_notes(result.summary)
    skipped = (cfg.get("feature_vis") or {}).get("skipped") if isinstance(cfg.get("feature_vis"), dict) else None
    if skipped:
        notes.append(f"Feature visualization skipped: {skipped}")
    figures = "".join(figure_html(png, caption, caption.split(":")[0]) for png, caption in result_figures(result))
    table = summary_table(result.summary, alpha=float(cfg.get("alpha", 0.05)))
    return fragment(title, table_html(table, heading=False) + notes_html(notes)
                    + kv_html(facts) + figures)


__all__ = ["format_p", "format_effect", "p_cell", "effect_cell", "summary_table", "png_bytes", "result_figures",
           "result_html"]
