"""The MLP-MNIST row of the paper's Tables 4 and 5, measured with modlens, cell by cell.

    # 1. five networks and their analyses with the paper's definitions (modlens defaults)
    modlens train --dataset mnist --seed S --out RUNS/mlpS --data-dir DATA          # S = 0..4
    modlens analyze RUNS/mlpS --feature-vis --out RUNS/paper/mlpS --data-dir DATA    # S = 0..4
    # 2. the original code's visualizations on the same partitions and random sets
    python benchmarks/fidelity_mlp.py original-vis --runs RUNS --data-dir DATA
    # 3. the comparison table (markdown) from the saved tables and reported-results.csv
    python benchmarks/fidelity_mlp.py compare --runs RUNS --reported ../shared/paper/reported-results.csv

    # 4. (optional) check step 3's recomputation against real runs with the original options
    modlens analyze RUNS/mlpS --feature-vis --vis-original --accuracy balanced --class-range normalized \\
        --ties original --effect-rule original --out RUNS/original/mlpS --data-dir DATA
    python benchmarks/fidelity_mlp.py verify --runs RUNS

Step 3 needs no model and no data: it recomputes both summaries from the saved tables.

* **paper**: the analyses as saved (accuracy, range of class-wise drops, mid-rank ties, the
  paper's effect rule, pixel-parameterized visualizations, BH within each table).
* **original**: the original code's options on the same lesions and random sets: balanced
  accuracy and range / |mean change| recomputed from the saved per-class correct counts
  (``class_correct``; notes rows 9, 10), ties in favour of modularity (row 11), the original
  effect rules (row 14), and the original visualizations from step 2 (rows 7, 15, 16).
  ``modlens analyze ... --accuracy balanced --class-range normalized --ties original
  --effect-rule original --vis-original`` computes the same numbers in one run (it repeats
  every lesion).

Each networks' Fisher p values are combined by Bates over the 5 networks, as ``modlens analyze
DIR0 .. DIR4`` does. "agree" compares significance decisions (ours: BH at 0.05 within the
table; the paper's: its marking, p <= 0.025) and the side of 1 of the effect.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

NETS = [f"mlp{s}" for s in range(5)]  # --nets replaces it


def _load(runs: Path, net: str):
    d = runs / "paper" / net
    manifest = json.loads((d / "manifest.json").read_text())
    return d, manifest["config"]


def original_vis(runs: Path, data_dir) -> None:
    from modlens.core.partition import Partition
    from modlens.core.seeds import STREAM_RANDOM_SETS, as_generator, method_seed, root_from_record
    from modlens.experiments.feature_vis import ORIGINAL, feature_vis_test
    from modlens.nn import NetworkAdapter
    from modlens.nn.io import load_model
    from modlens.study.commands import model_data

    for net in NETS:
        d, cfg = _load(runs, net)
        out = d / "vis_original.parquet"
        if out.exists():
            continue
        model, manifest = load_model(runs / net)
        (x, _), _ = model_data(manifest, data_dir=data_dir)
        adapter = NetworkAdapter(model)
        root = root_from_record(cfg["random_state"])
        parts = json.loads((d / "partitions.json").read_text())
        tables = []
        for name, p in parts.items():
            part = Partition.from_labels(p["labels"], adapter.layer_names, adapter.layer_sizes, method=p["method"])
            res = feature_vis_test(adapter, part, tuple(x.shape[1:]), n_random=cfg["n_random"], name=name,
                                   random_state=as_generator(method_seed(root, name, STREAM_RANDOM_SETS)),
                                   value_range=(float(x.min()), float(x.max())), **ORIGINAL)
            tables.append(res.table)
        table = pd.concat(tables, ignore_index=True)
        table.insert(0, "network", net)
        table.to_parquet(out, index=False)
        print(f"{net}: {len(table)} original visualizations", file=sys.stderr, flush=True)


def _original_lesions(table: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    from modlens.experiments.lesion_test import lesion_metrics

    counts = np.array([[int(v) for v in s.split(",")] for s in table["class_correct"]])
    m = lesion_metrics(counts, np.asarray(cfg["baseline_counts"]), np.asarray(cfg["class_sizes"]),
                       accuracy="balanced", class_range="normalized")
    return table.assign(accuracy=m["accuracy"], acc_drop=m["acc_drop"], class_range=m["class_range"])


#: The option sets compared: the two of the issue, then one switch at a time from the paper's
#: definitions, to say which switch moves which cell.
VARIANTS = {
    "modlens (paper)": dict(lesion="paper", ties="mid", effect_rule="paper", vis="paper"),
    "original options": dict(lesion="original", ties="original", effect_rule="original", vis="original"),
    "rows 9-10 only": dict(lesion="original", ties="mid", effect_rule="paper", vis="paper"),
    "row 11 only": dict(lesion="paper", ties="original", effect_rule="paper", vis="paper"),
    "row 14 only": dict(lesion="paper", ties="mid", effect_rule="original", vis="paper"),
    "rows 7,15,16 only": dict(lesion="paper", ties="mid", effect_rule="paper", vis="original"),
    "rows 7,15,16 + 11": dict(lesion="paper", ties="original", effect_rule="paper", vis="original"),
    "rows 7,15,16 + 14": dict(lesion="paper", ties="mid", effect_rule="original", vis="original"),
}


def summaries(runs: Path, variants=None):
    data = []
    for net in NETS:
        d, cfg = _load(runs, net)
        les = pd.read_parquet(d / "subclusters.parquet").assign(network=net)
        vis = {"paper": pd.read_parquet(d / "visualizations.parquet").assign(network=net)}
        if (d / "vis_original.parquet").exists():
            vis["original"] = pd.read_parquet(d / "vis_original.parquet").assign(network=net)
        data.append((les, _original_lesions(les, cfg), vis))
    return summaries_of(data, variants)


def summaries_of(data, variants=None):
    """One pooled summary per option set (``VARIANTS``) from each network's ``(lesion table with the
    paper's metrics, the same lesions with the original metrics, {"paper": vis table, "original": vis
    table})``."""
    from modlens.analysis.diagnostics import add_diagnostics
    from modlens.analysis.statistics import LESION_METRICS, VIS_METRICS, subcluster_tests, summarize

    out = {}
    summaries.vis = {}
    for name, opt in (variants or VARIANTS).items():
        tests, lesions, vis = [], [], []
        for les, orig_les, v in data:
            table = orig_les if opt["lesion"] == "original" else les
            lesions.append(table)
            tests.append(subcluster_tests(table, metrics=LESION_METRICS, ties=opt["ties"], effect_rule=opt["effect_rule"]))
            if opt["vis"] in v:
                vis.append(v[opt["vis"]])
                tests.append(subcluster_tests(v[opt["vis"]], metrics=VIS_METRICS, ties=opt["ties"],
                                              effect_rule=opt["effect_rule"]))
        tests = pd.concat(tests, ignore_index=True)
        s = summarize(tests)
        add_diagnostics(s, pd.concat(lesions, ignore_index=True), pd.concat(vis, ignore_index=True) if vis else None, tests)
        out[name] = s
        summaries.vis[name] = vis
    return out


def _side(v: float) -> str:
    return "n/a" if not np.isfinite(v) else (">1" if v > 1 else "<1" if v < 1 else "=1")


def compare(runs: Path, reported: Path) -> str:
    rep = pd.read_csv(reported)
    return compare_summaries(summaries(runs), rep[rep["network"] == "MLP, MNIST"])


def compare_summaries(sums: dict, rep: pd.DataFrame) -> str:
    """The cell-by-cell table of the first two option sets beside the paper's rows ``rep``, the
    agreement counts of every option set, the diagnostic counts and the entropy quantiles."""
    main = list(sums)[:2]
    lines = ["| partitioning | metric | reported p | reported effect | reported sig. | " + " | ".join(
        f"{k}: p | effect | sig. | agree sig. | agree side | flags" for k in main) + " |"]
    lines.append("|" + "---|" * (5 + 6 * len(main)))
    agree = {k: [0, 0, 0, []] for k in sums}
    for r in rep.itertuples():
        cells = [r.partitioning, r.metric, f"{r.p_value:.3g}", f"{r.effect:.3f} ± {r.effect_se:.3f}",
                 "yes" if r.significant else "no"]
        for k, s in sums.items():
            row = s[(s["partitioning"] == r.partitioning) & (s["metric"] == r.metric)]
            if row.empty:
                if k in main:
                    cells += ["", "", "", "", "", ""]
                continue
            row = row.iloc[0]
            sig_ok = bool(row["significant"]) == bool(r.significant)
            side_ok = _side(row["effect"]) == _side(r.effect)
            agree[k][0] += sig_ok
            agree[k][1] += side_ok
            agree[k][2] += 1
            if not (sig_ok and side_ok):
                agree[k][3].append(f"{r.partitioning} {r.metric}" + ("" if sig_ok else " sig") + ("" if side_ok else " side"))
            if k in main:
                cells += [f"{row['p_value']:.3g}", f"{row['effect']:.3f} ± {row['effect_se']:.3f}",
                          "yes" if row["significant"] else "no", "yes" if sig_ok else "**no**",
                          "yes" if side_ok else "**no**", str(row.get("degenerate", "") or "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| options | significance agrees | side of 1 agrees | cells that disagree |", "|---|---|---|---|"]
    for k, (s, e, n, bad) in agree.items():
        lines.append(f"| {k} | {s}/{n} | {e}/{n} | {'; '.join(bad)} |")
    diag = []
    for k in main:
        for r in sums[k].itertuples():
            diag.append(f"{k} {r.partitioning} {r.metric}: tied pairs {r.n_tied_pairs}/{r.n_pairs}, unchanged lesions "
                        f"{r.n_unchanged}/{r.n_lesions}, saturated images {r.n_saturated}/{r.n_images}")
    ent = []
    for k in main:
        frames = summaries.vis.get(k)
        if not frames:
            continue
        v = pd.concat(frames, ignore_index=True)
        for part, g in v.groupby("partitioning", sort=False):
            e = g["softmax_entropy"].to_numpy(dtype=float)
            ent.append(f"{k} {part} softmax entropy ({e.size} images): median {np.median(e):.2e}, "
                       + ", ".join(f"< {t:g}: {np.mean(e < t):.3f}" for t in (1e-9, 1e-6, 1e-3, 1e-1)))
    return "\n".join(lines + [""] + diag + [""] + ent)


def verify(runs: Path) -> str:
    """Compare the recomputed original-options tests with those of a real run
    (``modlens analyze mlpS --accuracy balanced --class-range normalized --ties original
    --effect-rule original --vis-original --out RUNS/original/mlpS``): max abs differences."""
    from modlens.analysis.statistics import LESION_METRICS, VIS_METRICS, subcluster_tests

    out = []
    keys = ["partitioning", "layer", "cluster", "metric"]
    for net in NETS:
        d, cfg = _load(runs, net)
        real_dir = runs / "original" / net
        if not (real_dir / "tests.parquet").exists():
            out.append(f"{net}: no real run")
            continue
        real = pd.read_parquet(real_dir / "tests.parquet")
        les = _original_lesions(pd.read_parquet(d / "subclusters.parquet"), cfg)
        mine = [subcluster_tests(les, metrics=LESION_METRICS, ties="original", effect_rule="original")]
        if (d / "vis_original.parquet").exists():
            mine.append(subcluster_tests(pd.read_parquet(d / "vis_original.parquet"), metrics=VIS_METRICS,
                                         ties="original", effect_rule="original"))
        m = pd.concat(mine).merge(real, on=keys, suffixes=("", "_real"))
        diffs = {c: float(np.nanmax(np.abs(m[c] - m[c + "_real"]))) for c in ("value", "percentile", "effect")}
        out.append(f"{net}: {len(m)} of {len(real)} rows matched; max |diff| " +
                   ", ".join(f"{c} {v:.3g}" for c, v in diffs.items()))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("step", choices=["original-vis", "compare", "verify"])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--nets", nargs="+", default=None, help="network folders under RUNS/paper (default mlp0..mlp4)")
    p.add_argument("--reported", type=Path, default=Path(__file__).resolve().parents[2] / "shared/paper/reported-results.csv")
    a = p.parse_args(argv)
    if a.nets:
        NETS[:] = a.nets
    if a.step == "original-vis":
        original_vis(a.runs, a.data_dir)
    elif a.step == "verify":
        print(verify(a.runs))
    else:
        print(compare(a.runs, a.reported))
    return 0


if __name__ == "__main__":
    sys.exit(main())
