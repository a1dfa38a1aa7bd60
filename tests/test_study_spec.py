"""Study specs: built-in studies load, every key is checked, missing files fail up front."""

import json

import pytest

from modlens.cli import main
from modlens.experiments.partitioning import METHODS
from modlens.study.builtin import BUILTIN
from modlens.study.runner import build_graph, check_requirements
from modlens.study.spec import SpecError, load_spec, spec_from_dict

from study_helpers import write_spec

REQUIRED = ["digits", "paper-small", "paper-halves", "paper-vgg", "paper-k", "paper-imagenet", "paper-original"]


def test_builtin_studies_load_and_are_documented(tmp_path):
    assert set(REQUIRED) <= set(BUILTIN)
    for name in REQUIRED:
        spec = load_spec(name, data_dir=tmp_path)
        assert spec.name == name and spec.description and BUILTIN[name].summary
        assert spec.analysis.partitionings == METHODS
        assert spec.analysis.feature_vis
    digits = load_spec("digits")
    (g,) = digits.networks
    assert (g.arch, g.dataset, g.seeds) == ("mlp", "digits", (0, 1, 2))
    small = load_spec("paper-small")
    assert {g.label for g in small.networks} >= {"MLP, MNIST", "CNN, MNIST"}
    assert all(g.seeds == (0, 1, 2, 3, 4) for g in small.networks)
    assert load_spec("paper-k").analysis.n_clusters == (8, 12, 16)
    assert load_spec("paper-imagenet").analysis.n_random == 9
    orig = load_spec("paper-original")
    assert (orig.analysis.accuracy, orig.analysis.class_range, orig.analysis.ties, orig.analysis.effect_rule,
            orig.analysis.max_fraction, orig.analysis.vis_options) == ("balanced", "normalized", "original", "original", 0.99,
                                                               {"original": True})
    assert (orig.analysis.conv_edge, orig.analysis.act_reduce, orig.analysis.bn_fold) == ("matrix_1_norm", "matrix_1_norm",
                                                                                          "original")
    # the same trained networks as paper-small: one study folder can hold both
    assert [g.recipe for g in orig.networks] == [g.recipe for g in small.networks]


def test_replicates_override(tmp_path):
    spec = load_spec("paper-small", replicates=2)
    assert all(g.seeds == (0, 1) for g in spec.networks)


