"""Figures of the coherence experiments: feature-visualization grids (paper, figure 7) and
subcluster correlation maps (figures 1 and 6). Matplotlib's Agg canvas only: no pyplot, no
windows, no global state."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _displayable(img: np.ndarray, rgb: bool = True) -> tuple[np.ndarray, str | None]:
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def save_vis_grids(vis_result, directory: str | os.PathLike) -> list[Path]:
    """One PNG per (partitioning, layer) of ``vis_result`` (a :class:`VisResult`) in
    ``directory``: each row a true subcluster followed by its random sets, as in figure 7.
    Pixel values are shown on the result's value range. Returns the paths written."""
    table, images = vis_result.table, np.asarray(vis_result.images, dtype=np.float64)
    lo, hi = vis_result.value_range
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for (name, layer), group in table.groupby(["partitioning", "layer"], sort=False):
        subs = list(group.groupby("cluster", sort=False))
        n_cols = int(group["draw"].max()) + 1
        width, height = 1.1 * n_cols + 1.0, 1.15 * len(subs) + 0.7
        fig = _figure(width, height)
        axes = fig.subplots(len(subs), n_cols, squeeze=False)
        fig.subplots_adjust(left=0.8 / width, right=1 - 0.1 / width, top=1 - 0.55 / height, bottom=0.1 / height)
        for r, (cluster, rows) in enumerate(subs):
            for ax in axes[r]:
                ax.set_axis_off()
            for idx, row in rows.iterrows():
                img, cmap = _displayable(np.clip((images[idx] - lo) / (hi - lo), 0, 1))
                ax = axes[r, int(row["draw"])]
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                if r == 0:
                    ax.set_title("true" if row["draw"] == 0 else f"random {row['draw']}", fontsize=7)
            axes[r, 0].text(-0.1, 0.5, f"c{cluster}\nn={rows['size'].iloc[0]}", transform=axes[r, 0].transAxes,
                            ha="right", va="center", fontsize=7)
        fig.suptitle(f"{name}: layer {layer} ({group['layer_name'].iloc[0]})", fontsize=9)
        path = directory / f"feature_vis_{_slug(name)}_layer{int(layer)}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def _scale01(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return np.full_like(a, 0.5) if hi <= lo else (a - lo) / (hi - lo)


def save_correlation_figure(maps, path: str | os.PathLike) -> Path:
    """Figure 6 for a :class:`CorrelationMaps`: one column per true subcluster, the true
    map in the first row and its random sets below, each column scaled to [0, 1]
    (multi-channel maps: the first channels side by side)."""
    true, rand = np.asarray(maps.true_maps, dtype=np.float64), np.asarray(maps.random_maps, dtype=np.float64)
    m, n = rand.shape[:2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = 1.2 * max(m, 1) + 1.0, 1.2 * (n + 1) + 0.5
    fig = _figure(width, height)
    axes = fig.subplots(n + 1, max(m, 1), squeeze=False)
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.1 / width, top=1 - 0.4 / height, bottom=0.1 / height)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j in range(m):
        column = _scale01(np.concatenate([true[j:j + 1], rand[j]]))
        for i in range(n + 1):
            img, cmap = _displayable(column[i], rgb=False)
            axes[i, j].imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        sc = maps.subclusters[j]
        axes[0, j].set_title(f"c{sc.cluster} (n={sc.size})", fontsize=7)
    if m:
        axes[0, 0].text(-0.1, 0.5, "true", transform=axes[0, 0].transAxes, ha="right", va="center", fontsize=7)
        for i in range(1, n + 1):
            axes[i, 0].text(-0.1, 0.5, f"random {i}", transform=axes[i, 0].transAxes, ha="right", va="center",
                            fontsize=7)
    fig.savefig(path)
    return path


__all__ = ["save_vis_grids", "save_correlation_figure"]
