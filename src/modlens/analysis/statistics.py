"""From the tidy lesion table to the paper's verdicts (section 3.2, figure 4, appendix A.7).

1. :func:`subcluster_tests`: for every true subcluster and metric, its centred percentile
   among its random controls and its effect value 2x/(x+mu).
2. :func:`summarize`: per partitioning and metric, Fisher's method over each network's
   percentiles, Bates over replicate networks (one network: its Fisher p), the mean effect
   with its standard error over all subclusters of all replicates, and Benjamini-Hochberg
   within each family of rows: the lesion metrics (the paper's Table 4), the visualization
   metrics (Table 5) and the graphical clusterability test are corrected separately
   (appendix A.7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from modlens.core import permutation, stats


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    higher_is_modular: bool
    proxy: str


METRICS: dict[str, Metric] = {
    "acc_drop": Metric("acc_drop", "Acc. drop", True, "importance"),
    "ce_increase": Metric("ce_increase", "CE increase", True, "importance"),
    "class_range": Metric("class_range", "Class range", True, "coherence"),
    "label_range": Metric("label_range", "Label range", True, "coherence"),
    "vis_score": Metric("vis_score", "Vis score", True, "coherence"),
    "softmax_entropy": Metric("softmax_entropy", "Softmax H", False, "coherence"),
    "top_concentration": Metric("top_concentration", "Top-position KL", True, "coherence"),
    "clusterability": Metric("clusterability", "n-cut vs shuffled", False, "clusterability"),
}
#: Benjamini-Hochberg families, the one definition of which metric belongs to which: the paper
#: corrects Table 4 (lesions) and Table 5 (visualizations) separately; the clusterability test is
#: a third family. The next-token task's metrics (docs/language-models.md, sections 4-5): the
#: cross-entropy increase and the range over position labels are lesion metrics; the
#: top-activating-positions test replaces feature visualization for token inputs, so it is
#: corrected with the visualization metrics (Table 5).
FAMILIES = {"acc_drop": "lesion", "ce_increase": "lesion", "class_range": "lesion", "label_range": "lesion",
            "vis_score": "visualization", "softmax_entropy": "visualization", "top_concentration": "visualization",
            "clusterability": "clusterability"}
#: Which metrics an analysis of each task has (``task`` of ``analyze``), by family, in table order.
TASK_METRICS = {
    "classification": {"lesion": ("acc_drop", "class_range"), "visualization": ("vis_score", "softmax_entropy")},
    "next-token": {"lesion": ("acc_drop", "ce_increase", "class_range", "label_range"),
                   "visualization": ("top_concentration",)},
}
assert all(FAMILIES[m] == f for task in TASK_METRICS.values() for f, ms in task.items() for m in ms)
#: The paper's (classification) lesion and visualization metrics.
LESION_METRICS = TASK_METRICS["classification"]["lesion"]
VIS_METRICS = TASK_METRICS["classification"]["visualization"]
#: The paper's tables (Table 4: lesion, Table 5: visualization) by family; a study's rows name
#: them in their ``table_family`` column by these short names (the study-rows file format).
TABLE_FAMILIES = {"lesion": "lesion", "visualization": "vis"}


def table_family(metric: str) -> str:
    """The ``table_family`` of a metric's study rows: ``"lesion"`` or ``"vis"``."""
    family = FAMILIES.get(metric)
    if family not in TABLE_FAMILIES:
        raise ValueError(f"metric {metric!r} belongs to no table family; known: "
                         f"{', '.join(m for m, f in FAMILIES.items() if f in TABLE_FAMILIES)}")
    return TABLE_FAMILIES[family]


TIE_RULES = stats.TIE_RULES  # owned by core.stats.percentiles
EFFECT_RULES = ("paper", "original")
COMBINE_RULES = ("fisher", "exact")  # per-network combination: the paper's, or the exact permutation null

_KEYS = ["network", "partitioning", "layer", "layer_name", "cluster", "size"]


