"""Untrained models whose residual branches start at zero (timm EfficientViT-M: the batch norm after
each branch's last map is initialised with scale 0): the weight graph has no edge, ``partition``
says so in words (tests/test_empty_weight_graph.py), and the census (benchmarks/zoo.py) sets such
zero scales to one before it runs the architecture. Run with ``pytest -m zoo`` in the zoo
environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import modlens

from model_helpers import zoo_import

timm = zoo_import("timm")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def _census():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
    spec = importlib.util.spec_from_file_location("modlens_zoo_census", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _efficientvit_m():   # efficientvit_m0's blocks, one per stage, narrow
    from timm.models.efficientvit_msra import EfficientVitMsra
    torch.manual_seed(0)
    return EfficientVitMsra(img_size=64, num_classes=5, embed_dim=(16, 32, 48), key_dim=(8, 8, 8),
                            depth=(1, 1, 1), num_heads=(2, 2, 2), window_size=(4, 4, 4)).eval()


def test_zero_initialised_branches_are_named_and_the_census_sets_their_scales_to_one():
    model = _efficientvit_m()
    with pytest.raises(ValueError, match="the weight graph has no edges.*output maps of") as err:
        modlens.partition(model, "weights/global", n_clusters=4)
    assert "trained model" in str(err.value)
    n = _census().unzero_norm_scales(model)
    assert n > 0
    assert not any("Norm" in type(m).__name__ and getattr(m, "weight", None) is not None and not torch.any(m.weight)
                   for m in model.modules())
    part = modlens.partition(model, "weights/global", n_clusters=4)
    assert part.n_clusters == 4 and len(part.layer_names) >= 3
