"""Plain-text rendering of the summary table, laid out like the paper's Table 4."""

from __future__ import annotations

import math

import pandas as pd

from modlens.study.summary import METRICS


def format_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    if p == 0:
        return "<1e-300"
    if p < 1e-3:
        return f"{p:.2e}"
    return f"{p:.3f}"


def format_effect(effect: float, se: float) -> str:
    if effect is None or not math.isfinite(effect):
        return "n/a"
    return f"{effect:.3f} ± {se:.3f}" if math.isfinite(se) else f"{effect:.3f}"


def format_summary(summary: pd.DataFrame) -> str:
    """One line per partitioning; for each metric its p value (``*`` when significant after
    Benjamini-Hochberg) and its effect measure ± standard error."""
    metrics = list(dict.fromkeys(summary["metric"]))
    parts = list(dict.fromkeys(summary["partitioning"]))
    head1 = ["", ""]
    head2 = ["partitioning", "n"]
    for m in metrics:
        spec = METRICS.get(m)
        label = spec.label if spec else m
        arrow = ("high" if spec.higher_is_modular else "low") + "=modular" if spec else ""
        head1 += [f"{label} ({spec.proxy if spec else ''})", ""]
        head2 += ["p value", f"effect ± SE ({arrow})"]
    rows = []
    for part in parts:
        sub = summary[summary["partitioning"] == part]
        n = int(sub["n_subclusters"].max()) if len(sub) else 0
        row = [part, str(n)]
        for m in metrics:
            r = sub[sub["metric"] == m]
            if r.empty:
                row += ["", ""]
                continue
            r = r.iloc[0]
            star = " *" if bool(r["significant"]) else "  "
            row += [format_p(float(r["p_value"])) + star, format_effect(float(r["effect"]), float(r["effect_se"]))]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head2, *rows)]
    for j in range(2, len(head1), 2):  # a metric label spans its two columns
        extra = len(head1[j]) - (widths[j] + 2 + widths[j + 1])
        if extra > 0:
            widths[j + 1] += extra
    # a metric's label may span its two columns
    lines = []
    for i, line in enumerate([head1, head2] + rows):
        cells = [str(c).ljust(w) for c, w in zip(line, widths)]
        if i == 0:
            cells = []
            j = 0
            while j < len(line):
                if j >= 2 and (j - 2) % 2 == 0:
                    span = widths[j] + 2 + widths[j + 1]
                    cells.append(str(line[j]).ljust(span))
                    j += 2
                else:
                    cells.append(str(line[j]).ljust(widths[j]))
                    j += 1
        lines.append("  ".join(cells).rstrip())
    lines.insert(2, "-" * max(len(l) for l in lines))
    n_net = int(summary["n_networks"].max()) if len(summary) else 0
    what = "Fisher p per network" if n_net <= 1 else f"Fisher-Bates p over {n_net} networks"
    if "combine" in summary.columns and (summary["combine"] == "exact").any():
        what = ("exact permutation p of Fisher's statistic (combine=exact)" if n_net <= 1 else
                f"exact permutation p of Fisher's statistic, exact null of the mean over {n_net} networks (combine=exact)")
    lines.append("")
    lines.append(f"p: {what} (low = true subclusters more often modular than random ones); "
                 "* = significant after Benjamini-Hochberg at the table's alpha.")
    lines.append("effect: mean of 2x/(x+mu) over subclusters; >1 means true subclusters exceed random ones on average.")
    if "ncut" in summary.columns:
        facts = summary.drop_duplicates("partitioning")
        parts = [f"{r.partitioning} {r.ncut:.3f}" + (f" ({r.n_unclustered} unclustered)" if r.n_unclustered else "")
                 for r in facts.itertuples() if r.ncut is not None and math.isfinite(r.ncut)]
        if parts:
            lines.append("n-cut of the hidden-neuron partition: " + "; ".join(parts) + ".")
    return "\n".join(lines)