def subcluster_tests(
    table: pd.DataFrame,
    *,
    metrics: Sequence[str] = LESION_METRICS,
    ties: str = "mid",
    effect_rule: str = "paper",
) -> pd.DataFrame:
    """One row per (true subcluster, metric): its value, the mean of its random controls,
    its centred percentile (low = modular) and its effect value.

    ``ties="original"`` and ``effect_rule="original"`` reproduce the original code's tie
    rule and effect rules (rows 11 and 14 of the notes): for lesion metrics an effect is 0
    unless the true and mean random drops are both positive; for visualization metrics the
    effect pools 2x/(x+r_j) over every random draw j (column ``effect_pairs``), and
    :func:`summarize` takes the mean and standard error over those pooled values.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if effect_rule not in EFFECT_RULES:
        raise ValueError(f"effect_rule must be one of {EFFECT_RULES}, got {effect_rule!r}")
    if "network" not in table.columns:
        table = table.assign(network="0")
    rows = []
    for key, group in table.groupby(_KEYS, sort=False):
        true = group[group["kind"] == "true"]
        rand = group[group["kind"] == "random"]
        if len(true) != 1 or rand.empty:
            raise ValueError(f"subcluster {dict(zip(_KEYS, key))} needs one true row and at least one random row")
        for metric in metrics:
            spec = METRICS[metric]
            x = float(true[metric].iloc[0])
            r = rand[metric].to_numpy(dtype=float)
            mu = float(r.mean())
            pct = float(stats.percentiles([x], r[None, :], higher_is_modular=spec.higher_is_modular, ties=ties)[0])
            # the percentiles it could have had under H0 (combine="exact"); None if a value is NaN
            null = (permutation.null_percentiles(np.r_[x, r], higher_is_modular=spec.higher_is_modular, ties=ties).tolist()
                    if np.all(np.isfinite(r)) and np.isfinite(x) else None)
            pairs = None
            if not (np.isfinite(x) and np.isfinite(mu)):
                eff = np.nan
            elif effect_rule == "original" and FAMILIES.get(metric) == "visualization":
                pairs = stats.pairwise_effect_values([x], r[None, :])[0]
                eff = float(pairs.mean())
            else:
                rule = "original_lesion" if effect_rule == "original" else "paper"
                eff = float(stats.effect_values([x], [mu], rule=rule)[0])
            n_ties = int(np.sum(r == x))
            rows.append((*key, metric, x, mu, pct, eff, n_ties, int(r.size), None if pairs is None else pairs.tolist(), null))
    out = pd.DataFrame(rows, columns=_KEYS + ["metric", "value", "random_mean", "percentile", "effect", "n_ties",
                                              "n_random", "effect_pairs", "null_percentiles"])
    if out["effect_pairs"].isna().all():
        out = out.drop(columns="effect_pairs")
    return out


def summarize(
    tests: pd.DataFrame,
    *,
    partitionings: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    alpha: float = 0.05,
    combine: str = "fisher",
    random_state=0,
) -> pd.DataFrame:
    """The summary table: one row per (partitioning, metric).

    ``p_value`` is the Fisher p of one network, or the Fisher-Bates p over several
    (``network_p_values`` lists each network's Fisher p). ``q_value`` and ``significant``
    come from Benjamini-Hochberg at ``alpha`` within each ``family`` of rows
    (:data:`FAMILIES`: lesion metrics, visualization metrics), as the paper corrects its
    Tables 4 and 5 separately.
    ``combine="exact"`` (modlens extension) refers the same Fisher statistic to its exact
    conditional permutation null and the mean of the networks' p values to its exact null
    (:mod:`modlens.core.permutation`; needs the ``null_percentiles`` column);
    ``random_state`` seeds its Monte Carlo fallback. Column ``combine`` records the choice.
    """
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    if combine == "exact" and "null_percentiles" not in tests.columns:
        raise ValueError("summarize(combine='exact') needs the null_percentiles column of subcluster_tests; "
                         "recompute the tests with this version of modlens")
    if partitionings is None:
        partitionings = list(dict.fromkeys(tests["partitioning"]))
    if metrics is None:  # those present, in the canonical order
        present = set(tests["metric"])
        metrics = [m for m in METRICS if m in present] or list(LESION_METRICS)
    rows = []
    for part in partitionings:
        for metric in metrics:
            g = tests[(tests["partitioning"] == part) & (tests["metric"] == metric)]
            spec = METRICS[metric]
            if combine == "exact" and len(g):
                net_p, p = permutation.combine_networks(
                    [(gn["null_percentiles"].tolist(), gn["percentile"].to_numpy()) for _, gn in g.groupby("network", sort=True)],
                    random_state=random_state)
            else:
                net_p = [stats.fisher(gn["percentile"].to_numpy())[1] for _, gn in g.groupby("network", sort=True)]
                p = stats.fisher_bates(net_p) if net_p else np.nan
            if "effect_pairs" in g.columns and g["effect_pairs"].notna().any():
                eff = np.concatenate([np.asarray(v, dtype=float) for v in g["effect_pairs"].dropna()])
            else:
                eff = g["effect"].to_numpy(dtype=float)
            mean, se = stats.effect_measure(eff[np.isfinite(eff)]) if len(eff) else (np.nan, np.nan)
            rows.append({
                "partitioning": part,
                "metric": metric,
                "proxy": spec.proxy,
                "modular_when": "high" if spec.higher_is_modular else "low",
                "n_networks": len(net_p),
                "n_subclusters": int(len(g)),
                "p_value": p,
                "combine": combine,
                "network_p_values": ",".join(f"{v:.6g}" for v in net_p),
                "effect": mean,
                "effect_se": se,
                "mean_percentile": float(g["percentile"].mean()) if len(g) else np.nan,
            })
    summary = pd.DataFrame(rows)
    summary.insert(2, "family", [FAMILIES.get(m, m) for m in summary["metric"]])
    return correct_by_family(summary, alpha=alpha)


def correct_by_family(summary: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Benjamini-Hochberg q values and decisions at ``alpha`` within each ``family``."""
    q = np.full(len(summary), np.nan)
    reject = np.zeros(len(summary), dtype=bool)
    families = summary["family"].to_numpy() if "family" in summary.columns else np.full(len(summary), "all")
    for fam in dict.fromkeys(families):
        idx = np.flatnonzero(families == fam)
        q[idx], reject[idx], _ = stats.benjamini_hochberg(summary["p_value"].to_numpy(dtype=float)[idx], alpha=alpha)
    summary["q_value"] = q
    summary["significant"] = reject
    return summary


def bold_effect(effect: float, se: float, metric: str) -> bool:
    """More than two standard errors from 1 in the modular direction (strictly). Without a
    standard error (the paper's Tables 2 and 3), any effect on the modular side of 1."""
    if effect is None or not math.isfinite(float(effect)):
        return False
    high = METRICS[metric].higher_is_modular
    se = float(se) if se is not None and math.isfinite(float(se)) else 0.0
    return bool(effect - 2 * se > 1) if high else bool(effect + 2 * se < 1)
