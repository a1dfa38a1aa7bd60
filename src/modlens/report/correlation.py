"""Figures 1 and 6 of the paper: sign-aligned Spearman correlation maps of first-layer
subclusters (:mod:`modlens.experiments.correlation_maps`) beside random subclusters of the same
size, drawn from a saved model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from modlens.analysis.figures import displayable, new_figure


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
    fig = new_figure(width, height)
    axes = fig.subplots(n + 1, max(m, 1), squeeze=False)
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.1 / width, top=1 - 0.4 / height, bottom=0.1 / height)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j in range(m):
        column = _scale01(np.concatenate([true[j:j + 1], rand[j]]))
        for i in range(n + 1):
            img, cmap = displayable(column[i], rgb=False)
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



def saved_model_maps(model_dir: str | os.PathLike, *, method: str = "weights/global", n_clusters: int = 16,
                     n_random: int = 4, random_state: int = 0, data_dir=None, n_images: int | None = None,
                     input_name: str | None = None, output=None):
    """The :class:`~modlens.experiments.correlation_maps.CorrelationMaps` of a saved model: its
    test images (from its manifest's dataset; the first ``n_images``), ``method``'s partition of
    its neurons made on its held-out data (``n_clusters``, ``random_state``), and ``n_random``
    random subclusters under each first-layer subcluster. ``input_name``/``output`` say how the
    model takes its input and where its logits are, as for ``analyze``."""
    import torch

    from modlens.data import held_out_data
    from modlens.experiments.correlation_maps import correlation_maps
    from modlens.experiments.partitioning import make_adapter, partition
    from modlens.nn.io import load_model

    model, manifest = load_model(model_dir)
    x_test, _, act = held_out_data(manifest.get("dataset"), data_dir=data_dir)
    x = torch.from_numpy(x_test[:n_images] if n_images else x_test)
    adapter = make_adapter(model, x, input_name=input_name, output=output, name="test data")
    part = partition(adapter, method, n_clusters=n_clusters, data=torch.from_numpy(act), random_state=random_state)
    return correlation_maps(adapter, part, x, layer=0, n_random=n_random, random_state=random_state)


__all__ = ["save_correlation_figure", "saved_model_maps"]
