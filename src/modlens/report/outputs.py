"""Tables, figures and the HTML report of a study folder, or of one ``modlens analyze`` result.

A study folder holds ``study.json`` (the resolved spec, versions, seeds, timings),
``study_rows.parquet`` (one row per group, k, partitioning and metric: Fisher-Bates p value,
effect ± SE) and ``networks/<network_id>/`` (each network's saved analyze result).
:func:`write_study_outputs` adds ``tables/``, ``figures/`` and ``report.html``;
:func:`write_result_report` writes the same kind of report for one saved analyze result.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from modlens._version import __version__
from modlens.analysis.figures import slug
from modlens.analysis.result import read_result_manifest
from modlens.analysis.statistics import table_family
from modlens.analysis.text import empty_notes
from modlens.report import html as H
from modlens.report.correlation import save_correlation_figure, saved_model_maps
from modlens.report.paper import CITATION, agreement_counts, compare_with_paper, family_bh
from modlens.report.plots import FigureFile, figure3, figure5, figure7
from modlens.report.tables import build_tables, comparison_table, main_k, network_names, write_tables


@dataclass
class NetworkResult:
    """What the report needs from one saved analyze result."""

    path: Path
    manifest: dict
    summary: pd.DataFrame
    tests: pd.DataFrame
    visualizations: pd.DataFrame | None
    images: dict[str, np.ndarray]
    value_range: tuple[float, float]


def load_network(path: str | Path) -> NetworkResult:
    path = Path(path)
    manifest = read_result_manifest(path, who="report: ")
    summary = pd.read_parquet(path / "summary.parquet")
    tests = pd.read_parquet(path / "tests.parquet")
    vis = pd.read_parquet(path / "visualizations.parquet") if (path / "visualizations.parquet").is_file() else None
    images = {}
    if (path / "vis_images.npz").is_file():
        with np.load(path / "vis_images.npz") as npz:
            images = {k: npz[k] for k in npz.files}
    vr = (manifest.get("config", {}).get("feature_vis") or {}).get("value_range") or (0.0, 1.0)
    return NetworkResult(path, manifest, summary, tests, vis, images, (float(vr[0]), float(vr[1])))


def _group_of_id(network_id: str) -> str:
    return re.sub(r"-s\d+$", "", network_id)


def network_groups(study: dict, network_ids: list[str]) -> dict[str, str]:
    """network_id -> group: from ``study.json``'s ``networks`` (a mapping id -> {"group": ...}
    or a list of {"id"/"network_id", "group"}) where it says, else the id without its
    ``-s<seed>`` suffix (``mlp-mnist-s0`` -> ``mlp-mnist``)."""
    declared = {}
    nets = study.get("networks")
    if isinstance(nets, dict):
        declared = {k: v.get("group") for k, v in nets.items() if isinstance(v, dict)}
    elif isinstance(nets, list):
        for v in nets:
            if isinstance(v, dict):
                declared[v.get("id", v.get("network_id"))] = v.get("group")
    return {n: declared.get(n) or _group_of_id(n) for n in network_ids}


def _figure_sections(rows, info, names, tests, vis, fig_dir: Path, extra: list[FigureFile]) -> tuple[list, list[str]]:
    figures, notes = [], []
    crit = {fam: v["critical_p"] for fam, v in info.items()}
    f3 = figure3(rows, names, main_k(rows), crit, fig_dir)
    if f3:
        figures.append(f3)
    figures += figure5(tests, names, fig_dir)
    f7 = figure7(vis, names, fig_dir)
    if not f7:
        notes.append("Figure 7 skipped: no saved feature visualizations (run analyze with feature visualization).")
    figures += f7 + extra
    return figures, notes


def _figures_html(figures: list[FigureFile]) -> str:
    return "\n".join(H.figure_html(f.png, f.caption, f.png.stem) for f in figures) or "<p>No figures.</p>"


def _intro(rows, info, counts) -> str:
    fams = "; ".join(f"{fam}: {v['n_significant']} of {v['m']} p values significant, critical p = "
                     + (f"{v['critical_p']:.3g}" if v["n_significant"] else "none") for fam, v in info.items())
    text = (f"<p>{rows['group'].nunique()} network group(s), {len(rows)} tests. Benjamini-Hochberg at α = "
            f"{next(iter(info.values()))['alpha'] if info else 0.05:g} "
            + ("within each table family" if all(v.get("scope") == "table" for v in info.values())
               else "over lesion and visualization tests together") + f" ({H.esc(fams)}).</p>")
    if counts["cells"]:
        text += (f"<p><strong>Agreement with the paper: {counts['both']} of {counts['cells']} cells</strong> "
                 f"(same significance decision: {counts['significance']}; effect on the same side of 1: "
                 f"{counts['side']}).</p>")
    return text


def _tables_and_comparison(rows, info):
    tables = build_tables(rows, info)
    comparison = compare_with_paper(rows)
    ctable = comparison_table(comparison)
    return tables, comparison, ctable


def _sections(tables, ctable, counts, figures, notes, meta: list[tuple[str, str]]) -> list[tuple[str, str]]:
    sections = []
    if ctable is not None:
        inner = (f'<p class="cite">Reported values: {H.esc(CITATION)}. A cell agrees when the significance decision '
                 "(Benjamini-Hochberg here, p ≤ 0.025 in the paper) is the same and the effect lies on the same "
                 f"side of 1. {counts['both']} of {counts['cells']} cells agree.</p>"
                 + H.table_html(ctable, agreement_column="Agree"))
        sections.append(("Comparison with the paper", inner))
    sections.append(("Tables", "\n".join(H.table_html(t) for t in tables)))
    fig_inner = _figures_html(figures) + "".join(f'<p class="note">{H.esc(n)}</p>' for n in notes)
    sections.append(("Figures", fig_inner))
    return sections + meta


def _study_model_maps(study_dir: Path, study: dict, *, data_dir=None, method: str = "weights/global",
                      n_random: int = 4, n_images: int | None = 2000) -> Callable[[str], object] | None:
    """A ``correlation_maps(network_id)`` callable from the model folders study.json records
    (``networks[i]["model_dir"]``, relative to the study folder or absolute), with each network's
    k and analysis seed and the study's ``input_name``/``output``
    (:func:`~modlens.report.correlation.saved_model_maps`). None when no network records a model
    folder."""
    nets = study.get("networks")
    records = {n.get("id"): n for n in nets if isinstance(n, dict)} if isinstance(nets, list) else {}
    if not any(r.get("model_dir") for r in records.values()):
        return None

    def maps_of(network_id: str):
        rec = records.get(network_id) or {}
        if not rec.get("model_dir"):
            raise FileNotFoundError(f"study.json records no model_dir for network {network_id}")
        model_dir = Path(rec["model_dir"])
        return saved_model_maps(model_dir if model_dir.is_absolute() else study_dir / model_dir, method=method,
                                n_clusters=int(rec.get("k") or 16), n_random=n_random,
                                random_state=int(rec.get("random_state") or 0), data_dir=data_dir, n_images=n_images,
                                input_name=_setting(study, "input_name", None), output=_setting(study, "output", None))

    return maps_of


def write_study_outputs(study_dir: str | Path, *, alpha: float | None = None, bh_scope: str | None = None,
                        correlation_maps: Callable[[str], object] | None = None, data_dir=None) -> dict:
    """Write ``tables/``, ``figures/`` (with ``captions.json``) and ``report.html`` into ``study_dir``.

    ``correlation_maps(network_id)`` returning a
    :class:`~modlens.experiments.correlation_maps.CorrelationMaps` draws Figures 1/6 for the
    first network of each halves/stack group; by default the model folders study.json
    records are used (test images from ``data_dir``); where
    neither works those figures are skipped with a note saying why.
    ``alpha`` and ``bh_scope`` (``"table"``, the default, or ``"joint"``: see
    :func:`~modlens.report.paper.family_bh`) default to the spec's ``alpha``/``bh_scope``.
    Returns the paths written, the critical p value per family and the agreement counts.
    """
    study_dir = Path(study_dir)
    spath, rpath = study_dir / "study.json", study_dir / "study_rows.parquet"
    for p in (spath, rpath):
        if not p.is_file():
            raise FileNotFoundError(f"report: {p} is missing; a study folder needs study.json and "
                                    "study_rows.parquet (written by `modlens study run`)")
    study = json.loads(spath.read_text())
    alpha = float(alpha if alpha is not None else _setting(study, "alpha", 0.05))
    bh_scope = bh_scope or _setting(study, "bh_scope", "table")
    rows, info = family_bh(pd.read_parquet(rpath), alpha=alpha, scope=bh_scope)
    names = network_names(rows)
    net_dir = study_dir / "networks"
    ids = sorted(p.name for p in net_dir.iterdir() if (p / "manifest.json").is_file()) if net_dir.is_dir() else []
    groups = network_groups(study, ids)
    tests, vis, first = {}, {}, {}
    for nid in ids:
        g = groups[nid]
        net = load_network(net_dir / nid)
        tests.setdefault(g, []).append(net.tests.assign(network=nid))
        first.setdefault(g, nid)
        if g not in vis and net.visualizations is not None and net.images:
            vis[g] = (net.visualizations, net.images, net.value_range)
    order = list(dict.fromkeys(rows["group"])) + sorted(set(tests) - set(rows["group"]))
    tests = {g: pd.concat(tests[g], ignore_index=True) for g in order if g in tests}
    vis = {g: vis[g] for g in order if g in vis}
    table_dir, fig_dir = study_dir / "tables", study_dir / "figures"
    _remove_stale(table_dir, ("table[1-5].*", "paper_comparison*", "study_rows.*"))
    _remove_stale(fig_dir, ("figure3.*", "figure5_*", "figure7_*"))
    tables, comparison, ctable = _tables_and_comparison(rows, info)
    counts = agreement_counts(comparison)
    paths = write_tables(tables + ([ctable] if ctable else []), table_dir)
    rows.to_csv(table_dir / "study_rows.csv", index=False)
    rows.to_parquet(table_dir / "study_rows.parquet", index=False)
    if not comparison.empty:
        comparison.to_csv(table_dir / "paper_comparison_rows.csv", index=False)
    maps_of = correlation_maps or _study_model_maps(study_dir, study, data_dir=data_dir)
    extra, notes = _correlation_figures(first, names, fig_dir, maps_of)
    figures, fig_notes = _figure_sections(rows, info, names, tests, vis, fig_dir, extra)
    ours = {f.png for f in figures}
    figures += [FigureFile(p, p.with_suffix(".svg"), f"From the study run: {p.stem}.")
                for p in sorted(fig_dir.glob("*.png")) if p not in ours]
    fig_dir.mkdir(parents=True, exist_ok=True)  # the captions, for a notebook's display of the study
    (fig_dir / "captions.json").write_text(json.dumps({f.png.name: f.caption for f in figures if f.png.exists()},
                                                      indent=2, sort_keys=True) + "\n", encoding="utf-8")
    notes += _study_empty_notes(rows)
    sections = _sections(tables, ctable, counts, figures, notes + fig_notes, _study_meta(study))
    title = f"modlens study: {study.get('name', study_dir.name)}"
    report = study_dir / "report.html"
    report.write_text(H.page(title, sections, intro=_intro(rows, info, counts)), encoding="utf-8")
    return {"report": report, "tables": paths, "figures": [p for f in figures for p in dict.fromkeys((f.png, f.svg)) if p.exists()],
            "critical_p": {fam: v["critical_p"] for fam, v in info.items()}, "bh_scope": bh_scope, "agreement": counts,
            "notes": notes + fig_notes}


def _study_empty_notes(rows: pd.DataFrame) -> list[str]:
    """One line per (group, k, partitioning) with no subcluster to test in any replicate."""
    if "n_subclusters" not in rows.columns:
        return []
    out = []
    for (group, k, part), sub in rows.groupby(["group", "k", "partitioning"], sort=False):
        if sub["n_subclusters"].fillna(0).max() > 0 or part == "clusterability":
            continue
        out.append(f"{group}, k = {k}, {part}: p values n/a, no subcluster qualifies in any replicate (usually every "
                   "cluster spans whole layers: try a larger k; each network's summary says why).")
    return out


_RUN_KEYS = ("name", "description", "source", "executor", "executor_requested", "workers", "started", "finished",
             "seconds", "utilization")


def _setting(study: dict, key: str, default):
    """A setting from study.json: the spec's top level, its [analysis] table, or the resolved analysis."""
    for place in (study.get("spec"), (study.get("spec") or {}).get("analysis") if isinstance(study.get("spec"), dict)
                  else None, (study.get("resolved") or {}).get("analysis"), study):
        if isinstance(place, dict) and place.get(key) is not None:
            return place[key]
    return default


