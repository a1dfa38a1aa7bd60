"""The reference language model (issue 18): recipe, deterministic training, saving, the lm-tiny study spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modlens.cli import main
from modlens.data import held_out_text, make_text_split
from modlens.experiments.train import ARCHS, recipe
from modlens.experiments.train_lm import next_token_scores, train_language_model, train_reference_lm
from modlens.nn.io import load_model
from modlens.nn.models import GPT_REFERENCE, build_model
from modlens.study.builtin import BUILTIN
from modlens.study.spec import SpecError, load_spec, spec_from_dict

SHARED = Path(os.environ.get("MODLENS_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
TINY = {"type": "gpt", "vocab_size": 128, "context": 16, "d_model": 16, "n_blocks": 2, "n_heads": 2, "d_mlp": 32}


@pytest.fixture(scope="module")
def corpus():
    streams = {"prose": b"The cat sat on the mat, and the dog sat on the log. " * 120,
               "code": b"def f(x):\n    return [x + i for i in range(10)]\n" * 120}
    return (make_text_split(streams, "train", context=16, seed=0, chunk_bytes=256),
            make_text_split(streams, "test", context=16, seed=0, chunk_bytes=256))


def test_the_gpt_recipe_and_architecture():
    assert "gpt" in ARCHS
    r = recipe({"type": "gpt"})
    assert r["steps"] == 400 and r["batch_size"] == 16 and r["context"] == 128
    assert GPT_REFERENCE == {"vocab_size": 128, "context": 128, "d_model": 128, "n_blocks": 4, "n_heads": 4, "d_mlp": 512}
    m = build_model({"type": "gpt"}, generator=torch.Generator().manual_seed(0))
    assert m.lm_head.weight is m.tok.weight and len(m.blocks) == 4 and m.blocks[0].fc.out_features == 512
    before = torch.random.get_rng_state()
    build_model(TINY, generator=torch.Generator().manual_seed(1))
    assert torch.equal(before, torch.random.get_rng_state())   # no draw from the global generator


def test_training_is_deterministic_for_a_seed_and_learns(corpus):
    train, test = corpus
    m1, info1 = train_reference_lm(TINY, train, test, seed=3, steps=60, batch_size=8, lr=1e-2)
    m2, info2 = train_reference_lm(TINY, train, test, seed=3, steps=60, batch_size=8, lr=1e-2)
    m3, _ = train_reference_lm(TINY, train, test, seed=4, steps=60, batch_size=8, lr=1e-2)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert not torch.equal(m1.blocks[0].fc.weight, m3.blocks[0].fc.weight)
    assert info1 == info2 and info1["train_loss_last"] < info1["train_loss_first"] - 1.0
    scores = next_token_scores(m1, torch.as_tensor(test.ids), torch.as_tensor(test.targets))
    assert scores["accuracy"] == pytest.approx(info1["test_accuracy"]) and scores["accuracy"] > 0.5
    with pytest.raises(ValueError, match="same shape"):
        train_language_model(m1, torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 15, dtype=torch.long), steps=1,
                             batch_size=2, lr=1e-3, warmup=0, weight_decay=0.0, seed=0)


@pytest.fixture
def text_root():
    if not (SHARED / "text" / "prose.txt").is_file():
        pytest.skip(f"text corpus not found under {SHARED}/text")
    return SHARED


def test_modlens_train_gpt_on_text_saves_a_language_model(text_root, tmp_path, capsys):
    out = tmp_path / "gpt"
    assert main(["train", "--arch", "gpt", "--dataset", "text", "--seed", "0", "--steps", "2", "--out", str(out),
                 "--data-dir", str(text_root)]) == 0
    assert "next-token accuracy" in capsys.readouterr().out
    model, manifest = load_model(out)
    assert manifest["task"] == "next-token" and manifest["training"]["steps"] == 2
    assert model.lm_head.weight is model.tok.weight      # the tied weight is stored once and tied again
    record = manifest["dataset"]
    assert record == {"name": "text", "data_seed": 0, "context": 128, "n_test": 16, "n_activation": 128,
                      "activation_split": {"split": "val"}}
    test, act = held_out_text(record, data_dir=text_root)
    assert test.ids.shape == (16, 128) and act.ids.shape == (128, 128)
    assert test.genre_counts() == {"prose": 8, "code": 8}
    with torch.no_grad():
        assert model(torch.as_tensor(test.ids[:2])).shape == (2, 128, 128)
    # modlens analyze reads the task and the held-out sequences from the manifest
    res_dir = tmp_path / "res"
    assert main(["analyze", str(out), "--out", str(res_dir), "--data-dir", str(text_root), "--partitionings",
                 "weights/global", "--n-clusters", "2", "--n-random", "1"]) == 0
    saved = json.loads((res_dir / "manifest.json").read_text())["config"]
    assert saved["task"] == "next-token" and saved["n_test_positions"] == 16 * 128  # the corpus gives every context its next byte
    assert "Label range" in capsys.readouterr().out
    assert main(["train", "--arch", "mlp", "--dataset", "text", "--seed", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--arch gpt" in capsys.readouterr().err


def test_the_lm_tiny_study_spec():
    spec = load_spec("lm-tiny")
    assert spec.analysis.config.task == "next-token" and spec.analysis.n_clusters == (8,)
    assert spec.analysis.config.feature_vis and len(spec.analysis.partitionings) == 4
    [g] = spec.networks
    assert g.arch == "gpt" and g.dataset == "text" and g.seeds == (0, 1, 2, 3, 4)
    assert "lm-tiny" in BUILTIN
    bad = {"name": "x", "networks": [{"group": "g", "arch": "mlp", "dataset": "text"}]}
    with pytest.raises(SpecError, match="arch gpt"):
        spec_from_dict(bad)
    bad = {"name": "x", "networks": [{"group": "g", "arch": "gpt", "dataset": "text", "epochs": 3}]}
    with pytest.raises(SpecError, match="epochs do"):
        spec_from_dict(bad)
    ok = spec_from_dict({"name": "x", "networks": [{"group": "g", "arch": "gpt", "dataset": "text", "steps": 5}]})
    assert ok.networks[0].recipe == {"steps": 5}
