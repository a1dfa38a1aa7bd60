"""The paper's study figures: Figure 3 (grids of log10 Fisher-Bates p values), Figure 5
(percentile histograms) and Figure 7 (true beside random visualizations). Each is written as
PNG and SVG with matplotlib's Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from modlens.experiments.partitioning import METHODS
from modlens.analysis.figures import displayable, new_figure, percentile_figure, slug
from modlens.analysis.statistics import METRICS
from modlens.analysis.text import PARTITION_LABELS

_SHADE = "#9ecae1"


@dataclass
class FigureFile:
    png: Path
    svg: Path
    caption: str


def _save(fig, directory: Path, stem: str, caption: str) -> FigureFile:
    directory.mkdir(parents=True, exist_ok=True)
    png, svg = directory / f"{stem}.png", directory / f"{stem}.svg"
    fig.savefig(png, dpi=110)
    fig.savefig(svg, metadata={"Date": None})  # no timestamp: same study, same file
    return FigureFile(png, svg, caption)


def _ordered(values, order) -> list:
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def figure3(rows: pd.DataFrame, names: dict[str, str], k: int, critical: dict[str, float], directory: Path) -> FigureFile | None:
    """One panel per network group: rows partitionings, columns metrics; a significant cell is
    shaded and shows log10 p rounded to the nearest integer, others read "n.s."."""
    sub = rows[rows["k"].astype(int) == k]
    if sub.empty:
        return None
    groups = list(dict.fromkeys(sub["group"]))
    metrics = [m for m in METRICS if m in set(sub["metric"])]
    n_cols = min(3, len(groups))
    n_rows = math.ceil(len(groups) / n_cols)
    cell_w, cell_h = 0.95, 0.42
    n_parts = max(len(set(sub[sub["group"] == g]["partitioning"])) for g in groups)
    pw, ph = 1.3 + cell_w * len(metrics), 0.9 + cell_h * n_parts
    fig = new_figure(pw * n_cols + 0.3, ph * n_rows + 0.3)
    for i, g in enumerate(groups):
        gs = sub[sub["group"] == g]
        parts = _ordered(gs["partitioning"], METHODS)
        ax = fig.add_axes([(i % n_cols) * pw / (pw * n_cols + 0.3) + 1.25 / (pw * n_cols + 0.3),
                           1 - ((i // n_cols) + 1) * ph / (ph * n_rows + 0.3) + 0.15 / (ph * n_rows + 0.3),
                           cell_w * len(metrics) / (pw * n_cols + 0.3), cell_h * len(parts) / (ph * n_rows + 0.3)])
        ax.set_xlim(0, len(metrics))
        ax.set_ylim(len(parts), 0)
        for r, part in enumerate(parts):
            for c, m in enumerate(metrics):
                hit = gs[(gs["partitioning"] == part) & (gs["metric"] == m)]
                if hit.empty:
                    continue
                row = hit.iloc[0]
                p = float(row["p_value"])
                sig = bool(row["significant"])
                if sig:
                    ax.add_patch(_rect(c, r, _SHADE))
                text = "n/a" if not math.isfinite(p) else ("n.s." if not sig else
                                                            (f"{round(math.log10(p)):d}" if p > 0 else "<-300"))
                ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(np.arange(len(metrics)) + 0.5, [METRICS[m].label for m in metrics], fontsize=7)
        ax.set_yticks(np.arange(len(parts)) + 0.5, [PARTITION_LABELS.get(p, p) for p in parts], fontsize=7)
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        for x in range(1, len(metrics)):
            ax.axvline(x, color="0.8", lw=0.5)
        for y in range(1, len(parts)):
            ax.axhline(y, color="0.8", lw=0.5)
        ax.set_title(f"({chr(97 + i)}) {names.get(g, g)}", fontsize=8, pad=16)
    crit = ", ".join(f"{fam} {v:.3g}" for fam, v in critical.items() if v > 0) or "none significant"
    caption = (f"Figure 3: Fisher-Bates p values on a log10 scale rounded to the nearest integer (k = {k}). Shaded: "
               f"significant at α = 0.05 after Benjamini-Hochberg within each table family (critical p: {crit}); "
               "otherwise n.s.")
    return _save(fig, directory, "figure3", caption)


def _rect(x, y, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=color, edgecolor="none")


def figure5(tests: dict[str, pd.DataFrame], names: dict[str, str], directory: Path) -> list[FigureFile]:
    """Per group: one panel per partitioning with a step histogram per metric of the true
    subclusters' centred percentiles among their random sets (low = modular), pooled over the
    group's networks (:func:`modlens.analysis.figures.percentile_figure`)."""
    out = []
    for g, frame in tests.items():
        if frame is None or frame.empty:
            continue
        fig = percentile_figure(frame, names.get(g, g))
        caption = (f"Figure 5 ({names.get(g, g)}): percentiles of true subclusters among their random sets, one "
                   f"histogram per metric, pooled over {frame['network'].nunique()} network(s); under no modularity "
                   "they are uniform, and a pile-up near 0 is what makes a Fisher-Bates p value small.")
        out.append(_save(fig, directory, f"figure5_{slug(g)}", caption))
    return out