def _study_meta(study: dict) -> list[tuple[str, str]]:
    """Spec, run facts, versions, seeds and timings from study.json, whichever of its known
    keys are there (``spec``/``resolved``, ``versions``, ``seeds`` or ``networks``' seeds,
    ``timings`` or ``tasks``)."""
    spec = study.get("spec") or {k: v for k, v in study.items() if k not in ("versions", "seeds", "timings", "tasks",
                                                                                "networks", "resolved")}
    meta = [("Study specification", H.json_html(spec))]
    if study.get("resolved"):
        meta.append(("Resolved specification", H.json_html(study["resolved"])))
    run = {k: study[k] for k in _RUN_KEYS if study.get(k) is not None}
    if run:
        meta.append(("Run", H.kv_html(run)))
    meta.append(("Versions", H.kv_html(study.get("versions") or {"modlens": __version__}, ("package", "version"))))
    nets = study.get("networks")
    if study.get("seeds") is not None:
        meta.append(("Seeds", H.json_html(study["seeds"])))
    elif isinstance(nets, list) and nets and all(isinstance(n, dict) for n in nets):
        cols = [c for c in ("id", "group", "label", "k", "train_seed", "random_state", "test_accuracy", "model_sha256")
                if any(c in n for n in nets)]
        meta.append(("Networks and seeds", H.timings_html([{c: n.get(c, "") for c in cols} for n in nets])))
    else:
        meta.append(("Seeds", "<p>not recorded</p>"))
    timings = study.get("timings", study.get("tasks"))
    meta.append(("Timings", H.timings_html(timings) if timings is not None else "<p>not recorded</p>"))
    return meta


