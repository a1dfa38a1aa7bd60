"""Models from anywhere by name: pkg.module:factory with weights files and a Hugging Face folder,
through modlens.load_model, modlens analyze and a study spec; every wrong name or file is one line
that leaves no output behind; a changed weights file reruns exactly what depends on it."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

import modlens
from modlens.cli import main
from modlens.nn.io import sha256_file
from modlens.nn.sources import fit_weights, read_state_dict, resolve_model
from modlens.study.runner import run_study
from modlens.study.spec import load_spec

from model_helpers import (FAST, assert_one_line_error, factory_state, hf_folder, image_folder, save_weights,
                           user_package)

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """``mynets.models:make`` importable, and weights files of every kind."""
    root = user_package(tmp_path_factory.mktemp("user"))
    sys.path.insert(0, str(root))
    files = {"w0": save_weights(root / "w0.safetensors", factory_state(0)),
             "w1": save_weights(root / "w1.pt", factory_state(1)),
             "narrow": save_weights(root / "narrow.safetensors", factory_state(2, width=8))}
    whole = root / "whole.pt"
    sys.modules.pop("mynets.models", None)
    import mynets.models

    torch.save(mynets.models.make(), whole)  # a pickled module: not a state dict
    files["whole"] = whole
    yield root, files
    sys.path.remove(str(root))


def test_load_model_by_factory_name_with_weights(pkg):
    root, files = pkg
    model, record = modlens.load_model("mynets.models:make", files["w0"])
    assert torch.equal(model[1].weight, factory_state(0)["1.weight"]) and not model.training
    assert record["kind"] == "factory" and record["name"] == "mynets.models:make"
    assert record["weights"] == {"file": str(files["w0"].resolve()), "sha256": sha256_file(files["w0"])}
    # a PyTorch state dict (weights_only) loads the same way; the digest follows the weights
    _, other = modlens.load_model("mynets.models:make", files["w1"])
    assert other["digest"] != record["digest"]
    assert resolve_model("mynets.models:make", files["w0"]).digest == record["digest"]
    # no weights: random init from init_seed, repeatable, the global generator untouched
    state = torch.random.get_rng_state()
    a, rec_a = modlens.load_model("mynets.models:make", model_args={"width": 4}, init_seed=3)
    b, _ = modlens.load_model("mynets.models:make", model_args={"width": 4}, init_seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[1].weight, b[1].weight) and a[1].weight.shape == (4, 64)
    assert rec_a["init_seed"] == 3 and rec_a["weights"] is None and rec_a["model_args"] == {"width": 4}
    # a FILE.py:factory works without the package on sys.path
    by_file, _ = modlens.load_model(f"{root / 'mynets' / 'models.py'}:make", files["w0"])
    assert torch.equal(by_file[1].weight, model[1].weight)


def test_checkpoints_are_never_unpickled(pkg, tmp_path):
    _, files = pkg
    with pytest.raises(ValueError, match=r"pickled checkpoint holding .*Sequential.*weights_only=True") as err:
        read_state_dict(files["whole"])
    assert "\n" not in str(err.value)
    nested = save_weights(tmp_path / "ckpt.pt", {"state_dict": factory_state(0), "epoch": 3})
    assert set(read_state_dict(nested)) == set(factory_state(0))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    fit_weights(model, {"module.0.weight": torch.ones(2, 3), "module.0.bias": torch.zeros(2)}, "test")
    assert torch.equal(model[0].weight, torch.ones(2, 3))


def _analyze(args, out, capsys):
    code = main(["analyze", *args, "--out", str(out), *FAST])
    return code, capsys.readouterr()


def test_analyze_a_factory_with_weights_files(pkg, tmp_path, capsys):
    _, files = pkg
    out = tmp_path / "res"
    code, seen = _analyze(["mynets.models:make", "--weights", str(files["w0"]), str(files["w1"]),
                           "--test-data", "digits", "--activation-data", "digits"], out, capsys)
    assert code == 0, seen.err
    assert "Fisher-Bates p over 2 networks" in seen.out
    manifest = json.loads((out / "manifest.json").read_text())
    sources = [m["source"] for m in manifest["models"]]
    assert [s["weights"]["sha256"] for s in sources] == [sha256_file(files["w0"]), sha256_file(files["w1"])]
    assert {s["name"] for s in sources} == {"mynets.models:make"}
    assert manifest["models"][0]["dataset"]["files"]["test"] == "digits"
    assert set(pd.read_parquet(out / "subclusters.parquet")["network"]) == {"w0", "w1"}


@pytest.mark.parametrize("args, contains", [
    (["mynets.models:mak", "--weights", "{w0}"], "close names: make"),
    (["nosuch_pkg.models:make", "--weights", "{w0}"], "cannot import 'nosuch_pkg.models'"),
    (["mynets.models:make", "--weights", "{root}/missing.safetensors"], "missing.safetensors for mynets.models:make does not exist"),
    (["mynets.models:make", "--weights", "{narrow}"], "do not fit the model: tensors 5 of another shape"),
    (["mynets.models:make", "--weights", "{whole}"], "never unpickles"),
    (["mynets.models:make_number"], "returned an object of type int, not a torch.nn.Module"),
    (["mynets.models:make", "--weights", "pretrained"], "for timm: and torchvision: models"),
    (["mynets.models:make", "--weights", "{w0}", "--test-data", "nowhere"], "neither a folder"),
    (["mynets.models:make", "--weights", "{w0}", "--activation-data", "digits"], "without test data"),
])
def test_analyze_errors_are_one_line_and_leave_nothing(pkg, tmp_path, capsys, args, contains):
    root, files = pkg
    names = {k: str(v) for k, v in files.items()}
    args = [a.format(root=root, **names) for a in args]
    if "--test-data" not in args and "--activation-data" not in args:
        args += ["--test-data", "digits"]
    out = tmp_path / "res"
    code, seen = _analyze(args, out, capsys)
    assert_one_line_error(code, seen.err, out, contains=contains)


SPEC = """
name = "mine"
[analysis]
n_clusters = [3]
n_random = 2
partitionings = ["weights/global", "activations/global"]
[[networks]]
group = "mine"
models = ["mynets.models:make"]
weights = ["w0.safetensors", "w1.pt"]
test_data = "digits"
activation_data = "digits"
"""


def _tasks(study):
    return json.loads((study / "study.json").read_text())["tasks"]


def test_study_of_factory_weights_reruns_exactly_what_a_changed_file_feeds(pkg, tmp_path, capsys):
    root, files = pkg
    work = tmp_path / "work"
    work.mkdir()
    for name in ("w0.safetensors", "w1.pt"):
        (work / name).write_bytes((root / name).read_bytes())
    (work / "mine.toml").write_text(SPEC)
    study = tmp_path / "study"
    args = ["study", "run", str(work / "mine.toml"), "--out", str(study), "--executor", "inline", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((study / "study.json").read_text())
    assert [n["id"] for n in record["networks"]] == ["mine-w0", "mine-w1"]
    assert record["networks"][1]["model_source"]["weights"]["sha256"] == sha256_file(work / "w1.pt")
    saved = json.loads((study / "networks" / "mine-w0" / "manifest.json").read_text())["models"][0]["source"]
    assert saved["name"] == "mynets.models:make" and saved["weights"]["file"] == str((work / "w0.safetensors").resolve())
    assert not any(t["cached"] for t in _tasks(study))
    before = {n: (study / "networks" / n / "tests.parquet").read_bytes() for n in ("mine-w0", "mine-w1")}
    save_weights(work / "w1.pt", factory_state(7))  # a changed checkpoint
    assert main(args) == 0, capsys.readouterr().err
    ran = sorted(t["task"] for t in _tasks(study) if not t["cached"])
    assert ran == sorted([f"{kind}:mine-w1:{m}" for kind in ("partition", "lesion")
                          for m in ("weights/global", "activations/global")] + ["stats:mine-w1"])
    assert (study / "networks" / "mine-w0" / "tests.parquet").read_bytes() == before["mine-w0"]
    assert (study / "networks" / "mine-w1" / "tests.parquet").read_bytes() != before["mine-w1"]
    # moving the files changes nothing that a task depends on
    moved = tmp_path / "moved"
    work.rename(moved)
    assert main(["study", "run", str(moved / "mine.toml"), "--out", str(study), "--executor", "inline",
                 "--no-progress"]) == 0
    assert not [t for t in _tasks(study) if not t["cached"]]


@pytest.mark.parametrize("change, contains", [
    (("mynets.models:make", "mynets.models:mak"), "close names: make"),
    (('"w1.pt"', '"gone.pt"'), "gone.pt for mynets.models:make does not exist"),
    (('"w1.pt"', '"narrow.safetensors"'), "do not fit the model"),
    (('"w1.pt"', '"whole.pt"'), "never unpickles"),
    (('test_data = "digits"', 'test_data = "nowhere"'), "neither a folder"),
])
def test_study_errors_are_one_line_and_leave_nothing(pkg, tmp_path, capsys, change, contains):
    root, _ = pkg
    spec = root / f"bad-{abs(hash(change))}.toml"
    spec.write_text(SPEC.replace(*change))
    out = tmp_path / "study"
    code = main(["study", "run", str(spec), "--out", str(out), "--executor", "inline", "--no-progress"])
    line = assert_one_line_error(code, capsys.readouterr().err, out, contains=contains)
    assert "group 'mine'" in line


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    return hf_folder(root / "tiny-resnet"), image_folder(root / "images")


def test_hf_folder_through_load_model_analyze_and_a_study(hf_model, tmp_path, capsys):
    import transformers

    folder, images = hf_model
    model, record = modlens.load_model(f"hf:{folder}")
    reference = transformers.ResNetForImageClassification.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model(x).logits, reference(x).logits)
    assert record["kind"] == "hf" and record["input_name"] == "pixel_values" and record["n_classes"] == 2
    assert record["preprocessing"]["size"] == 16 and record["preprocessing"]["resize"] == 18
    out = tmp_path / "res"
    code = main(["analyze", f"hf:{folder}", "--test-data", str(images), "--activation-data", str(images),
                 "--out", str(out), "--n-clusters", "2", "--n-random", "2"])
    seen = capsys.readouterr()
    assert code == 0, seen.err
    assert "preprocessing from" in seen.err and "4 examples" in seen.err  # half of each class for the test set
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["options"]["input_name"] == "pixel_values"
    source = manifest["models"][0]["source"]
    assert source["weights"]["files"] == ["model.safetensors"] and source["preprocessing"]["mean"] == [0.5] * 3
    assert manifest["models"][0]["dataset"]["files"]["options"]["image_size"] == 16
    spec = tmp_path / "hf.toml"
    spec.write_text(f'name = "hf"\n[analysis]\nn_clusters = [2]\nn_random = 2\npartitionings = ["weights/global"]\n'
                    f'[[networks]]\ngroup = "tiny"\nmodels = ["hf:{folder}"]\ntest_data = "{images}"\n'
                    f'activation_data = "{images}"\nper_class = 2\n')
    study = run_study(load_spec(spec), tmp_path / "study", executor="inline", progress=False)
    rows = pd.read_parquet(study / "study_rows.parquet")
    assert set(rows["partitioning"]) == {"weights/global"} and (rows["group"] == "tiny").all()


def test_hf_errors(hf_model, tmp_path, capsys):
    folder, images = hf_model
    for args, contains in ([f"hf:{tmp_path / 'nofolder'}"], "neither a folder nor a hub id"), \
                          ([f"hf:{folder}", "--weights", "pretrained"], "drop --weights pretrained"):
        code = main(["analyze", *args, "--test-data", str(images), "--out", str(tmp_path / "r")])
        assert_one_line_error(code, capsys.readouterr().err, tmp_path / "r", contains=contains)
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((folder / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"pickle")
    code = main(["analyze", f"hf:{bin_only}", "--test-data", str(images), "--out", str(tmp_path / "r")])
    assert_one_line_error(code, capsys.readouterr().err, tmp_path / "r", contains="never unpickles")


def test_hf_language_model_folder_with_the_next_token_task_from_token_files(tmp_path, capsys):
    """A causal language model by name, analysed on the next-token task from .npz files of token ids
    (no labels: every position is scored against the next token), through analyze and a study."""
    transformers = pytest.importorskip("transformers")
    import numpy as np

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "gpt"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", input_ids=rng.integers(0, 32, size=(24, 10)))
    np.savez(tmp_path / "act.npz", input_ids=rng.integers(0, 32, size=(16, 10)))
    out = tmp_path / "res"
    code = main(["analyze", f"hf:{folder}", "--task", "next-token", "--test-data", str(tmp_path / "test.npz"),
                 "--activation-data", str(tmp_path / "act.npz"), "--out", str(out), *FAST])
    seen = capsys.readouterr()
    assert code == 0, seen.err
    summary = pd.read_parquet(out / "summary.parquet")
    assert "ce_increase" in set(summary["metric"])
    assert json.loads((out / "manifest.json").read_text())["config"]["task"] == "next-token"
    spec = tmp_path / "lm.toml"
    spec.write_text(f'name = "lm"\n[analysis]\ntask = "next-token"\nn_clusters = [3]\nn_random = 2\n'
                    f'partitionings = ["weights/global", "activations/global"]\n[[networks]]\ngroup = "gpt"\n'
                    f'models = ["hf:{folder}"]\ntest_data = "{tmp_path / "test.npz"}"\n'
                    f'activation_data = "{tmp_path / "act.npz"}"\n')
    study = run_study(load_spec(spec), tmp_path / "study", executor="inline", progress=False)
    rows = pd.read_parquet(study / "study_rows.parquet")
    assert "ce_increase" in set(rows["metric"]) and set(rows["partitioning"]) == {"weights/global", "activations/global"}