def figure7(vis: dict[str, tuple[pd.DataFrame, dict[str, np.ndarray], tuple[float, float]]], names: dict[str, str],
            directory: Path, n_random: int = 3) -> list[FigureFile]:
    """Per group (its first network with saved images): for each partitioning, the largest
    true subcluster of the first layer beside ``n_random`` of its random sets."""
    out = []
    for g, (table, images, (lo, hi)) in vis.items():
        if "network" in table.columns and table["network"].nunique() > 1:
            # a combined result keeps the images of its first network only
            table = table[table["network"] == table["network"].iloc[0]]
        picks = []
        for part in _ordered(table["partitioning"], METHODS):
            key = part.replace("/", "__")
            if key not in images:
                continue
            t = table[table["partitioning"] == part].reset_index(drop=True)
            if len(t) != len(images[key]):
                continue
            first = t[t["layer"] == t["layer"].min()]
            true = first[first["draw"] == 0].sort_values(["size", "cluster"], ascending=[False, True])
            if true.empty:
                continue
            cl = true.iloc[0]["cluster"]
            rows = first[first["cluster"] == cl].sort_values("draw").head(n_random + 1)
            picks.append((part, rows, images[key]))
        if not picks:
            continue
        n_cols = max(len(r) for _, r, _ in picks)
        fig = new_figure(1.2 * n_cols + 1.4, 1.25 * len(picks) + 0.6)
        axes = fig.subplots(len(picks), n_cols, squeeze=False)
        fig.subplots_adjust(left=1.3 / (1.2 * n_cols + 1.4), right=0.98, top=1 - 0.5 / (1.25 * len(picks) + 0.6),
                            bottom=0.03, wspace=0.08, hspace=0.25)
        for r, (part, rows, imgs) in enumerate(picks):
            for ax in axes[r]:
                ax.set_axis_off()
            for c, (idx, row) in enumerate(rows.iterrows()):
                img, cmap = displayable(np.clip((np.asarray(imgs[idx], dtype=float) - lo) / (hi - lo), 0, 1))
                ax = axes[r, c]
                ax.set_axis_on()  # a frame, so that an image saturated to white stays visible
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_color("0.6")
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                if r == 0:
                    axes[r, c].set_title("true" if row["draw"] == 0 else f"random {int(row['draw'])}", fontsize=7)
            axes[r, 0].text(-0.08, 0.5, f"{PARTITION_LABELS.get(part, part)}\nlayer {int(rows.iloc[0]['layer'])}, "
                                        f"n={int(rows.iloc[0]['size'])}",
                            transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
        fig.suptitle(names.get(g, g), fontsize=9)
        caption = (f"Figure 7 ({names.get(g, g)}): feature visualization of the largest first-layer subcluster of each "
                   "partitioning (left) beside random sets of neurons of the same size in the same layer.")
        out.append(_save(fig, directory, f"figure7_{slug(g)}", caption))
    return out


__all__ = ["FigureFile", "figure3", "figure5", "figure7"]
