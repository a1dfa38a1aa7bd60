"""Plain-text rendering of the summary table, laid out like the paper's Table 4."""

from __future__ import annotations

import math

import pandas as pd

from modlens.analysis.statistics import METRICS

#: The paper's names of the four partitionings (its tables' rows).
PARTITION_LABELS = {"weights/global": "Weight/Global", "weights/local": "Weight/Local",
                    "activations/global": "Act./Global", "activations/local": "Act./Local"}


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
        head2 += ["p value", "n-cut vs shuffled" if m == "clusterability" else f"effect ± SE ({arrow})"]
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
            flag = " !" if str(r.get("degenerate", "") or "") not in ("", "nan") else ""
            if m == "clusterability":
                cell = f"n-cut {float(r['clusterability_ncut']):.3f} vs {float(r['null_ncut_mean']):.3f}, z {float(r['z']):.1f}"
            else:
                cell = format_effect(float(r["effect"]), float(r["effect_se"]))
            row += [format_p(float(r["p_value"])) + star, cell + flag]
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
    if "family" in summary.columns and summary["family"].nunique() > 1:
        lines.append("Benjamini-Hochberg corrects each family separately: " + ", ".join(dict.fromkeys(summary["family"])) + ".")
    lines += degenerate_notes(summary)
    lines += empty_notes(summary)
    if "ncut" in summary.columns:
        facts = summary.drop_duplicates("partitioning")
        parts = [f"{r.partitioning} {r.ncut:.3f}" + (f" ({r.n_unclustered} unclustered)" if r.n_unclustered else "")
                 for r in facts.itertuples() if r.ncut is not None and math.isfinite(r.ncut)]
        if parts:
            lines.append("n-cut of the hidden-neuron partition: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def empty_notes(summary: pd.DataFrame) -> list[str]:
    """One line per partitioning with no subcluster to test (its p values are n/a): why, and what to try."""
    out = []
    for part, sub in summary.groupby("partitioning", sort=False):
        if "n_subclusters" not in sub.columns or sub["n_subclusters"].fillna(0).max() > 0:
            continue
        reasons = [str(v) for v in sub.get("no_subclusters", pd.Series(dtype=str)) if isinstance(v, str) and v]
        why = reasons[0] if reasons else "no subcluster qualifies (a subcluster is a cluster's part of one layer " \
                                         "with at least two neurons that is not the whole layer)"
        out.append(f"{part}: p values n/a, {why}.")
    return out


def degenerate_notes(summary: pd.DataFrame) -> list[str]:
    """One line per flagged row (``!`` in the table): which flag, and the count behind it."""
    if "degenerate" not in summary.columns:
        return []
    out = []
    for r in summary.itertuples(index=False):
        flags = str(r.degenerate or "")
        if not flags or flags == "nan":
            continue
        label = METRICS[r.metric].label if r.metric in METRICS else r.metric
        why = []
        for f in flags.split(","):
            if f == "saturated":
                why.append(f"saturated: {r.n_saturated}/{r.n_images} images have softmax entropy < 1e-6")
            elif f == "no-change":
                why.append(f"no-change: {r.n_unchanged}/{r.n_lesions} lesions change no class's accuracy")
            elif f == "ties":
                why.append(f"ties: {r.n_tied_pairs}/{r.n_pairs} true-random pairs are tied")
        out.append(f"! {r.partitioning} {label}: " + "; ".join(why) + " (the metric carries little information).")
    return out
