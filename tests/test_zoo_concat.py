"""Concatenations of a value with a function of itself in real library models (timm DenseNet and
DLA, torchvision DenseNet): lesions of every layer through the recomputed paths equal the plain
oracle in float64 (the zoo environment; run with ``pytest -m zoo``)."""

from __future__ import annotations

import pytest
import torch

from model_helpers import zoo_import
from test_ops_families import _oracle_check

timm = zoo_import("timm")
torchvision = zoo_import("torchvision")
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def _timm_densenet():
    from timm.models.densenet import DenseNet
    return DenseNet(growth_rate=4, block_config=(2, 2), num_classes=4, bn_size=2)


def _timm_dla():
    from timm.models.dla import DLA
    return DLA(levels=(1, 1, 1, 2, 1, 1), channels=(4, 4, 8, 8, 8, 8), num_classes=4)


def _torchvision_densenet():
    from torchvision.models import DenseNet
    return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=4)


MODELS = {"timm-densenet": (_timm_densenet, (3, 32, 32)), "timm-dla": (_timm_dla, (3, 32, 32)),
          "torchvision-densenet": (_torchvision_densenet, (3, 32, 32))}


@pytest.mark.parametrize("name", list(MODELS))
def test_lesions_through_concatenations_equal_the_oracle(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    a = _oracle_check(make(), shape)
    with_inner = [i for i in range(len(a.layer_sizes)) if a.lesion_plan(i).inner]
    assert len(with_inner) >= 2, "no layer of this model reaches a later one through two paths"
