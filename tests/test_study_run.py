"""Running studies: the task cache, reruns after a change, executors, and resuming killed runs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from modlens.study.runner import run_study
from modlens.study.spec import load_spec
from modlens.analysis.statistics import summarize

from study_helpers import TINY, assert_same_tables, table_files, write_spec

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny study run once, uninterrupted, inline."""
    root = tmp_path_factory.mktemp("study")
    spec_path = write_spec(root)
    out = run_study(load_spec(spec_path), root / "ref", executor="inline", progress=False)
    return spec_path, out


def _tasks(study: Path) -> list[dict]:
    return json.loads((study / "study.json").read_text())["tasks"]


def _rerun(reference, tmp_path, text=TINY, **kw):
    _, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    spec = write_spec(tmp_path, text, "changed.toml")
    kw.setdefault("executor", "inline")
    run_study(load_spec(spec), out, progress=False, **kw)
    ran = sorted({t["kind"] for t in _tasks(out) if not t["cached"]})
    return out, ran


def test_outputs_of_a_study(reference):
    spec_path, out = reference
    rows = pd.read_parquet(out / "study_rows.parquet")
    assert list(rows.columns[:4]) == ["table_family", "group", "network_label", "k"]
    for col in ["partitioning", "metric", "p_value", "effect", "effect_se", "n_networks", "n_subclusters"]:
        assert col in rows.columns
    assert len(rows) == 2 * 4 and set(rows["n_networks"]) == {2}
    assert (rows["network_label"] == "MLP, digits").all() and (rows["k"] == 4).all()
    assert dict(zip(rows["metric"], rows["table_family"])) == {
        "acc_drop": "lesion", "class_range": "lesion", "vis_score": "vis", "softmax_entropy": "vis"}
    # Fisher-Bates over the two networks' tests, as summarize computes it
    tests = pd.concat([pd.read_parquet(out / "networks" / n / "tests.parquet").assign(network=n)
                       for n in ("mlp-digits-s0", "mlp-digits-s1")])
    expect = summarize(tests, partitionings=["weights/global", "activations/local"])
    pd.testing.assert_series_equal(rows["p_value"], expect["p_value"])
    pd.testing.assert_series_equal(rows["effect"], expect["effect"])
    # each network's own result is a saved analysis
    for n in ("mlp-digits-s0", "mlp-digits-s1"):
        manifest = json.loads((out / "networks" / n / "manifest.json").read_text())
        assert manifest["format"] == "modlens-analysis" and manifest["config"]["n_clusters"] == 4
        assert not (out / "networks" / n / "figures").exists()  # figures = false, the default of studies
    record = json.loads((out / "study.json").read_text())
    assert record["name"] == "tiny" and record["versions"]["modlens"] and record["started"] <= record["finished"]
    assert [n["train_seed"] for n in record["networks"]] == [0, 1]
    assert all((out / n["model_dir"] / "model.safetensors").is_file() for n in record["networks"])
    kinds = [t["kind"] for t in record["tasks"]]
    assert kinds.count("train") == 2 and kinds.count("stats") == 2 and len(kinds) == 2 + 2 * 2 * 3 + 2
    assert not any(t["cached"] for t in record["tasks"])


def test_rerun_skips_every_task(reference, tmp_path):
    out, ran = _rerun(reference, tmp_path)
    assert ran == []
    assert_same_tables(reference[1], out)


@pytest.mark.parametrize("change, reruns", [
    (("steps = 5", "steps = 6"), ["stats", "vis"]),
    (("feature_vis = true", 'feature_vis = true\nties = "original"'), ["stats"]),
    (("n_random = 3", "n_random = 4"), ["lesion", "stats", "vis"]),
    (("feature_vis = true", "feature_vis = true\nfigures = true"), ["stats"]),
    (("n_clusters = [4]", "n_clusters = [4, 5]"), ["lesion", "partition", "stats", "vis"]),
    (("feature_vis = true", 'feature_vis = true\ncombine = "exact"'), ["stats"]),
    (("feature_vis = true", 'feature_vis = true\nengine = "plain"'), []),  # changes no number: no task reruns
    (("feature_vis = true", "feature_vis = true\nclusterability = true\nn_null = 2"), ["clusterability", "stats"]),
])
def test_changing_one_option_reruns_only_what_depends_on_it(reference, tmp_path, change, reruns):
    out, ran = _rerun(reference, tmp_path, TINY.replace(*change))
    assert ran == reruns
    if change[0] == "n_clusters = [4]":  # the k=4 partitions and tests are reused (their statistics are renamed -k4)
        fresh = [t for t in _tasks(out) if not t["cached"] and t["kind"] != "stats"]
        assert fresh and all("-k5" in t["task"] for t in fresh)
    if "figures" in change[1]:
        assert list((out / "networks" / "mlp-digits-s0" / "figures").glob("feature_vis_*.png"))


