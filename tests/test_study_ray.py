"""The study on a local Ray instance gives the tables of the inline run."""

import json

import pytest

from modlens.study.runner import run_study
from modlens.study.spec import load_spec

from study_helpers import assert_same_tables, write_spec

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def test_tiny_study_on_ray_matches_inline(tmp_path):
    pytest.importorskip("ray")
    spec = load_spec(write_spec(tmp_path))
    inline = run_study(spec, tmp_path / "inline", progress=False)
    on_ray = run_study(spec, tmp_path / "ray", executor="ray", workers=2, progress=False)
    assert_same_tables(inline, on_ray)
    assert json.loads((on_ray / "study.json").read_text())["executor"] == "ray"
