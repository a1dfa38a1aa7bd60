"""The study's separate stages give exactly the tables of ``analyze`` (the reference path)."""

import json

import pandas as pd
import pytest

import modlens
from modlens.experiments.partitioning import METHODS
from modlens.nn.adapter import NetworkAdapter
from modlens.study.stages import (assemble, lesion_one, partition_digest, partition_from_dict, partition_one,
                                  partition_to_dict, vis_one)

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
])
def test_stages_compose_to_analyze(digits_mlp, options):
    model, test, xa = digits_mlp
    rs = 7
    vis = {"steps": 4}
    ref = modlens.analyze(model, test, activation_data=xa, n_clusters=4, n_random=5, random_state=rs,
                          feature_vis=True, vis_options=vis, **options)
    adapter = NetworkAdapter(model)
    x, y = test
    lesion_opts = {k: v for k, v in options.items() if k in ("accuracy", "class_range", "max_fraction")}
    parts, lesions, vis_results = {}, [], []
    for method in reversed(METHODS):  # order of the stages does not matter
        p = partition_one(adapter, method, activation_data=xa, n_clusters=4, random_state=rs)
        p = partition_from_dict(json.loads(json.dumps(partition_to_dict(p))))  # as the cache stores it
        assert partition_digest(p) == partition_digest(ref.partitions[method])
        parts[method] = p
        lesions.append(lesion_one(adapter, p, x, y, name=method, n_random=5, random_state=rs, **lesion_opts))
        vis_results.append(vis_one(adapter, p, x, name=method, n_random=5, random_state=rs,
                                   max_fraction=options.get("max_fraction"), options=vis))
    order = {m: i for i, m in enumerate(METHODS)}
    parts = dict(sorted(parts.items(), key=lambda kv: order[kv[0]]))
    lesions.sort(key=lambda t: order[t["partitioning"].iloc[0]])
    vis_results.sort(key=lambda r: order[r.config["partitioning"]])
    got = assemble(parts, lesions, vis_results, ties=options.get("ties", "mid"),
                   effect_rule=options.get("effect_rule", "paper"))
    pd.testing.assert_frame_equal(got.subclusters, ref.subclusters)
    pd.testing.assert_frame_equal(got.visualizations, ref.visualizations)
    pd.testing.assert_frame_equal(got.tests, ref.tests)
    pd.testing.assert_frame_equal(got.summary, ref.summary)
    assert (got.summary["n_subclusters"] > 0).all()
