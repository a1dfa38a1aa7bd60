"""Shared by the tests of models by name: a user's package with a model factory, weights files of
every kind, a small image folder and a tiny Hugging Face folder, and the check that an error is
one line that leaves nothing behind."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

def zoo_import(name: str):
    """Import a zoo library (timm, torchvision) for a test marked ``zoo``: skipped where it is not
    installed, but an error where ``MODLENS_REQUIRE_ZOO`` is set (CI's zoo step), so that a broken
    zoo environment cannot pass by skipping every zoo test."""
    import pytest

    if os.environ.get("MODLENS_REQUIRE_ZOO"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (the zoo extra; CI runs these in .venv-zoo)")


FACTORY = '''
from torch import nn


def make(width=16, n_classes=10):
    """A small MLP for the 8x8 digits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, n_classes))


NOT_A_MODEL = 3


def make_number():
    return 3
'''

#: The fast analysis of the tests (a few seconds on digits).
FAST = ["--n-clusters", "3", "--n-random", "2", "--partitionings", "weights/global", "activations/global"]


def user_package(root: Path) -> Path:
    """``root/mynets/models.py`` with ``make``; returns ``root`` (put it on sys.path)."""
    pkg = Path(root) / "mynets"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORY)
    return Path(root)


def factory_state(seed: int, width: int = 16) -> dict:
    """The state dict of ``mynets.models.make(width)`` with weights drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, width), (width, width), (width, 10)]
    state = {}
    for i, (n_in, n_out) in zip((1, 3, 5), sizes):
        state[f"{i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        state[f"{i}.bias"] = torch.zeros(n_out)
    return state


def save_weights(path: Path, state: dict) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size=(20, 24), seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` RGB images of random pixels, a little brighter in the second class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 200, (*size, 3)) + 50 * c
            Image.fromarray(pixels.astype(np.uint8)).save(Path(root) / name / f"{i}.png")
    return Path(root)


def hf_folder(root: Path, n_labels: int = 2) -> Path:
    """A tiny Hugging Face ResNet image classifier saved with save_pretrained, and its image
    processor's settings (16 px crop of an 18 px resize, mean and std 0.5)."""
    import transformers

    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=n_labels)
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(config).save_pretrained(root)
    (Path(root) / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 16}, "crop_pct": 0.875, "resample": 2, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return Path(root)


def assert_one_line_error(code: int, err: str, *absent: Path, contains: str = "") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("modlens: error:"), err
    assert contains in lines[0], lines[0]
    for path in absent:
        assert not Path(path).exists(), f"{path} was left behind"
    return lines[0]