def test_graph_options_rerun_the_partitions(reference, tmp_path):
    """eigen_solver is a field of the partition tasks' keys; the lesions and visualizations of a
    partition with the same labels are reused, and the result records the config."""
    out, ran = _rerun(reference, tmp_path, TINY.replace("n_random = 3", 'n_random = 3\neigen_solver = "lobpcg"'))
    assert "partition" in ran and "stats" in ran and "train" not in ran
    manifest = json.loads((out / "networks" / "mlp-digits-s0" / "manifest.json").read_text())
    assert manifest["config"]["options"]["eigen_solver"] == "lobpcg"


def test_a_wrong_option_fails_at_load(tmp_path):
    from modlens.study.spec import SpecError

    path = write_spec(tmp_path, TINY.replace("n_random = 3", 'n_random = 3\neigen_solver = "arpak"'))
    with pytest.raises(SpecError, match="eigen_solver"):
        load_spec(path)


def test_seeds_do_not_depend_on_order_or_company(reference, tmp_path):
    """One replicate alone, in a graph of another shape, gives its tables of the full study."""
    _, ref = reference
    text = TINY.replace("replicates = 2", "seeds = [1]")
    out = run_study(load_spec(write_spec(tmp_path, text)), tmp_path / "one", progress=False)
    for name in ("summary", "subclusters", "tests", "visualizations"):
        a = (ref / "networks" / "mlp-digits-s1" / f"{name}.parquet").read_bytes()
        assert a == (out / "networks" / "mlp-digits-s1" / f"{name}.parquet").read_bytes()


def test_default_executor_uses_every_core_and_gives_the_inline_tables(reference, tmp_path, monkeypatch):
    from modlens.study import executors

    if executors.available_cores() < 2:  # what a machine with more than one core does
        monkeypatch.setattr(executors, "available_cores", lambda: 2)
    spec_path, ref = reference
    out = run_study(load_spec(spec_path), tmp_path / "auto", progress=False)
    record = json.loads((out / "study.json").read_text())
    assert (record["executor"], record["executor_requested"]) == ("processes", "auto")
    assert record["workers"] == executors.available_cores() > 1
    assert_same_tables(ref, out)
    util = record["utilization"]
    assert util["workers"] == record["workers"] and 0 < util["value"] <= 1
    assert util["value"] == pytest.approx(util["task_seconds"] / (util["wall_seconds"] * util["workers"]))
    assert util["task_seconds"] == pytest.approx(sum(t["seconds"] for t in record["tasks"] if not t["cached"]))
    ran = [t for t in record["tasks"] if not t["cached"]]
    # each task's CPU time is that of the worker process over the task: positive, and about its wall time at most
    # (tasks run single-threaded)
    assert all(0 < t["cpu_seconds"] <= 2 * t["seconds"] + 1 for t in ran), ran
    assert util["task_cpu_seconds"] == pytest.approx(sum(t["cpu_seconds"] for t in ran))
    monkeypatch.setattr(executors, "available_cores", lambda: 1)
    assert executors.make_executor("auto").name == "inline"


