"""benchmarks/study_speed.py: the study runner and the per-network sequence, stage by stage, at toy size."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("study_speed", BENCH / "study_speed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_spec_is_the_mlp_mnist_group_of_paper_small(bench):
    from modlens.study.spec import load_spec

    spec = bench.study_spec(replicates=3, epochs=20)
    # the same spec as `modlens study run paper-small --groups mlp-mnist --replicates 3`
    assert spec == load_spec("paper-small", replicates=3, groups=["mlp-mnist"])
    (group,) = spec.networks
    assert (group.group, group.arch, group.dataset, group.seeds, group.recipe) == ("mlp-mnist", "mlp", "mnist", (0, 1, 2), {})
    assert spec.analysis.feature_vis and len(spec.analysis.partitionings) == 4 and spec.analysis.n_random == 19
    short = bench.study_spec(replicates=1, epochs=2, dataset="digits", n_random=3, vis_steps=5)
    assert short.networks[0].recipe == {"epochs": 2} and short.networks[0].dataset == "digits"
    assert short.analysis.n_random == 3 and short.analysis.vis_options == {"steps": 5}


def test_test_subsample_is_seeded_and_restored(bench):
    from modlens.study import commands as runs

    original = runs.model_data
    manifest = {"dataset": {"name": "digits", "data_seed": 0, "activation_split": {"split": "val"}}}
    (x_full, y_full), act_full = original(manifest)
    with bench.test_subsample(50):
        (x, y), act = runs.model_data(manifest)
        (x2, _), _ = runs.model_data(manifest)
    assert runs.model_data is original
    assert len(y) == 50 and (x == x2).all() and (act == act_full).all()
    # every kept image is one of the full test set's, with its label
    rows = {tuple(r): int(label) for r, label in zip(x_full.reshape(len(y_full), -1).tolist(), y_full.tolist())}
    assert all(rows[tuple(r)] == int(label) for r, label in zip(x.reshape(50, -1).tolist(), y.tolist()))


def test_both_paths_stage_table(bench, capsys):
    assert bench.main(["--dataset", "digits", "--replicates", "1", "--epochs", "1", "--n-random", "1",
                       "--vis-steps", "2", "--threads", "1", "--n-test", "100"]) == 0
    out, projected = capsys.readouterr().out.split("PROJECTED (not measured)")
    # a row per stage: seconds and share for each path where the path has that stage
    number = r"\s+(\d+\.\d)\s+(\d+\.\d)%"
    for label in ("training", "partitioning (4 ways)", "lesions", "feature visualization", "statistics + saving"):
        m = re.search(re.escape(label) + number + number, out)
        assert m, f"no row for {label!r} with both paths in:\n{out}"
    assert re.search(r"load model \+ data\s+-" + number, out)
    assert re.search(r"figure PNGs \(analyze only\)\s+-\s+\d+\.\d", out)
    assert re.search(r"outputs \+ runner overhead" + number + r"\s+-", out)
    study_total, network_total = map(float, re.search(r"\ntotal\s+(\d+\.\d)\s+(\d+\.\d)", out).groups())
    shares = [float(s) for s in re.findall(r"(\d+\.\d)%", out)]
    assert abs(sum(shares) - 200.0) < 1.0  # each path's shares add up to its total
    ratio = float(re.search(r"ratio per-network / study: (\d+\.\d+)x", out).group(1))
    # the totals are printed to 0.1 s and the ratio to 0.01: it must lie within their rounding
    low = (network_total - 0.05) / (study_total + 0.05) - 0.005
    high = (network_total + 0.05) / (study_total - 0.05) + 0.005
    assert low <= ratio <= high
    assert "trained models byte-identical between the paths: 1/1" in out
    assert re.search(r"projected ratio per-network / study: \d+\.\d+x", projected)


def test_projection_scales_each_stage_by_its_own_size(bench):
    stages = {"train": 2.0, "lesion": 3.0, "vis": 1.0, "outputs": 4.0, "figures": 0.5}
    got = bench.project(stages, replicates=2, epochs=2, n_test=2000)
    # to 5 replicates, 20 epochs, 10,000 images: x25 (training), x12.5 (lesions), x2.5, unchanged
    assert got == pytest.approx({"train": 50.0, "lesion": 37.5, "vis": 2.5, "outputs": 4.0, "figures": 1.25})
    assert bench.project(stages, replicates=5, epochs=20, n_test=10_000) == pytest.approx(stages)


def test_n_test_needs_the_inline_executor(bench):
    with pytest.raises(SystemExit):
        bench.main(["--dataset", "digits", "--executor", "processes", "--n-test", "10"])
