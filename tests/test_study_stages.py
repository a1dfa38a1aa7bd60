"""The study's separate stages give exactly the tables of ``analyze`` (the reference path)."""

import json

import pandas as pd
import pytest

import modlens
from modlens.experiments.partitioning import METHODS
from modlens.analysis.config import AnalysisConfig
from modlens.analysis.result import partition_digest, partition_from_dict, partition_to_dict
from modlens.analysis.stages import (assemble, config_subset, lesion_one, network_adapter, partition_one, stage_config,
                                     vis_one)
from modlens.nn import lesion_engine

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP on the digits images (feature visualization needs image inputs)."""
    import torch

    from modlens.data import load_dataset
    from modlens.experiments.train import train_reference_mlp

    tr, va, te = (load_dataset("digits", s) for s in ("train", "val", "test"))
    t = torch.from_numpy
    model, _ = train_reference_mlp(t(tr.x), t(tr.y), t(te.x), t(te.y), seed=0, epochs=5, n_val=0, hidden=(32, 32, 32))
    return model, (t(te.x), t(te.y)), t(va.x)


@pytest.mark.parametrize("options", [
    {},
    {"accuracy": "balanced", "class_range": "normalized", "ties": "original", "effect_rule": "original",
     "max_fraction": 0.99},
    {"eigen_solver": "lobpcg", "n_init": 3, "combine": "exact", "ties": "original", "engine": "plain"},
])
def test_stages_compose_to_analyze(digits_mlp, options):
    """Each stage run on its own (any order, the partitions through the cache's JSON form) and
    assembled gives ``analyze``'s tables with the same config."""
    model, test, xa = digits_mlp
    cfg = AnalysisConfig(n_clusters=4, n_random=5, random_state=7, feature_vis=True, vis_options={"steps": 4}, **options)
    ref = modlens.analyze(model, test, activation_data=xa, config=cfg)
    x, y = test
    adapter = network_adapter(model, x, cfg)
    parts, lesions, vis_results = {}, [], []
    for method in reversed(METHODS):  # order of the stages does not matter
        # each task sees only the fields it depends on (the rest are defaults)
        pc, lc, vc = (stage_config(config_subset(cfg, s)) for s in ("partition", "lesion", "vis"))
        p = partition_one(adapter, method, pc, activation_data=xa)
        p = partition_from_dict(json.loads(json.dumps(partition_to_dict(p))))  # as the cache stores it
        assert partition_digest(p) == partition_digest(ref.partitions[method])
        parts[method] = p
        lesions.append(lesion_one(lesion_engine(lc.engine, adapter, x, y), p, lc, name=method))
        vis_results.append(vis_one(adapter, p, x, vc, name=method))
    order = {m: i for i, m in enumerate(METHODS)}
    parts = dict(sorted(parts.items(), key=lambda kv: order[kv[0]]))
    lesions.sort(key=lambda t: order[t["partitioning"].iloc[0]])
    vis_results.sort(key=lambda r: order[r.config["partitioning"]])
    got = assemble(parts, lesions, vis_results, stage_config(config_subset(cfg, "stats")))
    pd.testing.assert_frame_equal(got.subclusters, ref.subclusters)
    pd.testing.assert_frame_equal(got.visualizations, ref.visualizations)
    pd.testing.assert_frame_equal(got.tests, ref.tests)
    pd.testing.assert_frame_equal(got.summary, ref.summary)
    assert got.config["config_key"] == ref.config["config_key"]
    assert (got.summary["n_subclusters"] > 0).all()
    if options.get("combine") == "exact":
        assert ref.config["combine"] == "exact" and ref.config["options"]["eigen_solver"] == "lobpcg"


def test_stage_configs_hold_only_what_the_stage_reads():
    cfg = AnalysisConfig(n_clusters=4, eigen_solver="lobpcg", ties="original", vis_options={"steps": 4})
    assert config_subset(cfg, "partition")["eigen_solver"] == "lobpcg"
    assert "ties" not in config_subset(cfg, "partition") and "ties" not in config_subset(cfg, "lesion")
    assert "vis_options" in config_subset(cfg, "vis") and "vis_options" not in config_subset(cfg, "lesion")
    assert stage_config(config_subset(cfg, "stats")) == cfg
