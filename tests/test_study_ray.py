"""The `digits` study on a local Ray instance gives the tables of the inline run (what CI runs)."""

import json

import pytest

from modlens.study.runner import run_study
from modlens.study.spec import load_spec

from study_helpers import assert_same_tables

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def test_digits_study_on_ray_matches_inline(tmp_path):
    pytest.importorskip("ray")
    spec = load_spec("digits")
    on_ray = run_study(spec, tmp_path / "ray", executor="ray", workers=2, progress=False)
    inline = run_study(spec, tmp_path / "inline", progress=False)
    assert_same_tables(inline, on_ray)
    record = json.loads((on_ray / "study.json").read_text())
    assert record["executor"] == "ray" and len(record["networks"]) == 3
    assert not any(t["cached"] for t in record["tasks"])
