"""core/seeds.py (one module for all seed derivation) and study/config.py (AnalysisConfig)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from modlens.core import seeds
from modlens.analysis.config import AnalysisConfig


def _state(ss):
    return ss.generate_state(4).tolist()


def test_int_roots_keep_the_old_streams():
    # modlens <= this change: SeedSequence([seed, method id, stream]) with ids in METHODS order
    for seed, method, mid in [(0, "weights/global", 0), (7, "activations/local", 3), (3, "user", 4)]:
        for stream in (0, 1):
            assert _state(seeds.method_seed(seed, method, stream)) == _state(np.random.SeedSequence([seed, mid, stream]))
    # training's augmentation stream and derived datasets' pairing stream are unchanged
    import zlib

    assert seeds.named_seed(5, "augment") == int(
        np.random.SeedSequence([5, zlib.crc32(b"augment")]).generate_state(1)[0])
    assert _state(seeds.tagged_sequence(2, "halves-mnist", "test")) == _state(
        np.random.SeedSequence([2, zlib.crc32(b"halves-mnist"), zlib.crc32(b"test")]))


def test_roots_of_every_kind_and_their_records():
    ss = np.random.SeedSequence(1234)
    assert seeds.root_seed(5) == 5 and seeds.root_seed(ss) is ss
    # a Generator gives a root drawn from it: same generator state, same root
    r1 = seeds.root_seed(np.random.default_rng(9))
    r2 = seeds.root_seed(np.random.default_rng(9))
    assert r1.entropy == r2.entropy
    fresh = seeds.root_seed(None)
    assert isinstance(fresh, np.random.SeedSequence)
    for root in (5, ss, r1, fresh, np.random.SeedSequence(3).spawn(2)[1]):
        record = json.loads(json.dumps(seeds.seed_record(root)))
        back = seeds.root_from_record(record)
        for stream in (0, 1, 2):
            assert _state(seeds.method_seed(back, "weights/local", stream)) == _state(
                seeds.method_seed(root, "weights/local", stream))
    # different methods / streams differ
    assert _state(seeds.method_seed(ss, "weights/global", 0)) != _state(seeds.method_seed(ss, "weights/local", 0))
    assert _state(seeds.method_seed(ss, "weights/global", 0)) != _state(seeds.method_seed(ss, "weights/global", 1))
    with pytest.raises(ValueError, match="non-negative"):
        seeds.root_seed(-1)
    with pytest.raises(TypeError, match="random_state"):
        seeds.root_seed("0")


def test_none_is_recorded_and_repeats():
    cfg = AnalysisConfig(random_state=None)
    again = AnalysisConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.key() == cfg.key()
    from modlens.core.clustering import spectral_labels

    rng = np.random.default_rng(0)
    adj = rng.uniform(size=(40, 40))
    adj = adj + adj.T
    a = spectral_labels(adj, 3, random_state=seeds.method_seed(cfg.random_state, "weights/global"))
    b = spectral_labels(adj, 3, random_state=seeds.method_seed(again.random_state, "weights/global"))
    np.testing.assert_array_equal(a, b)
    assert AnalysisConfig(random_state=None).key() != cfg.key()  # fresh entropy each time


@pytest.mark.parametrize("bad, match", [
    (dict(ties="middle"), "ties"), (dict(effect_rule="clamp"), "effect_rule"), (dict(accuracy="bal"), "accuracy"),
    (dict(class_range="norm"), "class_range"), (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(n_clusters=1), "n_clusters"), (dict(n_random=0), "n_random"),
    (dict(partitionings=["weights/globl"]), "partitionings"), (dict(eigen_solver="eigh"), "eigen_solver"),
    (dict(n_init=0), "n_init"), (dict(max_fraction=1.5), "max_fraction"), (dict(engine="fast"), "engine"),
    (dict(vis_options={"stepz": 3}), "unknown vis_options"), (dict(vis_options={"parameterization": "fft"}), "parameterization"),
    (dict(vis_options={"steps": -1}), "steps"), (dict(vis_options={"lr": 0}), "lr"),
    (dict(vis_options={"value_range": (1, 0)}), "value_range"), (dict(n_null=0), "n_null"),
])
def test_bad_options_fail_fast(bad, match):
    t0 = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=match):
        AnalysisConfig(**bad)
    assert time.perf_counter() - t0 < 0.5
    # analyze fails on the option before it touches the model or the data
    from modlens.analysis.analyze import analyze  # imported (torch included) before the clock starts

    t0 = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=match):
        analyze(object(), None, **bad)
    assert time.perf_counter() - t0 < 0.5


def test_unknown_keyword_and_config_override():
    import modlens

    with pytest.raises(TypeError, match="unknown options"):
        modlens.analyze(object(), None, n_clusterz=4)
    base = AnalysisConfig(n_clusters=8, ties="original")
    cfg = AnalysisConfig.build(base, n_random=9)
    assert (cfg.n_clusters, cfg.ties, cfg.n_random) == (8, "original", 9)
    with pytest.raises(AttributeError):
        cfg.n_clusters = 3  # frozen


def test_key_is_canonical_and_stable_across_processes():
    a = AnalysisConfig(partitionings=["weights/global"], vis_options={"steps": 10, "lr": 0.1})
    b = AnalysisConfig(partitionings=("weights/global",), vis_options={"lr": 0.1, "steps": 10})
    assert a.key() == b.key() and a.to_dict() == b.to_dict()
    assert AnalysisConfig(engine="plain").key() == AnalysisConfig().key()  # engine changes no number
    assert AnalysisConfig(ties="original").key() != AnalysisConfig().key()
    code = ("from modlens.analysis.config import AnalysisConfig as C;"
            "print(C(partitionings=['weights/global'], vis_options={'steps': 10, 'lr': 0.1}).key())")
    from pathlib import Path

    import modlens

    src = str(Path(modlens.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == a.key()


def test_cli_passes_clustering_options():
    from modlens.cli import _analysis_kwargs, build_parser

    a = build_parser().parse_args(["analyze", "m", "--out", "o", "--eigen-solver", "lobpcg", "--n-init", "7",
                                   "--clusterability", "--n-null", "9"])
    kw = _analysis_kwargs(a)
    assert (kw["eigen_solver"], kw["n_init"], kw["clusterability"], kw["n_null"]) == ("lobpcg", 7, True, 9)
    cfg = AnalysisConfig(**kw)  # the CLI's options are AnalysisConfig fields
    assert cfg.n_init == 7
    d = _analysis_kwargs(build_parser().parse_args(["demo", "--eigen-solver", "arpack", "--n-init", "auto"]))
    assert d == {"eigen_solver": "arpack", "n_init": "auto"}  # options not given keep the config's defaults
    with pytest.raises(SystemExit):  # argparse: "expected an integer or 'auto'"
        build_parser().parse_args(["analyze", "m", "--out", "o", "--n-init", "lots"])


def test_every_config_field_is_one_cli_option_and_one_spec_key_of_the_same_name():
    """The command line and study specs are generated from AnalysisConfig: one name per option."""
    from modlens.analysis.config import options, vis_options
    from modlens.cli import _analysis_kwargs, build_parser
    from modlens.study.spec import spec_from_dict

    parser = build_parser()
    analyze = parser._subparsers._group_actions[0].choices["analyze"]
    flags = {f for a in analyze._actions for f in a.option_strings}
    for o in options():
        if o.kind is not dict:
            assert "--" + o.name.replace("_", "-") in flags, o.name
    for o in vis_options():
        if o.kind is not None:
            assert "--vis-" + o.name.replace("_", "-") in flags, o.name
    argv = ["analyze", "m", "--out", "o", "--n-clusters", "8", "--random-state", "3", "--ties", "original",
            "--partitionings", "weights/local", "--vis-steps", "7", "--max-fraction", "0.5"]
    kw = _analysis_kwargs(parser.parse_args(argv))
    from_cli = AnalysisConfig(**kw)
    assert from_cli.feature_vis and from_cli.vis_options == {"steps": 7}  # a --vis-* option implies --feature-vis
    toml = {"n_clusters": 8, "random_state": 3, "ties": "original", "partitionings": ["weights/local"],
            "feature_vis": True, "vis_options": {"steps": 7}, "max_fraction": 0.5}
    spec = spec_from_dict({"name": "t", "analysis": toml, "networks": [{"group": "g", "arch": "mlp", "dataset": "digits"}]})
    assert spec.analysis.config == from_cli == AnalysisConfig(**{**toml, "partitionings": ("weights/local",)})
