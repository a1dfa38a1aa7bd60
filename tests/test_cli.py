"""The command line, end to end, on embedded digits and on real MNIST when present."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from modlens.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


def test_demo_prints_the_table(capsys, tmp_path):
    code = main(["demo", "--epochs", "15", "--n-random", "3", "--n-clusters", "8", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr()
    assert code == 0
    for method in ("weights/global", "weights/local", "activations/global", "activations/local"):
        assert method in out.out
    assert "Acc. drop" in out.out and "Class range" in out.out and "±" in out.out
    assert "lesions weights/global" in out.err  # progress is shown
    summary = pd.read_csv(tmp_path / "demo" / "summary.csv")
    assert set(summary.columns) >= {"partitioning", "metric", "p_value", "effect", "effect_se", "n_subclusters"}
    assert len(summary) == 8


def test_train_then_analyze_digits_replicates(tmp_path, capsys):
    for seed in (0, 1):
        assert main(["train", "--dataset", "digits", "--seed", str(seed), "--epochs", "10", "--out", str(tmp_path / f"m{seed}")]) == 0
    manifest = json.loads((tmp_path / "m0" / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "digits" and manifest["seed"] == 0
    assert manifest["architecture"]["sizes"] == [64, 256, 256, 256, 256, 10]
    assert 0 < manifest["accuracy"] <= 1 and manifest["modlens_version"]
    code = main(["analyze", str(tmp_path / "m0"), str(tmp_path / "m1"), "--out", str(tmp_path / "res"),
                 "--n-random", "3", "--n-clusters", "8", "--partitionings", "weights/global", "activations/local"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Fisher-Bates p over 2 networks" in out
    summary = pd.read_parquet(tmp_path / "res" / "summary.parquet")
    assert list(summary["n_networks"]) == [2, 2, 2, 2]
    tidy = pd.read_parquet(tmp_path / "res" / "subclusters.parquet")
    assert set(tidy["network"]) == {"m0", "m1"}
    meta = json.loads((tmp_path / "res" / "manifest.json").read_text())
    assert [m["seed"] for m in meta["models"]] == [0, 1]


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MODLENS_DATA", str(tmp_path / "nodata"))
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code = main(["train", "--dataset", "mnist", "--seed", "0", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("modlens: error:") and str(tmp_path / "nodata") in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    code = main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert code == 2 and not (tmp_path / "r").exists()


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "modlens.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "analyze" in proc.stdout


def test_mnist_train_and_analyze(shared_data, tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--seed", "0", "--epochs", "1", "--data-dir", str(shared_data),
                 "--out", str(tmp_path / "mlp")])
    assert code == 0
    manifest = json.loads((tmp_path / "mlp" / "manifest.json").read_text())
    assert manifest["architecture"]["sizes"] == [784, 256, 256, 256, 256, 10]
    assert manifest["accuracy"] > 0.9
    assert manifest["dataset"]["activation_split"]["n_val"] == 5000
    code = main(["analyze", str(tmp_path / "mlp"), "--data-dir", str(shared_data), "--out", str(tmp_path / "res"),
                 "--n-random", "2", "--partitionings", "weights/global", "activations/global"])
    assert code == 0
    tidy = pd.read_parquet(tmp_path / "res" / "subclusters.parquet")
    assert tidy["size"].between(2, 255).all()


def test_correlation_maps_command(tmp_path, capsys):
    assert main(["train", "--dataset", "halves-digits", "--seed", "0", "--epochs", "10", "--out", str(tmp_path / "h")]) == 0
    code = main(["correlation-maps", str(tmp_path / "h"), "--out", str(tmp_path / "fig.png"), "--n-clusters", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "half preference" in out
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "fig.png")
    assert img.ndim == 3 and img.shape[0] > 50


def test_demo_with_feature_vis(tmp_path, capsys):
    code = main(["demo", "--epochs", "5", "--n-random", "2", "--n-clusters", "8", "--feature-vis", "--vis-steps", "5",
                 "--out", str(tmp_path / "d")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Vis score" in out and "Softmax H" in out
    meta = json.loads((tmp_path / "d" / "manifest.json").read_text())
    pngs = [f for f in meta["files"] if f.endswith(".png")]
    assert pngs and all((tmp_path / "d" / f).exists() for f in pngs)


def test_train_small_cnn(tmp_path, capsys):
    code = main(["train", "--dataset", "digits", "--arch", "cnn", "--seed", "0", "--epochs", "2", "--out", str(tmp_path / "c")])
    assert code == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["architecture"]["type"] == "cnn"
    assert main(["train", "--dataset", "digits", "--arch", "cnn", "--no-regularization", "--seed", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "VGG" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_analyze_saved_cnn_with_feature_vis(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--arch", "cnn", "--seed", "0", "--epochs", "2", "--out", str(tmp_path / "c")]) == 0
    code = main(["analyze", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--n-random", "2", "--n-clusters", "4",
                 "--partitionings", "weights/global", "activations/global", "--feature-vis", "--vis-steps", "3"])
    assert code == 0
    summary = pd.read_parquet(tmp_path / "r" / "summary.parquet")
    assert set(summary["metric"]) == {"acc_drop", "class_range", "vis_score", "softmax_entropy"}
    parts = json.loads((tmp_path / "r" / "partitions.json").read_text())
    assert all(len(p["labels"]) == 3 for p in parts.values())  # the small CNN's three conv layers
