import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def planted():
    """A trained 4-module MLP (24-48-48-48-8) and its true module of every hidden unit."""
    from planted import planted_data, planted_mlp

    model, modules = planted_mlp(seed=0)
    test = planted_data(800, seed=1)
    act = planted_data(400, seed=2)
    return model, modules, test, act


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"MNIST files not found at {SHARED_DATA}/mnist (the shared data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A study folder (two groups of two tiny digits MLPs, k=16, lesions and visualizations)
    made with the real analyze/save_result/combine, without the study runner."""
    from study_fixture import build_study

    return build_study(tmp_path_factory.mktemp("tiny-study"))
