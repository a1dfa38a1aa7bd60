"""A row of the paper's Tables 4 and 5 measured by two study runs, beside the paper, cell by cell.

    modlens study run paper-small --groups cnn-mnist --out STUDIES/paper --data-dir DATA
    modlens study run paper-original --groups cnn-mnist --out STUDIES/original --data-dir DATA
    # 1. the agreement table of both option sets, and the time each run took
    python benchmarks/fidelity_study.py compare --paper STUDIES/paper --original STUDIES/original
    # 2. which option moves which cell (one switch at a time, from the saved tables of both runs;
    #    the two runs must share their partitions: paper-original with the paper's graph options)
    python benchmarks/fidelity_study.py switches --paper STUDIES/paper --original STUDIES/original
    # 3. what rows 1-2 of the notes (the conv edge weight and activation reduction, which
    #    paper-original leaves at the paper's definitions) would change in the partitions
    python benchmarks/fidelity_study.py graph-options --study STUDIES/paper --data-dir DATA

``paper-small`` analyses with the paper's definitions (modlens's defaults), ``paper-original`` with
the original code's options of the analysis (balanced accuracy, normalized class range, original
ties and effect rule, max fraction 0.99, the original feature visualization; docs/fidelity.md).
Both use the same trained networks and partitions (a study's tasks are keyed by what they read, so
a copy of the first study's ``tasks/`` lets the second reuse its training, partitions and lesion
counts). "agree" compares significance decisions (ours: Benjamini-Hochberg at 0.05 within the table
family of the study; the paper's: its marking, p <= 0.025) and the side of 1 of the effect.

Step 3 rebuilds each network's four partitions with ``conv_edge="matrix_1_norm"`` and
``act_reduce="matrix_1_norm"`` (the original code's graph) and with the paper's definitions, with the
study's seeds, and prints the adjusted Rand index of each against the study's saved partition: the
paper's rebuild must give 1 (the study's partitions are reproducible), the original graph's says
how far rows 1-2 move the clusters that every test of the row is computed on. As a yardstick, the
paper's graph clustered with the next seed (spectral clustering at k = 16 is seed-sensitive: k-means
on the embedding finds different optima).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _side(v: float) -> str:
    return "n/a" if not np.isfinite(v) else (">1" if v > 1 else "<1" if v < 1 else "=1")


def comparison(study: Path) -> pd.DataFrame:
    """The study's rows (Benjamini-Hochberg within each table family) beside the paper's."""
    from modlens.report.paper import compare_with_paper
    from modlens.study.results import open_study

    return compare_with_paper(open_study(study).rows)


def run_times(study: Path) -> dict:
    """Tasks per kind with the wall seconds each took when it ran (cached tasks keep the seconds of
    the run that made them) and their CPU seconds where recorded."""
    record = json.loads((study / "study.json").read_text())
    out = {}
    for t in record["tasks"]:
        k = out.setdefault(t["kind"], {"tasks": 0, "seconds": 0.0, "cpu_seconds": 0.0, "cpu_tasks": 0, "ran_now": 0})
        k["tasks"] += 1
        k["seconds"] += float(t["seconds"])
        k["ran_now"] += not t["cached"]
        if t.get("cpu_seconds") is not None:
            k["cpu_seconds"] += float(t["cpu_seconds"])
            k["cpu_tasks"] += 1
    return out


def diagnostics(study: Path) -> str:
    """The counts behind the degenerate-metric flags (docs/fidelity.md section 4), summed over the
    study's networks, one line per partitioning and metric."""
    record = json.loads((study / "study.json").read_text())
    frames = [pd.read_parquet(study / "networks" / n["id"] / "summary.parquet") for n in record["networks"]]
    s = pd.concat(frames, ignore_index=True)
    s = s[s["family"] != "clusterability"]
    cols = ["n_saturated", "n_images", "n_unchanged", "n_lesions", "n_tied_pairs", "n_pairs"]
    g = s.groupby(["partitioning", "metric"], sort=False)[cols].sum()
    flags = s.groupby(["partitioning", "metric"], sort=False)["degenerate"].agg(
        lambda v: ", ".join(sorted({f for x in v if isinstance(x, str) for f in x.split(", ") if f})))
    lines = []
    for (part, metric), r in g.iterrows():
        lines.append(f"{study.name} {part} {metric}: tied pairs {r.n_tied_pairs}/{r.n_pairs}, unchanged lesions "
                     f"{r.n_unchanged}/{r.n_lesions}, saturated images {r.n_saturated}/{r.n_images}"
                     + (f"; flagged in some network: {flags[(part, metric)]}" if flags[(part, metric)] else ""))
    return "\n".join(lines)


