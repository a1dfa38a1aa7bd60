"""analyze does each per-network stage once, whatever the number of partitionings and metrics:
loading the test set into the lesion engine, activation recording, the correlations, the
unlesioned pass and each layer's lesion cache; and sharing them leaves the tables unchanged."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from modlens.core import graph
from modlens.data import load_dataset
from modlens.experiments.train import train_classifier
from modlens.experiments.partitioning import METHODS
from modlens.nn import adapter as adapter_mod
from modlens.nn import lesion as lesion_mod
from modlens.nn.models import mlp
from modlens.analysis.analyze import analyze

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


def _count(monkeypatch, owner, name, calls):
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained briefly on the embedded digits (image inputs, so feature vis applies)."""
    tr, va, te = (load_dataset("digits", s) for s in ("train", "val", "test"))
    model = mlp([64, 24, 24, 10], generator=torch.Generator().manual_seed(0))
    train_classifier(model, torch.from_numpy(tr.x), torch.from_numpy(tr.y), epochs=5, batch_size=64, seed=0)
    return model.eval(), (torch.from_numpy(te.x), torch.from_numpy(te.y)), torch.from_numpy(va.x)


def test_each_stage_runs_once_per_network_and_tables_match_single_runs(digits_mlp, monkeypatch):
    model, (x, y), xa = digits_mlp
    opts = dict(activation_data=xa, n_clusters=4, n_random=3, random_state=5)
    calls = Counter()
    for owner, name in [(adapter_mod.NetworkAdapter, "record"), (graph, "activation_graph"),
                        (graph, "weight_graph"), (lesion_mod.IncrementalLesions, "_baseline"),
                        (lesion_mod.IncrementalLesions, "_fill_many"), (adapter_mod.NetworkAdapter, "__init__")]:
        _count(monkeypatch, owner, name, calls)
    both = analyze(model, (x, y), partitionings=METHODS, feature_vis=True, vis_options={"steps": 3}, **opts)
    n_layers = len(both.config["layers"])
    assert calls["record"] == 1 and calls["activation_graph"] == 1 and calls["weight_graph"] == 1
    assert calls["_baseline"] == 1 and calls["__init__"] == 1
    # at most one probe pass per layer (prepare() fills several layers in one), shared by the four partitionings
    assert 1 <= calls["_fill_many"] <= n_layers
    monkeypatch.undo()
    for method in METHODS:  # each partitioning analysed alone gives the same rows
        alone = analyze(model, (x, y), partitionings=[method], feature_vis=True, vis_options={"steps": 3}, **opts)
        for frame in ("subclusters", "tests", "visualizations"):
            got = getattr(both, frame)
            got = got[got["partitioning"] == method].reset_index(drop=True)
            pd.testing.assert_frame_equal(got, getattr(alone, frame).reset_index(drop=True))
