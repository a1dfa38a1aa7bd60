"""What :func:`~modlens.analysis.analyze` returns, and the folder it is saved as.

A saved result (``modlens analyze --out``, :meth:`AnalysisResult.save`) is a folder with
``summary``, ``subclusters``, ``tests`` (and, where present, ``visualizations`` and
``clusterability``) as Parquet and CSV, ``partitions.json`` (one partition record per
partitioning, :func:`partition_to_dict`), ``vis_images.npz`` and ``figures/`` with feature
visualization, and ``manifest.json`` (``format: "modlens-analysis"``, the config and the files).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from modlens.analysis.storage import atomic_folder, json_default, pretty
from modlens.core.partition import Partition

#: The tables of a result, in the order they are written.
TABLES = ("summary", "subclusters", "tests", "visualizations", "clusterability")


@dataclass
class AnalysisResult:
    """What :func:`~modlens.analysis.analyze` found.

    summary:     one row per (partitioning, metric): p value, effect ± SE, BH q value.
    subclusters: one row per (subcluster, draw): the tidy lesion table.
    tests:       one row per (true subcluster, metric): percentile and effect value.
    partitions:  the partitions that were tested, by name.
    config:      the arguments and facts needed to reproduce the tables.
    visualizations: with ``feature_vis=True``, one row per (subcluster, draw) with the
                 visualization score and softmax entropy; ``vis_results`` holds the images.
    clusterability: with ``clusterability=True``, one row per (network, weight partitioning).
    """

    summary: pd.DataFrame
    subclusters: pd.DataFrame
    tests: pd.DataFrame
    partitions: dict[str, Partition]
    config: dict = field(default_factory=dict)
    visualizations: pd.DataFrame | None = None
    vis_results: list = field(default_factory=list, repr=False)
    clusterability: pd.DataFrame | None = None

    def __repr__(self) -> str:
        from modlens.analysis.text import format_summary

        return format_summary(self.summary)

    def _repr_html_(self) -> str:
        """The notebook display: the summary table (significance and effect marks, n-cut per
        partitioning, degenerate metrics flagged) and the figures inline (:mod:`modlens.analysis.display`)."""
        from modlens.analysis.display import result_html

        return result_html(self)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the tables (Parquet and CSV), the partitions and a manifest into ``directory``,
        through a temporary folder renamed at the end, so a failure leaves no partial output."""
        return save_result(self, directory, overwrite=overwrite)


def save_result(result: AnalysisResult, directory, *, overwrite: bool = False, extra_manifest: dict | None = None,
                figures: bool = True) -> Path:
    """The folder of ``result`` (see the module's docstring). ``figures=False`` keeps the
    visualization images but draws no PNG grids (they take minutes at k = 16)."""
    target = Path(directory)
    with atomic_folder(target, overwrite=overwrite) as tmp:
        files = []
        for name in TABLES:
            frame = getattr(result, name)
            if frame is None:
                continue
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
            frame.to_csv(tmp / f"{name}.csv", index=False)
            files += [f"{name}.parquet", f"{name}.csv"]
        if result.vis_results:
            from modlens.analysis.figures import save_vis_grids

            for res in result.vis_results if figures else ():
                files += [str(p.relative_to(tmp)) for p in save_vis_grids(res, tmp / "figures")]
            images = {f"{r.config['partitioning']}": r.images for r in result.vis_results}
            np.savez_compressed(tmp / "vis_images.npz", **{k.replace("/", "__"): v for k, v in images.items()})
            files.append("vis_images.npz")
        parts = {name: partition_to_dict(p) for name, p in result.partitions.items()}
        (tmp / "partitions.json").write_text(json.dumps(parts, default=json_default))
        files.append("partitions.json")
        manifest = {"format": "modlens-analysis", "config": result.config, "files": files, **(extra_manifest or {})}
        (tmp / "manifest.json").write_text(pretty(manifest))
    return target


def read_result_manifest(directory: str | os.PathLike, who: str = "") -> dict:
    """The manifest of a saved result folder, checked to be one (``who``: a prefix for errors)."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{who}{directory} is not a saved analysis result (no manifest.json); give the "
                                "folder written by `modlens analyze --out` or AnalysisResult.save")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "modlens-analysis":
        raise ValueError(f"{who}{path} has format {manifest.get('format')!r}, expected 'modlens-analysis'")
    return manifest


def load_result(directory: str | os.PathLike) -> AnalysisResult:
    """A saved result (``modlens analyze --out``, :meth:`AnalysisResult.save`, a study's
    ``networks/<id>/``) read back: its tables, partitions, config and visualizations."""
    from modlens.experiments.feature_vis import VisResult

    directory = Path(directory)
    manifest = read_result_manifest(directory)
    frames = {name: pd.read_parquet(directory / f"{name}.parquet") if (directory / f"{name}.parquet").is_file() else None
              for name in TABLES}
    parts = json.loads((directory / "partitions.json").read_text())
    config = manifest.get("config", {})
    vis = []
    if frames["visualizations"] is not None and (directory / "vis_images.npz").is_file():
        with np.load(directory / "vis_images.npz") as npz:
            images = {k.replace("__", "/"): npz[k] for k in npz.files}
        table = frames["visualizations"]
        first = table[table["network"] == table["network"].iloc[0]] if "network" in table.columns else table
        for name, imgs in images.items():
            rows = first[first["partitioning"] == name].reset_index(drop=True)
            if len(rows) == len(imgs):
                vis.append(VisResult(rows, imgs, {**(config.get("feature_vis") or {}), "partitioning": name}))
    return AnalysisResult(frames["summary"], frames["subclusters"], frames["tests"],
                          {k: partition_from_dict(v) for k, v in parts.items()}, config, frames["visualizations"], vis,
                          frames["clusterability"])


# -- the partition record (partitions.json of a result, partition.json of a study task) ----------

def partition_to_dict(p: Partition) -> dict:
    return {"method": p.method, "n_clusters": p.n_clusters, "ncut": p.ncut, "layer_names": list(p.layer_names),
            "labels": [l.tolist() for l in p.labels], "info": p.info}


def partition_from_dict(d: dict) -> Partition:
    labels = [np.asarray(l, dtype=np.int64) for l in d["labels"]]
    return Partition.from_labels(labels, d["layer_names"], [len(l) for l in labels], method=d["method"],
                                 n_clusters=d["n_clusters"], ncut=d["ncut"], info=d.get("info") or {})


def partition_digest(p: Partition) -> str:
    """A hash of what the partition says (method, layers, labels), not of how long it took."""
    body = {"method": p.method, "n_clusters": p.n_clusters, "layer_names": list(p.layer_names),
            "labels": [l.tolist() for l in p.labels]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


__all__ = ["AnalysisResult", "save_result", "load_result", "read_result_manifest", "TABLES", "partition_to_dict", "partition_from_dict", "partition_digest"]