def compare(paper: Path, original: Path) -> str:
    sets = {"paper definitions (paper-small)": comparison(paper), "original options (paper-original)": comparison(original)}
    names = list(sets)
    base = sets[names[0]]
    lines = ["| network | partitioning | metric | reported p | reported effect | reported sig. | " + " | ".join(
        f"{n.split(' (')[0]}: p | effect | sig. | agree sig. | agree side" for n in names) + " |",
        "|" + "---|" * (6 + 5 * len(names))]
    key = ["network_label", "k", "partitioning", "metric"]
    agree = {n: [0, 0, 0, []] for n in names}
    for r in base.itertuples(index=False):
        cells = [r.network_label, r.partitioning, r.metric, f"{r.paper_p:.3g}", f"{r.paper_effect:.3f} ± {r.paper_se:.3f}",
                 "yes" if r.paper_significant else "no"]
        for n in names:
            c = sets[n]
            row = c[(c[key[0]] == r.network_label) & (c["k"] == r.k) & (c["partitioning"] == r.partitioning)
                    & (c["metric"] == r.metric)]
            if row.empty:
                cells += ["", "", "", "", ""]
                continue
            row = row.iloc[0]
            sig_ok, side_ok = bool(row["agree_significance"]), bool(row["agree_side"])
            a = agree[n]
            a[0] += sig_ok
            a[1] += side_ok
            a[2] += 1
            if not (sig_ok and side_ok):
                a[3].append(f"{r.partitioning} {r.metric}" + ("" if sig_ok else " sig") + ("" if side_ok else " side"))
            cells += [f"{row['p_value']:.3g}", f"{row['effect']:.3f} ± {row['effect_se']:.3f}",
                      "yes" if row["significant"] else "no", "yes" if sig_ok else "**no**", "yes" if side_ok else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| options | significance agrees | side of 1 agrees | cells that disagree |", "|---|---|---|---|"]
    for n, (s, e, m, bad) in agree.items():
        lines.append(f"| {n} | {s}/{m} | {e}/{m} | {'; '.join(bad) or 'none'} |")
    lines += ["", "| study | kind | tasks | run in the last sitting | task wall s | task CPU s (tasks recorded) |",
              "|---|---|---:|---:|---:|---|"]
    for name, folder in (("paper-small", paper), ("paper-original", original)):
        for kind, k in run_times(folder).items():
            cpu = f"{k['cpu_seconds']:.0f} ({k['cpu_tasks']} of {k['tasks']})" if k["cpu_tasks"] else "not recorded"
            lines.append(f"| {name} | {kind} | {k['tasks']} | {k['ran_now']} | {k['seconds']:.0f} | {cpu} |")
    return "\n".join(lines + ["", diagnostics(paper), "", diagnostics(original)])


def switches(paper: Path, original: Path) -> str:
    """Which option moves which cell: the option sets of ``fidelity_mlp.VARIANTS`` (the paper's
    definitions, the original options, and one switch at a time) recomputed from the two studies'
    saved tables. Both studies lesion and visualize the same partitions (the paper's graph), so the
    original lesion metrics are paper-original's values of the same sets, and its visualizations are
    the original ones; ties and effect rules are applied by the statistics here."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fidelity_mlp import compare_summaries, summaries_of

    from modlens.report.paper import reported_results

    record = json.loads((paper / "study.json").read_text())
    data, labels = [], set()
    key = ["partitioning", "layer", "cluster", "kind", "draw", "neurons"]
    for net in record["networks"]:
        a, b = paper / "networks" / net["id"], original / "networks" / net["id"]
        les, orig = pd.read_parquet(a / "subclusters.parquet"), pd.read_parquet(b / "subclusters.parquet")
        if les[key].reset_index(drop=True).equals(orig[key].reset_index(drop=True)) is False:
            raise SystemExit(f"{net['id']}: the two studies did not lesion the same sets; switches needs the same partitions")
        vis = {"paper": pd.read_parquet(a / "visualizations.parquet"), "original": pd.read_parquet(b / "visualizations.parquet")}
        data.append((les.assign(network=net["id"]), orig.assign(network=net["id"]),
                     {k: v.assign(network=net["id"]) for k, v in vis.items()}))
        labels.add(net["label"])
    rep = reported_results()
    return compare_summaries(summaries_of(data), rep[rep["network"].isin(labels)])


def graph_options(study: Path, data_dir) -> str:
    from sklearn.metrics import adjusted_rand_score

    from modlens.analysis.result import read_result_manifest
    from modlens.analysis.stages import network_adapter, partition_one, stage_config
    from modlens.nn.io import load_model
    from modlens.study.commands import model_data

    record = json.loads((study / "study.json").read_text())
    lines = ["| network | partitioning | ARI, paper rebuilt | ARI, paper, next seed | ARI, rows 1-2 original | n-cut saved | "
             "n-cut rows 1-2 original |", "|---|---|---:|---:|---:|---:|---:|"]
    for net in record["networks"]:
        folder = study / "networks" / net["id"]
        cfg_record = read_result_manifest(folder, who="fidelity_study: ")["config"]["options"]
        saved = json.loads((folder / "partitions.json").read_text())
        model, manifest = load_model(study / net["model_dir"])
        (x, _), act = model_data(manifest, data_dir=data_dir)
        variants = {"paper": stage_config(cfg_record),
                    "seed": stage_config({**cfg_record, "random_state": int(cfg_record["random_state"]) + 1}),
                    "original": stage_config({**cfg_record, "conv_edge": "matrix_1_norm", "act_reduce": "matrix_1_norm"})}
        for name, p in saved.items():
            truth = np.concatenate([np.asarray(l) for l in p["labels"]])
            ari, ncut = {}, {}
            for v, cfg in variants.items():
                adapter = network_adapter(model, x, cfg)
                part = partition_one(adapter, p["method"], cfg, activation_data=act)
                ari[v] = adjusted_rand_score(truth, np.concatenate(part.labels))
                ncut[v] = part.ncut
            lines.append(f"| {net['id']} | {name} | {ari['paper']:.3f} | {ari['seed']:.3f} | {ari['original']:.3f} | "
                         f"{p['ncut']:.3f} | {ncut['original']:.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["compare", "switches", "graph-options"])
    p.add_argument("--paper", type=Path, help="the study run with the paper's definitions (paper-small)")
    p.add_argument("--original", type=Path, help="the same networks analysed by paper-original")
    p.add_argument("--study", type=Path, help="graph-options: the study whose partitions are rebuilt")
    p.add_argument("--data-dir", type=Path, default=None)
    a = p.parse_args(argv)
    if a.step in ("compare", "switches"):
        if a.paper is None or a.original is None:
            p.error(f"{a.step} needs --paper and --original")
        print(compare(a.paper, a.original) if a.step == "compare" else switches(a.paper, a.original))
    else:
        if a.study is None:
            p.error("graph-options needs --study")
        print(graph_options(a.study, a.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
