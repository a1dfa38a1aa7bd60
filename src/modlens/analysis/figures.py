"""The figures an analysis result saves: feature-visualization grids (paper, figure 7), true
subclusters beside their random sets. Matplotlib's Agg canvas only: no pyplot, no windows, no
global state; :func:`new_figure`, :func:`displayable` and :func:`slug` serve the report's
figures too."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def displayable(img: np.ndarray, rgb: bool = True) -> tuple[np.ndarray, str | None]:
    """(H, W) grayscale or (H, W, 3) RGB from a (C, H, W) image with values in [0, 1]:
    1 channel: grayscale; 3 (with ``rgb``): RGB; otherwise the first (up to 3) channels
    side by side in grayscale."""
    c = img.shape[0]
    if c == 1:
        return img[0], "gray"
    if c == 3 and rgb:
        return np.transpose(img, (1, 2, 0)), None
    parts = [img[i] for i in range(min(c, 3))]
    gap = np.ones((img.shape[1], 1))
    out = parts[0]
    for p in parts[1:]:
        out = np.concatenate([out, gap, p], axis=1)
    return out, "gray"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def vis_grid_figures(vis_result):
    """``((partitioning, layer), figure)`` per (partitioning, layer) of ``vis_result`` (a
    :class:`VisResult`): each true subcluster's optimized input beside its random sets, as in
    figure 7 (see :func:`save_vis_grids`)."""
    table, images = vis_result.table, np.asarray(vis_result.images, dtype=np.float64)
    lo, hi = vis_result.value_range
    for (name, layer), group in table.groupby(["partitioning", "layer"], sort=False):
        scaled = {idx: np.clip((images[idx] - lo) / (hi - lo), 0, 1) for idx in group.index}
        draw = _vector_figure if images.ndim == 2 else _grid_figure
        fig = draw(group, scaled, (lo, hi))
        fig.suptitle(f"{name}: layer {layer} ({group['layer_name'].iloc[0]})", fontsize=9)
        yield (name, int(layer)), fig


def save_vis_grids(vis_result, directory: str | os.PathLike) -> list[Path]:
    """One PNG per (partitioning, layer) of ``vis_result`` (a :class:`VisResult`) in
    ``directory``: each true subcluster's optimized input beside its random sets, as in
    figure 7. Images (C, H, W): a grid, a row per subcluster. Sequences (T, D): the same grid of
    heatmaps (rows T, columns D). Vectors (D,): a panel per subcluster with one heat strip per
    input, the true subcluster's on top. Values are shown on the result's value range (the
    colour bar of heatmaps and strips). Returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for (name, layer), fig in vis_grid_figures(vis_result):
        path = directory / f"feature_vis_{slug(name)}_layer{layer}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


_COLOURS = {"acc_drop": "#4c72b0", "class_range": "#dd8452", "vis_score": "#55a868", "softmax_entropy": "#c44e52",
            "ce_increase": "#8172b3", "label_range": "#937860", "top_concentration": "#da8bc3"}