def test_study_status(reference, tmp_path, capsys):
    import fcntl

    from modlens.cli import main
    from modlens.study.status import study_status

    _, ref = reference
    assert main(["study", "status", str(ref)]) == 0
    out = capsys.readouterr().out
    n = len(_tasks(ref))
    assert "finished at" in out and re.search(rf"^total\s+{n}\s+0\s+0\s+0\s+\d+\.\d s; \d+\.\d s CPU$", out, re.M), out
    run = json.loads((ref / "run.json").read_text())
    assert study_status(ref)["total"]["cpu_seconds"] == pytest.approx(
        sum(t["cpu_seconds"] for t in run["tasks"].values()), abs=0.01)
    assert re.search(r"^train\s+2\s+0\s+0\s+0", out, re.M)
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    run = json.loads((copy / "run.json").read_text())
    for task in ("stats:mlp-digits-s0", "stats:mlp-digits-s1"):
        run["tasks"][task]["state"] = "running"
    run["finished"] = None
    (copy / "run.json").write_text(json.dumps(run))
    with open(copy / ".lock", "w") as fh:  # a run holds the folder
        fcntl.flock(fh, fcntl.LOCK_EX)
        status = study_status(copy)
        assert status["active"] and status["kinds"]["stats"]["running"] == 2 and status["total"]["done"] == n - 2
        assert main(["study", "status", str(copy)]) == 0 and "running since" in capsys.readouterr().out
    status = study_status(copy)  # the run is gone: its running tasks are left to do
    assert not status["active"] and status["kinds"]["stats"]["pending"] == 2
    assert main(["study", "status", str(tmp_path)]) == 2 and "no run.json" in capsys.readouterr().err


def test_processes_executor_gives_identical_tables(reference, tmp_path):
    spec_path, ref = reference
    out = run_study(load_spec(spec_path), tmp_path / "pool", executor="processes", workers=2, progress=False)
    assert_same_tables(ref, out)
    assert json.loads((out / "study.json").read_text())["executor"] == "processes"


