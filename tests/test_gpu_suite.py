"""benchmarks/gpu_suite.py: refuses without a GPU in one line; every stage runs on the CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_suite", BENCH / "gpu_suite.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_without_a_gpu_in_one_line(suite, capsys):
    assert suite.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and "--tiny" in err
    assert suite.main(["--device", "cpu"]) == 2  # full sizes on a CPU: refused too
    assert "--tiny" in capsys.readouterr().err


def test_tiny_run_covers_every_stage_on_cpu(suite, capsys):
    results = suite.run("cpu", tiny=True)
    out = capsys.readouterr().out
    assert len(results) == 7 and all("peak" in r and r["wall_s"] >= 0 for r in results.values())
    lm = next(r for name, r in results.items() if name.startswith("next-token lesions"))
    assert lm["per_set_s"] > 0 and lm["projected_s"] == pytest.approx(lm["per_set_s"] * 4 * 16 * 3 * 20)
    lesion = [r for name, r in results.items() if name.startswith("lesions")]
    assert len(lesion) == 2 and all(r["plain_s"] > 0 and r["incremental_s"] > 0 and r["max_count_diff"] == 0 for r in lesion)
    vis = [r for name, r in results.items() if name.startswith("feature visualization")]
    assert len(vis) == 2 and all(r["batched_s"] > 0 and r["max_diff"] < 1e-3 for r in vis)
    spearman = next(r for name, r in results.items() if name.startswith("Spearman"))
    assert spearman["max_diff"] < 1e-10
    reps = next(r for name, r in results.items() if name.startswith("replicates"))
    assert reps["acc_together"] == pytest.approx(reps["acc_one_by_one"], abs=2 / 2000 + 1e-12)
    assert reps["max_param_diff"] < 1e-4
    assert "summary" in out and "TINY" in out