@pytest.mark.parametrize("patch, message", [
    ({"analysis": {"kk": [16]}}, "unknown key 'kk'"),
    ({"analysis": {"n_clusters": [1]}}, "n_clusters must be an integer >= 2 or a non-empty list of them"),
    ({"analysis": {"k": [16]}}, "unknown key 'k'; the option is called 'n_clusters'"),
    ({"analysis": {"seed": 1}}, "unknown key 'seed'; the option is called 'random_state'"),
    ({"analysis": {"partitionings": ["weights/everywhere"]}}, "unknown partitionings ['weights/everywhere']"),
    ({"analysis": {"metrics": ["vis"]}}, "unknown key 'metrics'; the option is called 'feature_vis'"),
    ({"analysis": {"feature_vis": "yes"}}, "feature_vis must be bool"),
    ({"analysis": {"ties": "sometimes"}}, "ties must be one of"),
    ({"analysis": {"n_random": 0}}, "n_random must be an int >= 1"),  # checked by AnalysisConfig
    ({"analysis": {"eigen_solver": "magic"}}, "[analysis]: AnalysisConfig: "),
    ({"analysis": {"combine": "stouffer"}}, "combine must be one of 'fisher', 'exact'"),
    ({"analysis": {"n_init": 0}}, "[analysis]: AnalysisConfig: "),
    ({"analysis": {"bn_fold": "sometimes"}}, "[analysis]: AnalysisConfig: "),
    ({"analysis": {"alpha": 1.5}}, "alpha must lie in (0, 1)"),
    ({"analysis": {"clusterabilty": True}}, "unknown key 'clusterabilty'"),
    ({"analysis": {"bh_scope": "everything"}}, "bh_scope must be one of table, joint"),
    ({"analysis": {"n_random": "19"}}, "n_random must be int"),
    ({"analysis": {"vis_options": {"stepz": 3}}}, "[analysis].vis_options: unknown key 'stepz'"),
    ({"networks": [{"group": "a", "arch": "mlp"}]}, "a trained group needs dataset"),
    ({"networks": [{"group": "a", "arch": "rnn", "dataset": "digits"}]}, "arch must be one of"),
    ({"networks": [{"group": "a", "arch": "mlp", "dataset": "svhn"}]}, "unknown dataset 'svhn'"),
    ({"networks": [{"group": "a", "arch": "mlp", "dataset": "digits", "seeds": [0, 0]}]}, "seeds repeat"),
    ({"networks": [{"group": "a", "arch": "mlp", "dataset": "digits", "regularize": False}]}, "VGG only"),
    ({"networks": [{"group": "a", "models": ["x"], "arch": "mlp"}]}, "takes no training keys (arch)"),
    ({"networks": [{"group": "a b", "arch": "mlp", "dataset": "digits"}]}, "without '/'"),
    ({"networks": [{"group": "a", "arch": "mlp", "dataset": "digits"},
                   {"group": "a", "arch": "cnn", "dataset": "digits"}]}, "group names repeat: a"),
    ({"networks": []}, "no networks"),
    ({"title": "x"}, "unknown key 'title'"),
])
def test_spec_errors_name_the_key(patch, message):
    raw = {"name": "t", "analysis": {}, "networks": [{"group": "g", "arch": "mlp", "dataset": "digits"}]}
    for key, value in patch.items():
        raw[key] = value if key != "analysis" else {**raw["analysis"], **value}
    with pytest.raises(SpecError) as err:
        spec_from_dict(raw, source="spec.toml")
    assert message in str(err.value)
    assert "spec.toml" in str(err.value)


def test_toml_file_and_errors(tmp_path):
    path = write_spec(tmp_path)
    spec = load_spec(path)
    assert spec.name == "tiny" and spec.analysis.n_clusters == (4,) and spec.networks[0].seeds == (0, 1)
    bad = write_spec(tmp_path, "name = [", "bad.toml")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no built-in study and no spec file called 'nope'; built-in studies: digits"):
        load_spec("nope")


def test_saved_model_paths_are_relative_to_the_spec_and_data_dir(tmp_path):
    text = ('name = "m"\n[[networks]]\ngroup = "mine"\nmodels = ["runs/a", "{data_dir}/b"]\n')
    spec = load_spec(write_spec(tmp_path, text, "m.toml"), data_dir=tmp_path / "data")
    assert spec.networks[0].models == (str(tmp_path / "runs" / "a"), str(tmp_path / "data" / "b"))


@pytest.mark.parametrize("name, where", [("paper-vgg", "cifar-10-python.tar.gz"), ("paper-k", "cifar-10-python.tar.gz"),
                                         ("paper-imagenet", "imagenet-models/vgg16")])
def test_studies_that_need_files_fail_up_front_with_one_line(tmp_path, capsys, name, where):
    with pytest.raises(SpecError) as err:
        check_requirements(load_spec(name, data_dir=tmp_path), tmp_path)
    assert where in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    # the CLI says it in one line and does no work
    assert main(["study", "run", name, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path), "--no-progress"]) == 2
    err_lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err_lines) == 1 and where in err_lines[0]
    assert not (tmp_path / "out").exists()


def test_imagenet_folder_is_required_too(tmp_path):
    for g in ("vgg16", "vgg19", "resnet18"):
        d = tmp_path / "imagenet-models" / g
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"sha256": "0"}))
    with pytest.raises(SpecError, match="no ImageNet validation folder at .*imagenet/val"):
        check_requirements(load_spec("paper-imagenet", data_dir=tmp_path), tmp_path)