def _cli(spec: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "modlens.cli", "study", "run", str(spec), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finished(out: Path) -> int:
    return sum(1 for p in out.glob("tasks/*/*") if not p.name.startswith("."))


def _kill_when(proc: subprocess.Popen, condition, limit: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False when it finished first."""
    stop = time.monotonic() + limit
    while time.monotonic() < stop:
        if proc.poll() is not None:
            return False
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the study neither finished nor reached the kill point in time")


def test_killed_runs_resume_to_identical_tables(reference, tmp_path):
    spec_path, ref = reference
    out = tmp_path / "killed"
    points = [
        lambda: any(out.glob("tasks/train/.tmp-*")),                             # while training the first network
        lambda: _finished(out) >= 5,                                             # among the partitions and lesions
        lambda: any(out.glob("tasks/vis/.tmp-*")) or any(out.glob("tasks/stats/.tmp-*")),  # while writing a task
    ]
    kills = 0
    for point in points:
        kills += _kill_when(_cli(spec_path, out), point)
    assert kills >= 2
    assert not (out / "study_rows.parquet").exists() or kills < 3
    proc = _cli(spec_path, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not list(out.glob("tasks/*/.tmp-*"))
    assert any(t["cached"] for t in _tasks(out))  # the work done before the kills was kept
    assert_same_tables(ref, out)
    assert len(table_files(out)) == 2 + 2 * 8


def test_study_clusterability_is_what_analyze_gives(tmp_path):
    """clusterability = true runs the test as cached tasks; the network's result is analyze's."""
    import modlens
    from modlens.nn.io import load_model
    from modlens.study.task_kinds import network_data
    from modlens.study.tasks import single_thread

    text = (TINY.replace("replicates = 2", "seeds = [0]").replace("feature_vis = true", "clusterability = true\nn_null = 3"))
    spec = load_spec(write_spec(tmp_path, text))
    out = run_study(spec, tmp_path / "study", executor="inline", progress=False)
    kinds = [t["kind"] for t in _tasks(out)]
    assert kinds.count("clusterability") == 1  # the weight partitioning only, as analyze
    net = json.loads((out / "study.json").read_text())["networks"][0]
    cfg = spec.analysis.network_config(4, net["random_state"])
    model, manifest = load_model(out / net["model_dir"])
    (x, y), act = network_data(manifest["dataset"], None)
    with single_thread():
        ref = modlens.analyze(model, (x, y), activation_data=act, config=cfg)
    saved = pd.read_parquet(out / "networks" / net["id"] / "summary.parquet")
    pd.testing.assert_frame_equal(saved, ref.summary)
    assert "clusterability" in set(saved["metric"])


def test_study_network_equals_analyze_with_non_default_options(tmp_path):
    """A study's per-network result is what ``analyze`` gives with the network's config, also
    with non-default options (LOBPCG, the exact combination, the original tie rule)."""
    import modlens
    from modlens.nn.io import load_model
    from modlens.study.task_kinds import network_data
    from modlens.study.tasks import single_thread

    text = (TINY.replace("replicates = 2", "seeds = [0]").replace('metrics = ["lesion", "vis"]', 'metrics = ["lesion"]')
            .replace("n_random = 3", 'n_random = 3\neigen_solver = "lobpcg"\ncombine = "exact"\nties = "original"'))
    spec = load_spec(write_spec(tmp_path, text))
    out = run_study(spec, tmp_path / "study", progress=False)
    net = json.loads((out / "study.json").read_text())["networks"][0]
    cfg = spec.analysis.network_config(4, net["random_state"])
    model, manifest = load_model(out / net["model_dir"])
    (x, y), act = network_data(manifest["dataset"], None)
    with single_thread():  # as every task runs
        ref = modlens.analyze(model, (x, y), activation_data=act, config=cfg)
    folder = out / "networks" / net["id"]
    saved = json.loads((folder / "manifest.json").read_text())["config"]
    assert saved["config_key"] == ref.config["config_key"] and saved["options"]["combine"] == "exact"
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "summary.parquet"), ref.summary)
    for name, frame in (("tests", ref.tests), ("subclusters", ref.subclusters)):
        pd.testing.assert_frame_equal(pd.read_parquet(folder / f"{name}.parquet"), frame.assign(network=net["id"]))


def test_a_resumed_run_takes_every_cached_task_before_it_waits_for_a_worker(reference, tmp_path, monkeypatch):
    """Tasks an earlier run finished need no worker: a resumed run marks them done (``run.json``,
    ``study status``) as soon as their inputs are, not when a worker comes free."""
    from modlens.study import status as status_module

    _, ref = reference
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    first = [t for t in _tasks(ref) if t["kind"] == "lesion"][0]   # one task to run again
    shutil.rmtree(copy / "tasks" / "lesion" / first["key"])
    events = []
    original = status_module.RunLog.set

    def record(self, task_id, state, *args, **kw):
        events.append((task_id, state))
        return original(self, task_id, state, *args, **kw)

    monkeypatch.setattr(status_module.RunLog, "set", record)
    spec_path, _ = reference
    run_study(load_spec(spec_path), copy, executor="processes", workers=1, progress=False)
    done_at = events.index((first["task"], "done"))
    cached_before = {t for t, s in events[:done_at] if s == "cached"}
    independent = {t["task"] for t in _tasks(ref) if t["kind"] != "stats"} - {first["task"]}
    assert independent <= cached_before, sorted(independent - cached_before)
    assert [t for t, s in events if s == "done"][0] == first["task"]


def test_other_statistics_options_reuse_the_lesion_counts(reference, tmp_path):
    """Lesion tasks that differ only in how class counts become statistics (balanced accuracy, the
    normalized class range: paper-original beside paper-small) run again, but take every set's counts
    from the finished lesion tasks of the same networks and data: nothing is lesioned twice, and the
    tables equal those of a run from scratch."""
    spec_path, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    for f in out.glob("tasks/lesion/*/counts-identity.json"):   # as tasks finished before counts were shared
        f.unlink()
    run_study(load_spec(spec_path), out, executor="inline", progress=False)   # all cached: the records are written
    n_lesion = sum(t["kind"] == "lesion" for t in _tasks(out))
    assert len(list(out.glob("tasks/lesion/*/counts-identity.json"))) == n_lesion > 0
    changed = write_spec(tmp_path, TINY.replace("n_random = 3", 'n_random = 3\naccuracy = "balanced"\n'
                                                                'class_range = "normalized"'), "changed.toml")
    run_study(load_spec(changed), out, executor="inline", progress=False)
    fresh = [t for t in _tasks(out) if not t["cached"]]
    assert sorted({t["kind"] for t in fresh}) == ["lesion", "stats"]
    for t in fresh:
        if t["kind"] == "lesion":
            info = json.loads((out / "tasks" / "lesion" / t["key"] / "result.json").read_text())["info"]
            assert info["counts_reused"] == info["rows"]
    scratch = run_study(load_spec(changed), tmp_path / "scratch", executor="inline", progress=False)
    assert_same_tables(out, scratch)
