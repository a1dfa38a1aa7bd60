"""Say when a metric cannot carry information, and the clusterability rows of the summary.

:func:`add_diagnostics` adds, per summary row, the counts behind three flags (column
``degenerate``, empty when the row is fine):

* ``saturated`` (softmax entropy): at least :data:`SATURATED_FRACTION` of the visualization
  images (true and random) have a softmax entropy below :data:`SATURATED_ENTROPY` nats; the
  effect 2x/(x+mu) of such near-zero values is noise (columns ``n_saturated``, ``n_images``).
* ``no-change`` (lesion metrics): at least :data:`UNCHANGED_FRACTION` of the lesions (true
  and random) change no class's accuracy (columns ``n_unchanged``, ``n_lesions``).
* ``ties``: at least :data:`TIED_FRACTION` of the (true subcluster, random set) pairs have
  equal values, so the percentiles sit on a few grid points (``n_tied_pairs``, ``n_pairs``).

The thresholds and the measurements behind them are in ``docs/fidelity.md``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from modlens.core import stats
from modlens.analysis.statistics import FAMILIES, METRICS, VIS_METRICS

SATURATED_ENTROPY = 1e-6
SATURATED_FRACTION = 0.25
UNCHANGED_FRACTION = 0.5
TIED_FRACTION = 0.25


def add_diagnostics(summary: pd.DataFrame, lesions: pd.DataFrame | None, vis: pd.DataFrame | None,
                    tests: pd.DataFrame) -> pd.DataFrame:
    """Add the diagnostic counts and the ``degenerate`` flag column to ``summary`` (in place)."""
    cols = {c: np.zeros(len(summary), dtype=np.int64) for c in
            ("n_saturated", "n_images", "n_unchanged", "n_lesions", "n_tied_pairs", "n_pairs")}
    flags = []
    for i, row in enumerate(summary.itertuples(index=False)):
        found = []
        part, metric = row.partitioning, row.metric
        t = tests[(tests["partitioning"] == part) & (tests["metric"] == metric)]
        if "n_ties" in t.columns and len(t):
            cols["n_tied_pairs"][i] = int(t["n_ties"].sum())
            cols["n_pairs"][i] = int(t["n_random"].sum())
            if cols["n_tied_pairs"][i] >= TIED_FRACTION * cols["n_pairs"][i]:
                found.append("ties")
        if metric == "softmax_entropy" and vis is not None and len(vis):
            h = vis.loc[vis["partitioning"] == part, "softmax_entropy"].to_numpy(dtype=float)
            cols["n_saturated"][i], cols["n_images"][i] = int(np.sum(h < SATURATED_ENTROPY)), h.size
            if h.size and cols["n_saturated"][i] >= SATURATED_FRACTION * h.size:
                found.append("saturated")
        if FAMILIES.get(metric) == "lesion" and lesions is not None and len(lesions):
            g = lesions[lesions["partitioning"] == part]
            if "ce_increase" in g.columns:  # next-token lesions: the loss moves unless nothing changed
                unchanged = g["ce_increase"].to_numpy(dtype=float) == 0
            else:
                unchanged = (g["acc_drop"].to_numpy(dtype=float) == 0) & (g["class_range"].to_numpy(dtype=float) == 0)
            cols["n_unchanged"][i], cols["n_lesions"][i] = int(unchanged.sum()), len(g)
            if len(g) and cols["n_unchanged"][i] >= UNCHANGED_FRACTION * len(g):
                found.append("no-change")
        flags.append(",".join(found))
    for c, v in cols.items():
        summary[c] = v
    summary["degenerate"] = flags
    return summary


def clusterability_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Summary rows of the clusterability test: one per weight partitioning. With several
    networks the p value is Fisher-Bates over the networks' Monte Carlo p values (each is a
    valid, slightly conservative p value); n-cut, null mean/sd and z are means over networks."""
    spec = METRICS["clusterability"]
    rows = []
    for part, g in table.groupby("partitioning", sort=False):
        net_p = g.sort_values("network")["p_value"].to_numpy(dtype=float)
        rows.append({
            "partitioning": part, "metric": "clusterability", "family": FAMILIES["clusterability"],
            "proxy": spec.proxy, "modular_when": "low", "n_networks": len(net_p), "n_subclusters": 0,
            "p_value": stats.fisher_bates(net_p), "network_p_values": ",".join(f"{v:.6g}" for v in net_p),
            "effect": np.nan, "effect_se": np.nan, "mean_percentile": np.nan,
            "clusterability_ncut": float(g["ncut"].mean()), "null_ncut_mean": float(g["null_mean"].mean()),
            "null_ncut_sd": float(g["null_sd"].mean()), "z": float(g["z"].mean()), "n_null": int(g["n_null"].min()),
        })
    return pd.DataFrame(rows)


__all__ = ["add_diagnostics", "clusterability_rows", "SATURATED_ENTROPY", "SATURATED_FRACTION",
           "UNCHANGED_FRACTION", "TIED_FRACTION", "VIS_METRICS"]
