"""A study folder as an object: what :func:`~modlens.study.runner.run_study` returns and
:func:`open_study` reads back. It is a path (``study / "study_rows.csv"``, ``os.fspath(study)``)
with the study's record, rows and networks as attributes, and it displays itself in a notebook:
the paper's tables with their significance and effect marks, the n-cut of every network's
partitionings, the degenerate metrics, and the report's figures inline. The tables are the
report's (:func:`modlens.report.tables.build_tables`), rendered by the same HTML pieces."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from modlens.analysis.result import AnalysisResult, load_result
from modlens.analysis.text import PARTITION_LABELS
from modlens.core.html import Cell, Table, esc, figure_html, fragment, kv_html, notes_html, table_html
from modlens.report.paper import family_bh
from modlens.report.tables import build_tables


class StudyResult(os.PathLike):
    """A study folder (``study_rows``, ``study.json``, ``networks/``, ``tables/``, ``figures/``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "study.json").is_file() or not (self.path / "study_rows.parquet").is_file():
            raise FileNotFoundError(f"{self.path} is not a finished study folder (no study.json and study_rows.parquet); "
                                    "run `modlens study run SPEC --out FOLDER` first")

    # -- a path --------------------------------------------------------------------------------------
    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"StudyResult({str(self.path)!r})"

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __eq__(self, other) -> bool:
        return isinstance(other, (StudyResult, os.PathLike, str)) and Path(self.path) == Path(os.fspath(other))

    def __hash__(self) -> int:
        return hash(self.path)

    def __getattr__(self, name: str):  # every other Path attribute (exists, glob, name, ...)
        if name == "path":
            raise AttributeError(name)
        return getattr(self.path, name)

    # -- the study -----------------------------------------------------------------------------------
    @property
    def record(self) -> dict:
        """``study.json``: the resolved spec, versions, seeds, executor, utilization, task timings."""
        return json.loads((self.path / "study.json").read_text())

    @property
    def rows(self) -> pd.DataFrame:
        """One row per group, k, partitioning and metric, with Benjamini-Hochberg per table family
        (``q_value``, ``significant``, ``critical_p``, ``bold``) as the report applies it."""
        rows, _ = self._family_bh()
        return rows

    @property
    def networks(self) -> list[str]:
        return [n["id"] for n in self.record.get("networks", [])]

    def network(self, network_id: str) -> AnalysisResult:
        """One network's analysis (``networks/<id>/``) as an :class:`AnalysisResult`."""
        if network_id not in self.networks:
            raise KeyError(f"no network {network_id!r} in {self.path}; its networks: {', '.join(self.networks)}")
        return load_result(self.path / "networks" / network_id)

    def _family_bh(self):
        record = self.record
        analysis = (record.get("resolved") or {}).get("analysis") or {}
        return family_bh(pd.read_parquet(self.path / "study_rows.parquet"), alpha=float(analysis.get("alpha", 0.05)),
                         scope=analysis.get("bh_scope", "table"))

    def _ncut_table(self) -> tuple[Table, list[str]]:
        """The n-cut of every network's partitionings, degenerate cells shaded, and one note per
        degenerate metric."""
        summaries = {nid: pd.read_parquet(self.path / "networks" / nid / "summary.parquet") for nid in self.networks
                     if (self.path / "networks" / nid / "summary.parquet").is_file()}
        parts = list(dict.fromkeys(p for s in summaries.values() for p in s["partitioning"]))
        table = Table("ncut", "n-cut per partitioning", "Normalized cut of each network's partition of its hidden "
                      "neurons (lower: more clusterable); shaded: the network has a degenerate metric there.",
                      ["Network"] + [PARTITION_LABELS.get(p, p) for p in parts])
        notes = []
        for nid, s in summaries.items():
            cells = [Cell(nid)]
            for p in parts:
                sub = s[s["partitioning"] == p]
                flags = [f"{m}: {d}" for m, d in zip(sub["metric"], sub.get("degenerate", pd.Series([""] * len(sub))))
                         if isinstance(d, str) and d]
                v = float(sub["ncut"].iloc[0]) if len(sub) and "ncut" in sub.columns else float("nan")
                cells.append(Cell("n/a" if not math.isfinite(v) else f"{v:.3f}" + (" !" if flags else ""), flag=bool(flags)))
                notes += [f"! {nid}, {p}: degenerate {f}" for f in flags]
            table.rows.append(cells)
        return table, notes

    def _repr_html_(self) -> str:
        record = self.record
        rows, info = self._family_bh()
        tables = "".join(table_html(t) for t in build_tables(rows, info))
        ncut, notes = self._ncut_table()
        captions = {}
        if (self.path / "figures" / "captions.json").is_file():
            captions = json.loads((self.path / "figures" / "captions.json").read_text())
        figures = "".join(figure_html(self.path / "figures" / name, caption, name)
                          for name, caption in captions.items() if (self.path / "figures" / name).is_file())
        util = record.get("utilization") or {}
        facts = {"folder": str(self.path), "networks": len(self.networks), "executor": record.get("executor"),
                 "workers": record.get("workers"), "seconds": record.get("seconds"),
                 "utilization": None if util.get("value") is None else round(float(util["value"]), 3)}
        inner = (kv_html({k: v for k, v in facts.items() if v is not None}) + tables + table_html(ncut) + notes_html(notes)
                 + (f"<h3>{esc('Figures')}</h3>" + figures if figures else ""))
        return fragment(f"modlens study: {record.get('name', self.path.name)}", inner)


def open_study(folder: str | os.PathLike) -> StudyResult:
    """A finished study folder as a :class:`StudyResult` (displays itself in a notebook)."""
    return StudyResult(folder)


__all__ = ["StudyResult", "open_study"]
