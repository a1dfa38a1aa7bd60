"""timm: and torchvision: models by name through modlens.load_model, modlens analyze and a study
spec (the zoo environment: timm and torchvision installed; run with ``pytest -m zoo``). Random
weights are seeded, pretrained weights come from the local cache only, and a missing cache, a
wrong name or a weights file that does not fit is one line that leaves nothing behind."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import modlens
from modlens.cli import main
from modlens.nn.io import sha256_file
from modlens.study.runner import run_study
from modlens.study.spec import load_spec

from model_helpers import assert_one_line_error, image_folder, save_weights, zoo_import

timm = zoo_import("timm")
torchvision = zoo_import("torchvision")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]

FAST = ["--n-clusters", "2", "--n-random", "1", "--partitionings", "weights/global"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("zoo") / "images", per_class=4, size=(36, 40))


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches: nothing pretrained is there, nothing is fetched."""
    import huggingface_hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_timm_model_by_name_random_and_from_a_weights_file(tmp_path):
    model, record = modlens.load_model("timm:test_resnet", model_args={"num_classes": 2}, init_seed=1)
    again, _ = modlens.load_model("timm:test_resnet", model_args={"num_classes": 2}, init_seed=1)
    other, _ = modlens.load_model("timm:test_resnet", model_args={"num_classes": 2}, init_seed=2)
    first = lambda m: next(iter(m.state_dict().values()))  # noqa: E731
    assert torch.equal(first(model), first(again)) and not torch.equal(first(model), first(other))
    pre = record["preprocessing"]
    assert (pre["size"], pre["resize"], pre["mean"]) == (160, 168, [0.5, 0.5, 0.5]) and "timm" in pre["from"]
    assert record["libraries"]["timm"] == timm.__version__ and record["n_classes"] == 2
    path = save_weights(tmp_path / "tr.safetensors", other.state_dict())
    loaded, rec = modlens.load_model("timm:test_resnet", path, model_args={"num_classes": 2})
    assert torch.equal(first(loaded), first(other)) and rec["weights"]["sha256"] == sha256_file(path)


def test_torchvision_pretrained_weights_come_from_the_cache_only(empty_caches, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        modlens.load_model("torchvision:resnet18", "pretrained")
    text = str(err.value)
    assert "resnet18-f37072fd.pth" in text and str(empty_caches / "torch-home") in text and "\n" not in text
    with pytest.raises(FileNotFoundError, match=r"looked in .*hf-cache.*timm/resnet18\.a1_in1k"):
        modlens.load_model("timm:resnet18", "pretrained")
    # a cached file is used as it is, and named in the record
    cached = empty_caches / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cached)
    model, record = modlens.load_model("torchvision:resnet18", "pretrained")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert record["weights"] == {"pretrained": True, "built_in": False, "file": str(cached),
                                 "sha256": sha256_file(cached)}
    assert record["preprocessing"]["size"] == 224 and record["preprocessing"]["resize"] == 256


@pytest.mark.parametrize("name, args, contains", [
    ("timm:test_resnett", [], "close names: test_resnet"),
    ("torchvision:resnet1888", [], "torchvision has no model 'resnet1888'"),
    ("timm:test_resnet", ["--weights", "{tmp}/none.safetensors"], "none.safetensors for timm:test_resnet does not exist"),
    ("torchvision:resnet18", ["--weights", "{tmp}/small.safetensors"], "do not fit the model"),
    ("torchvision:resnet18", ["--weights", "{tmp}/whole.pt"], "never unpickles"),
    ("torchvision:resnet18", ["--weights", "pretrained"], "not in the local cache"),
])
def test_zoo_errors_are_one_line_and_leave_nothing(tmp_path, capsys, images, empty_caches, name, args, contains):
    save_weights(tmp_path / "small.safetensors", torchvision.models.resnet18(num_classes=3).state_dict())
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "res"
    code = main(["analyze", name, *args, "--test-data", str(images), "--out", str(out), *FAST])
    assert_one_line_error(code, capsys.readouterr().err, out, contains=contains)


def test_timm_and_torchvision_through_analyze(tmp_path, capsys, images):
    out = tmp_path / "timm"
    code = main(["analyze", "timm:test_resnet", "--model-arg", "num_classes=2", "--test-data", str(images),
                 "--image-size", "48", "--resize", "52", "--out", str(out), *FAST])
    seen = capsys.readouterr()
    assert code == 0, seen.err
    manifest = json.loads((out / "manifest.json").read_text())
    source, data = manifest["models"][0]["source"], manifest["models"][0]["dataset"]["files"]
    assert source["name"] == "timm:test_resnet" and source["init_seed"] == 0 and source["model_args"] == {"num_classes": 2}
    # the given size wins; the mean and std come from timm's config of the model
    assert data["options"]["image_size"] == 48 and data["options"]["mean"] == [0.5, 0.5, 0.5]
    out = tmp_path / "tv"
    code = main(["analyze", "torchvision:resnet18", "--model-arg", "num_classes=2", "--test-data", str(images),
                 "--image-size", "32", "--resize", "36", "--out", str(out), *FAST])
    seen = capsys.readouterr()
    assert code == 0, seen.err
    summary = pd.read_parquet(out / "summary.parquet")
    assert set(summary["partitioning"]) == {"weights/global"}
    assert json.loads((out / "manifest.json").read_text())["models"][0]["source"]["kind"] == "torchvision"


def test_timm_and_torchvision_in_a_study_spec(tmp_path, images):
    save_weights(tmp_path / "tv.safetensors", torchvision.models.resnet18(num_classes=2).state_dict())
    spec = tmp_path / "zoo.toml"
    spec.write_text(f"""
name = "zoo"
[analysis]
n_clusters = [2]
n_random = 1
partitionings = ["weights/global"]
[[networks]]
group = "timm"
models = ["timm:test_resnet"]
model_args = {{ num_classes = 2 }}
test_data = "{images}"
image_size = 48
[[networks]]
group = "tv"
models = ["torchvision:resnet18"]
weights = ["tv.safetensors"]
model_args = {{ num_classes = 2 }}
test_data = "{images}"
image_size = 32
resize = 36
""")
    study = run_study(load_spec(spec), tmp_path / "study", executor="inline", progress=False)
    record = json.loads((study / "study.json").read_text())
    assert [n["id"] for n in record["networks"]] == ["timm", "tv"]
    assert record["networks"][1]["model_source"]["weights"]["sha256"] == sha256_file(tmp_path / "tv.safetensors")
    rows = pd.read_parquet(study / "study_rows.parquet")
    assert set(rows["group"]) == {"timm", "tv"}
