"""A language-model study through the runner (issue 18): train, partition, next-token lesions, the
top-positions test, statistics, tables and report; small settings of the lm-tiny spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from modlens.analysis.statistics import TASK_METRICS
from modlens.study.runner import run_study
from modlens.study.spec import spec_from_dict

SHARED = Path(os.environ.get("MODLENS_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def lm_study(tmp_path_factory):
    if not (SHARED / "text" / "prose.txt").is_file():
        pytest.skip(f"text corpus not found under {SHARED}/text")
    raw = {"name": "lm-small", "analysis": {"task": "next-token", "n_clusters": 2, "n_random": 2, "feature_vis": True,
                                            "partitionings": ["weights/global", "activations/local"]},
           "networks": [{"group": "gpt-text", "label": "GPT, text", "arch": "gpt", "dataset": "text", "steps": 2,
                         "replicates": 2}]}
    spec = spec_from_dict(raw, source="lm-small")
    return run_study(spec, tmp_path_factory.mktemp("lm") / "study", data_dir=SHARED, progress=False)


def test_a_language_model_study_runs_every_task(lm_study):
    rows = pd.read_parquet(lm_study / "study_rows.parquet")
    metrics = TASK_METRICS["next-token"]
    want = [m for m in (*metrics["lesion"], *metrics["visualization"])]
    assert set(rows["metric"]) == set(want) and set(rows["n_networks"]) == {2}
    assert dict(zip(rows["metric"], rows["table_family"]))["top_concentration"] == "vis"
    study = json.loads((lm_study / "study.json").read_text())
    assert {t["kind"] for t in study["tasks"]} == {"train", "partition", "lesion", "vis", "stats"}
    net = json.loads((lm_study / "networks" / "gpt-text-s0" / "manifest.json").read_text())["config"]
    assert net["task"] == "next-token" and net["options"]["task"] == "next-token"
    lesions = pd.read_parquet(lm_study / "networks" / "gpt-text-s0" / "subclusters.parquet")
    # cells: (5 byte classes + none) x (2 genres + none); the 16 test sequences are 8 prose, 8 code
    cells = [list(map(int, c.split(","))) for c in lesions["class_correct"]]
    assert {len(c) for c in cells} == {18} and lesions["label_range"].notna().all()
    html = (lm_study / "report.html").read_text()
    assert "CE increase" in html and "Label range" in html and "Top-position KL" in html
    assert (lm_study / "tables").is_dir()