def _remove_stale(directory: Path, patterns) -> None:
    """Outputs of an earlier run that this one would not rewrite (e.g. Table 2 of a study that
    no longer has several k); other files in the folder are left alone."""
    if directory.is_dir():
        for pattern in patterns:
            for p in directory.glob(pattern):
                p.unlink()


def _correlation_figures(first: dict[str, str], names, fig_dir: Path, maps_of) -> tuple[list[FigureFile], list[str]]:
    halves = [g for g in first if re.search(r"halves|stack", f"{g} {names.get(g, '')}", re.I)]
    if not halves:
        return [], []
    if maps_of is None:
        return [], [f"Figures 1/6 skipped for {', '.join(halves)}: drawing them needs the models; pass "
                    "correlation_maps= to write_study_outputs or run `modlens correlation-maps MODEL --out FILE`."]
    out, notes = [], []
    for g in halves:
        try:
            maps = maps_of(first[g])
        except (OSError, ValueError) as exc:  # a moved model folder, missing data files
            notes.append(f"Figures 1/6 skipped for {g}: {exc}")
            continue
        png = save_correlation_figure(maps, fig_dir / f"figure6_{slug(g)}.png")
        svg = save_correlation_figure(maps, fig_dir / f"figure6_{slug(g)}.svg")
        out.append(FigureFile(png, svg, f"Figures 1/6 ({names.get(g, g)}, network {first[g]}): sign-aligned correlation "
                                        "maps of first-layer subclusters (top row) beside random subclusters."))
    return out, notes