def test_graph_has_one_task_per_stage(tmp_path):
    spec = load_spec("paper-k", data_dir=tmp_path)
    nodes, given, analyses = build_graph(spec, tmp_path)
    kinds = [n.kind for n in nodes]
    # 5 networks; per k (3) and partitioning (4): partition, lesion, vis; per k: stats
    assert kinds.count("train") == 5
    assert kinds.count("partition") == kinds.count("lesion") == kinds.count("vis") == 5 * 3 * 4
    assert kinds.count("stats") == 15 and not given
    assert {a["id"] for a in analyses} >= {"vgg-cifar10-s0-k8", "vgg-cifar10-s4-k16"}
    ids = [n.id for n in nodes]
    assert len(set(ids)) == len(ids)
    position = {i: p for p, i in enumerate(ids)}
    assert all(position[d] < position[n.id] for n in nodes for d in n.deps)


def test_study_list(capsys):
    assert main(["study", "list"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out


def test_one_run_per_study_folder(tmp_path):
    import fcntl

    from modlens.study.runner import StudyError, run_study

    out = tmp_path / "study"
    out.mkdir()
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(StudyError, match="another modlens study run is using"):
            run_study(load_spec(write_spec(tmp_path)), out, progress=False)
    assert not (out / "tasks").exists()


def test_progress_display_has_one_study_bar_and_a_bar_per_running_task(capsys):
    from modlens.study.progress import StudyProgress

    bar = StudyProgress(3, desc="demo")
    bar.finished("train:a", cached=True)
    bar.started("lesion:a")
    bar.update("lesion:a", "total", 40)
    bar.update("lesion:a", "advance", 10)
    assert (bar._bars["lesion:a"].n, bar._bars["lesion:a"].total) == (10, 40)
    bar.started("vis:a")
    assert sorted(bar._positions.values()) == [1, 2]
    bar.finished("lesion:a")
    bar.started("stats:a")  # takes the freed line
    assert bar._positions["stats:a"] == 1
    bar.close()
    err = capsys.readouterr().err
    assert "demo: 2/3 tasks" in err and "elapsed" in err and "left" in err
    assert "lesion:a" in err and "/40" in err


def test_imagenet_data_split_is_disjoint_and_identified_by_its_files(tmp_path):
    from PIL import Image
    import numpy as np

    from modlens.study.inputs import data_identity, imagenet_data, load_files

    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        (tmp_path / wnid).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / wnid / f"{i}.png")
    spec = imagenet_data({"folder": str(tmp_path), "per_class": 2, "activation_per_class": 1})
    data = {"files": {"test": spec["test_data"], "activation": spec["activation_data"], "options": spec["options"]}}
    (x, y), act = load_files(data)
    assert tuple(x.shape) == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1] and tuple(act.shape) == (2, 3, 224, 224)
    flat = lambda t: {tuple(v[:, :4, :4].flatten().tolist()) for v in t}
    assert not flat(x) & flat(act)  # no image in both
    before = data_identity(data)
    assert str(tmp_path) not in json.dumps(before)  # the files identify it, not where they lie
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "n02" / "4.png")
    assert data_identity(data) != before


def test_groups_filter():
    spec = load_spec("paper-small", groups=["mlp-mnist", "mlp-fashion"])
    assert [g.group for g in spec.networks] == ["mlp-mnist", "mlp-fashion"]
    with pytest.raises(SpecError, match="no group cnn-cifar; its groups are mlp-mnist, mlp-fashion"):
        load_spec("paper-small", groups=["cnn-cifar"])


def test_paper_graphs_spec_is_paper_original_without_its_graph_options():
    """benchmarks/specs/paper-original-paper-graphs.toml (the first option set of docs/fidelity.md
    section 6) differs from the built-in paper-original in rows 1-3 of the notes only."""
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[1] / "benchmarks" / "specs" / "paper-original-paper-graphs.toml")
    orig = load_spec("paper-original")
    a, b = spec.analysis.record(), orig.analysis.record()
    assert {k for k in a if a[k] != b[k]} == {"conv_edge", "act_reduce", "bn_fold"}
    assert (spec.analysis.conv_edge, spec.analysis.act_reduce, spec.analysis.bn_fold) == ("l1", "l1", "paper")
    assert [g.recipe for g in spec.networks] == [g.recipe for g in orig.networks]