def percentile_figure(tests, title: str):
    """One panel per partitioning with a step histogram per metric of the true subclusters' centred
    percentiles among their random sets (low = modular), pooled over the networks of ``tests``
    (the report's Figure 5, a notebook result's first figure)."""
    from modlens.analysis.statistics import METRICS
    from modlens.analysis.text import PARTITION_LABELS
    from modlens.experiments.partitioning import METHODS

    bins = np.linspace(0, 1, 21)
    seen = list(dict.fromkeys(tests["partitioning"]))
    parts = [m for m in METHODS if m in seen] + [p for p in seen if p not in METHODS]
    metrics = [m for m in METRICS if m in set(tests["metric"])]
    fig = new_figure(2.3 * len(parts) + 0.5, 2.6)
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    fig.subplots_adjust(left=0.5 / (2.3 * len(parts) + 0.5), right=0.99, top=0.8, bottom=0.3, wspace=0.25)
    for c, part in enumerate(parts):
        ax = axes[c]
        for m in metrics:
            v = tests[(tests["metric"] == m) & (tests["partitioning"] == part)]["percentile"].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.4, color=_COLOURS.get(m), label=METRICS[m].label)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=6)
        ax.set_title(PARTITION_LABELS.get(part, part), fontsize=8)
        ax.set_xlabel("percentile (low = modular)", fontsize=7)
    axes[0].set_ylabel("true subclusters", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _colorbar(fig, mappable, value_range, left: float, bottom: float, height: float) -> None:
    cax = fig.add_axes([left, bottom, 0.012, height])
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_ticks([0, 0.5, 1])
    lo, hi = value_range
    bar.set_ticklabels([f"{v:.3g}" for v in (lo, (lo + hi) / 2, hi)], fontsize=6)


def _grid_figure(group, scaled: dict, value_range):
    """Images, or sequences as (T, D) heatmaps: a row per subcluster, a column per draw."""
    subs = list(group.groupby("cluster", sort=False))
    n_cols = int(group["draw"].max()) + 1
    heat = next(iter(scaled.values())).ndim == 2
    top = 0.75 if heat else 0.55  # heatmaps: a line saying which axis is which under the title
    width, height = 1.1 * n_cols + (1.5 if heat else 1.0), 1.15 * len(subs) + top + 0.15
    fig = new_figure(width, height)
    axes = fig.subplots(len(subs), n_cols, squeeze=False)
    right = 1 - (0.6 if heat else 0.1) / width
    fig.subplots_adjust(left=0.8 / width, right=right, top=1 - top / height, bottom=0.1 / height)
    shown = None
    for r, (cluster, rows) in enumerate(subs):
        for ax in axes[r]:
            ax.set_axis_off()
        for idx, row in rows.iterrows():
            ax = axes[r, int(row["draw"])]
            if heat:  # a sequence: rows are positions T, columns features D
                shown = ax.imshow(scaled[idx], cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            else:
                img, cmap = displayable(scaled[idx])
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title("true" if row["draw"] == 0 else f"random {row['draw']}", fontsize=7)
        axes[r, 0].text(-0.1, 0.5, f"c{cluster}\nn={rows['size'].iloc[0]}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)
    if heat and shown is not None:
        _colorbar(fig, shown, value_range, right + 0.15 / width, 0.1 / height, 1 - (top + 0.1) / height)
        t, d = next(iter(scaled.values())).shape
        fig.text(0.5, 1 - 0.42 / height, f"each input a heatmap: {t} positions (rows) x {d} features (columns)",
                 ha="center", va="top", fontsize=6)
    return fig


def _vector_figure(group, scaled: dict, value_range):
    """Vectors (D,): a panel per subcluster, one heat strip per input (true on top)."""
    subs = list(group.groupby("cluster", sort=False))
    n_draws = int(group["draw"].max()) + 1
    dim = next(iter(scaled.values())).shape[0]
    panel = 0.45 + 0.12 * n_draws
    width, height = min(14.0, max(5.0, 0.08 * dim + 2.4)), panel * len(subs) + 0.9
    fig = new_figure(width, height)
    axes = fig.subplots(len(subs), 1, squeeze=False)[:, 0]
    right = 1 - 0.8 / width
    fig.subplots_adjust(left=1.0 / width, right=right, top=1 - 0.55 / height, bottom=0.45 / height, hspace=0.45)
    shown = None
    for ax, (cluster, rows) in zip(axes, subs):
        strips = np.full((n_draws, dim), np.nan)
        for idx, row in rows.iterrows():
            strips[int(row["draw"])] = scaled[idx]
        shown = ax.imshow(strips, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.axhline(0.5, color="white", linewidth=1.5)  # the true subcluster above, its random sets below
        ax.set_yticks(range(n_draws))
        ax.set_yticklabels(["true"] + [f"random {i}" for i in range(1, n_draws)], fontsize=5)
        ax.set_title(f"c{cluster} (n={rows['size'].iloc[0]})", fontsize=7, loc="left")
        ax.tick_params(axis="x", labelsize=6)
    axes[-1].set_xlabel("input feature", fontsize=7)
    if shown is not None:
        _colorbar(fig, shown, value_range, right + 0.2 / width, 0.45 / height, 1 - 1.0 / height)
    return fig


__all__ = ["save_vis_grids", "vis_grid_figures", "percentile_figure", "new_figure", "displayable", "slug"]