def result_rows(net: NetworkResult, label: str | None = None) -> pd.DataFrame:
    """Study rows for one analyze result (one group)."""
    cfg = net.manifest.get("config", {})
    if label is None:
        models = net.manifest.get("models") or []
        sets = sorted({str(m.get("dataset", {}).get("name")) for m in models if isinstance(m.get("dataset"), dict)})
        model = cfg.get("model") or {}
        label = ", ".join(sets) or str(model.get("dataset") or net.path.name)
    s = net.summary
    return pd.DataFrame({"table_family": [table_family(m) for m in s["metric"]], "group": "result", "network_label": label,
                         "k": int(cfg.get("n_clusters", 16)), "partitioning": s["partitioning"], "metric": s["metric"],
                         "p_value": s["p_value"], "effect": s["effect"], "effect_se": s["effect_se"],
                         "n_networks": s["n_networks"], "n_subclusters": s["n_subclusters"]})


def write_result_report(result_dir: str | Path, out: str | Path | None = None, *, alpha: float | None = None,
                        bh_scope: str = "table") -> Path:
    """``report.html`` (or ``out``) for one saved analyze result: its tables with
    Benjamini-Hochberg redone per table family as the paper does, Figures 3, 5 and 7, the
    feature-visualization grids it saved, its configuration. Only the HTML file is written."""
    net = load_network(result_dir)
    cfg = net.manifest.get("config", {})
    alpha = float(alpha if alpha is not None else cfg.get("alpha", 0.05))
    rows, info = family_bh(result_rows(net), alpha=alpha, scope=bh_scope)
    names = network_names(rows)
    tables, comparison, ctable = _tables_and_comparison(rows, info)
    counts = agreement_counts(comparison)
    vis = {"result": (net.visualizations, net.images, net.value_range)} if net.visualizations is not None and net.images else {}
    saved = [FigureFile(p, p, f"Saved by analyze: {p.stem.replace('_', ' ')} (each row a true subcluster, then its "
                              "random sets).") for p in sorted((net.path / "figures").glob("*.png"))]
    out = Path(out) if out is not None else net.path / "report.html"
    with tempfile.TemporaryDirectory(prefix="modlens-report-") as tmp:
        figures, notes = _figure_sections(rows, info, names, {"result": net.tests}, vis, Path(tmp), saved)
        meta = [("Configuration", H.json_html(cfg)),
                ("Models", H.json_html(net.manifest.get("models", "not recorded"))),
                ("Versions", H.kv_html({"modlens (analysis)": cfg.get("modlens_version", "?"),
                                        "modlens (report)": __version__}, ("package", "version"))),
                ("Seeds", H.kv_html({"random_state": cfg.get("random_state")})),
                ("Timings", H.kv_html({"analysis seconds": cfg.get("seconds")}))]
        notes.insert(0, "Benjamini-Hochberg here runs within each table family (lesion, visualization) as in the paper; "
                        "analyze's own summary.csv applies it across all its rows together, so q values may differ.")
        notes[1:1] = empty_notes(net.summary)
        sections = _sections(tables, ctable, counts, figures, notes, meta)
        text = H.page(f"modlens analysis: {net.path.name}", sections, intro=_intro(rows, info, counts))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def write_report(path: str | Path, out: str | Path | None = None, *, bh_scope: str | None = None) -> Path:
    """A study folder (with study_rows.parquet) or a single analyze result, whichever ``path`` is."""
    path = Path(path)
    if (path / "study_rows.parquet").is_file():
        report = write_study_outputs(path, bh_scope=bh_scope)["report"]
        if out is not None and Path(out) != report:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(report.read_bytes())
            return Path(out)
        return report
    return write_result_report(path, out, bh_scope=bh_scope or "table")


__all__ = ["NetworkResult", "load_network", "network_groups", "write_study_outputs", "result_rows",
           "write_result_report", "write_report"]
