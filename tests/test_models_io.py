"""Reference architectures and safetensors + manifest save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import modlens
from modlens.nn import io as mio
from modlens.nn.io import load_model, save_model
from modlens.nn.models import ACTIVATIONS, PAPER_MLP_HIDDEN, build_model, mlp

ARCH = {"type": "mlp", "sizes": [12, 8, 8, 3], "activation": "relu"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _saved(tmp_path, seed=0):
    model = build_model(ARCH, generator=_gen(seed))
    directory = save_model(model, tmp_path / "m", {"architecture": ARCH, "seed": seed})
    return model, directory


# ---- models ---------------------------------------------------------------------------------

def test_mlp_structure():
    model = mlp([784, *PAPER_MLP_HIDDEN, 10], generator=_gen(0))
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten"] + ["Linear", "ReLU"] * 4 + ["Linear"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert PAPER_MLP_HIDDEN == (256, 256, 256, 256)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_not_inplace(name):
    model = mlp([4, 5, 2], name, generator=_gen(0))
    act = model[2]
    assert not getattr(act, "inplace", False)
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_glorot_bounds_and_zero_biases():
    model = mlp([300, 200, 10], generator=_gen(1))
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.95 * bound  # actually spans the range
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
        assert torch.count_nonzero(layer.bias) == 0


def test_seeded_init_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = mlp([20, 16, 4], generator=_gen(7)).state_dict()
    b = mlp([20, 16, 4], generator=_gen(7)).state_dict()
    c = mlp([20, 16, 4], generator=_gen(8)).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


@pytest.mark.parametrize(
    "arch, match",
    [
        ({"type": "resnet"}, "resnet"),
        ({"type": "mlp", "sizes": [4, 2], "width": 3}, "width"),
        ({"type": "mlp"}, "sizes"),
        ({"type": "mlp", "sizes": [4, 2], "activation": "swish"}, "swish"),
        ({"type": "mlp", "sizes": [4]}, "sizes"),
    ],
)
def test_build_model_rejects_bad_specs(arch, match):
    with pytest.raises(ValueError, match=match):
        build_model(arch)


# ---- io -------------------------------------------------------------------------------------

def test_round_trip_identical_outputs(tmp_path):
    model, directory = _saved(tmp_path)
    loaded, manifest = load_model(directory)
    assert not loaded.training
    x = torch.randn(5, 12)
    assert torch.equal(model(x), loaded(x))
    assert manifest["format"] == "modlens-model" and manifest["format_version"] == 1
    assert manifest["modlens_version"] == modlens.__version__
    assert manifest["seed"] == 0 and manifest["architecture"] == ARCH
    text = (directory / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.safetensors"]
    # a file inside the directory is accepted too
    assert torch.equal(load_model(directory / "model.safetensors")[0](x), model(x))


def test_corrupted_weights_sha_error(tmp_path):
    _, directory = _saved(tmp_path)
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*SHA-256.*re-save"):
        load_model(directory)


def test_manifest_with_wrong_shape(tmp_path):
    _, directory = _saved(tmp_path)
    mpath = directory / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["architecture"]["sizes"] = [12, 9, 8, 3]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as info:
        load_model(directory)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'1.weight'" in msg and "(8, 12)" in msg and "(9, 12)" in msg


def test_manifest_with_missing_layer(tmp_path):
    _, directory = _saved(tmp_path)
    mpath = directory / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["architecture"]["sizes"] = [12, 8, 3]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_model(directory)


def test_bad_format_and_version(tmp_path):
    _, directory = _saved(tmp_path)
    mpath = directory / "manifest.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version"):
        load_model(directory)
    mpath.write_text(json.dumps({**manifest, "format": "keras"}))
    with pytest.raises(ValueError, match="keras"):
        load_model(directory)


def test_nan_weights_name_the_tensor(tmp_path):
    model = build_model(ARCH, generator=_gen(0))
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    directory = save_model(model, tmp_path / "m", {"architecture": ARCH})
    with pytest.raises(ValueError, match=r"'3\.weight'.*NaN"):
        load_model(directory)


def test_save_rejects_mismatched_architecture(tmp_path):
    model = build_model(ARCH, generator=_gen(0))
    with pytest.raises(ValueError, match=r"'1\.weight'"):
        save_model(model, tmp_path / "m", {"architecture": {**ARCH, "sizes": [12, 4, 8, 3]}})
    with pytest.raises(ValueError, match="architecture"):
        save_model(model, tmp_path / "m", {"seed": 0})
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("fail_at", ["save_file", "sha", "replace"])
def test_no_partial_files_when_saving_fails(tmp_path, monkeypatch, fail_at):
    model = build_model(ARCH, generator=_gen(0))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if fail_at == "save_file":
        real = mio.save_file

        def half_write(state, filename, *a, **k):  # write something, then fail
            real(state, filename)
            raise OSError("disk full")

        monkeypatch.setattr(mio, "save_file", half_write)
    elif fail_at == "sha":
        monkeypatch.setattr(mio, "sha256_file", boom)
    else:
        real_replace = mio.os.replace
        calls = []

        def second_fails(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("disk full")
            real_replace(src, dst)

        monkeypatch.setattr(mio.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "m", {"architecture": ARCH})
    assert not (tmp_path / "m").exists()  # the directory it created is removed again, nothing left


def test_existing_directory_failure_leaves_old_model(tmp_path, monkeypatch):
    model, directory = _saved(tmp_path)
    monkeypatch.setattr(mio, "sha256_file", lambda p: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(build_model(ARCH, generator=_gen(1)), directory, {"architecture": ARCH})
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.safetensors"]
    x = torch.randn(2, 12)
    assert torch.equal(load_model(directory)[0](x), model(x))


@pytest.mark.parametrize("name", ["net.pt", "net.pth"])
def test_pickle_path_explains_conversion(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match=r"safetensors.*weights_only=True.*save_model"):
        load_model(path)
    # a directory holding only a checkpoint gets the same explanation
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_model(tmp_path / "nope")


def test_never_unpickles(tmp_path, monkeypatch):
    _, directory = _saved(tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", forbidden)
    load_model(directory)
