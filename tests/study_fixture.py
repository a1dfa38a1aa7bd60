"""A small study folder built with the real analyze on tiny digits MLPs (no study runner):
networks/<id>/ saved with save_result, study_rows.parquet made with combine, study.json."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pandas as pd
import torch

from modlens.analysis import analyze, combine, save_result
from modlens.analysis.statistics import table_family
from modlens.data import load_dataset


def tiny_digits_mlp(seed: int, epochs: int = 20) -> torch.nn.Module:
    train = load_dataset("digits", "train")
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y).long()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


GROUPS = {  # group -> (paper label, seeds); "MLP, MNIST" makes the paper comparison appear
    "mlp-mnist": ("MLP, MNIST", (0, 1)),
    "mlp-digits": ("MLP, digits", (2, 3)),
}


def build_study(root: Path, *, ks=(16,), feature_vis: bool = True, n_random: int = 3) -> Path:
    root = Path(root)
    test, val = load_dataset("digits", "test"), load_dataset("digits", "val")
    data = (torch.from_numpy(test.x), torch.from_numpy(test.y).long())
    rows, networks, timings = [], [], []
    trained = {}  # two trained models serve all groups (seed parity); analysis seeds differ
    for group, (label, seeds) in GROUPS.items():
        for s in seeds:
            if s % 2 not in trained:
                trained[s % 2] = tiny_digits_mlp(s % 2)
        models = {s: trained[s % 2] for s in seeds}
        for k in ks:
            results, names = [], []
            for s in seeds:
                res = analyze(models[s], data, activation_data=torch.from_numpy(val.x), n_clusters=k, n_random=n_random,
                              random_state=s, feature_vis=feature_vis, vis_options={"steps": 8})
                nid = f"{group}-s{s}" + ("" if len(ks) == 1 else f"-k{k}")
                if len(ks) == 1 or k == ks[-1]:
                    # images (and the slow per-network grids) only for the first network of a group,
                    # which is all Figure 7 draws; the others keep their visualization tables
                    keep = s == seeds[0]
                    # analyze's own PNG grids (slow, tested elsewhere) for one network only; the study
                    # runner too can leave them out
                    grids = contextlib.nullcontext() if nid == "mlp-mnist-s0" else mock.patch(
                        "modlens.analysis.figures.save_vis_grids", return_value=[])
                    with grids:
                        save_result(res if keep else replace(res, vis_results=[]), root / "networks" / nid)
                    networks.append({"id": nid, "group": group, "label": label, "k": k, "train_seed": s % 2,
                                     "random_state": s})
                timings.append({"task": f"analyze {nid} k={k}", "seconds": round(res.config["seconds"], 3)})
                results.append(res)
                names.append(nid)
            summary = combine(results, names).summary
            rows.append(pd.DataFrame({
                "table_family": [table_family(m) for m in summary["metric"]], "group": group, "network_label": label,
                "k": k, "partitioning": summary["partitioning"], "metric": summary["metric"],
                "p_value": summary["p_value"], "effect": summary["effect"], "effect_se": summary["effect_se"],
                "n_networks": summary["n_networks"], "n_subclusters": summary["n_subclusters"]}))
    pd.concat(rows, ignore_index=True).to_parquet(root / "study_rows.parquet", index=False)
    # the layout `modlens study run` writes: networks as a list of records, timings under "tasks"
    study = {"format": "modlens-study", "name": "test-study",
             "spec": {"name": "test-study", "analysis": {"k": list(ks), "n_random": n_random, "alpha": 0.05}},
             "versions": {"modlens": "test", "torch": torch.__version__}, "tasks": timings, "networks": networks,
             "executor": "inline", "seconds": 1.0}
    (root / "study.json").write_text(json.dumps(study, indent=2))
    return root
