"""A lesion task killed part-way keeps the class counts of the batches of sets it finished
(``tasks/lesion/.partial-<key>/``) and the next run computes only the others (issue 21: a CNN lesion
task outlasts a sitting)."""

from __future__ import annotations

import numpy as np
import pytest

from modlens.study.task_kinds import SavedCounts


class Engine:
    """Counts that depend on the set only; raises on the call after ``fail_after`` calls."""

    baseline = np.array([5, 5])
    class_sizes = np.array([5, 5])

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def correct_counts(self, layer, sets, *, progress=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append((layer, len(sets)))
        if progress is not None:
            progress(len(sets))
        return np.array([[layer + len(s), int(np.sum(s)) % 7] for s in sets], dtype=np.int64)


def _sets(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.choice(40, int(k), replace=False) for k in rng.integers(1, 10, n)]


def test_counts_in_batches_equal_one_call_and_a_killed_run_resumes_from_the_saved_batches(tmp_path):
    sets = _sets(23)
    want = Engine().correct_counts(2, sets)
    killed = SavedCounts(Engine(fail_after=2), tmp_path / "partial", batch=5)
    with pytest.raises(KeyboardInterrupt):
        killed.correct_counts(2, sets)
    assert killed.computed == 2 and len(list((tmp_path / "partial").glob("layer2-*.npy"))) == 2
    engine, seen = Engine(), []
    again = SavedCounts(engine, tmp_path / "partial", batch=5)
    got = again.correct_counts(2, sets, progress=seen.append)
    np.testing.assert_array_equal(got, want)
    assert again.loaded == 2 and again.computed == 3 and engine.calls == [(2, 5), (2, 5), (2, 3)]
    assert sum(seen) == len(sets)
    assert again.baseline is Engine.baseline          # everything else is the engine's
    # other sets (another layer, other draws) are not mistaken for saved ones
    other = SavedCounts(Engine(), tmp_path / "partial", batch=5)
    np.testing.assert_array_equal(other.correct_counts(3, sets), Engine().correct_counts(3, sets))
    assert other.loaded == 0
    assert not list((tmp_path / "partial").glob(".*"))   # no half-written batch files


def test_execute_keeps_the_partial_folder_of_a_killed_task_and_removes_it_when_the_task_completes(tmp_path,
                                                                                                  monkeypatch):
    from modlens.study import tasks

    sets, runs = _sets(12), []

    def kind(out, params, inputs, context, say):
        engine = SavedCounts(Engine(fail_after=params["fail_after"] if not runs else None),
                             context["partial_dir"], batch=4)
        runs.append(engine)
        np.save(out / "counts.npy", engine.correct_counts(0, sets))
        return None, {}

    monkeypatch.setitem(tasks.KINDS, "lesion", kind)
    with pytest.raises(KeyboardInterrupt):
        tasks.execute(str(tmp_path), "lesion", "k" * 64, {"fail_after": 1}, {}, {})
    partial = list((tmp_path / "tasks" / "lesion").glob(".partial-*"))
    assert len(partial) == 1 and len(list(partial[0].glob("*.npy"))) == 1
    assert not list((tmp_path / "tasks" / "lesion").glob(".tmp-*"))
    tasks.clean_temporaries(tmp_path)                    # a new run's clean-up keeps it
    assert partial[0].is_dir()
    done = tasks.execute(str(tmp_path), "lesion", "k" * 64, {"fail_after": 1}, {}, {})
    assert runs[1].loaded == 1 and runs[1].computed == 2 and done["key"] == "k" * 64
    np.testing.assert_array_equal(np.load(tasks.task_dir(tmp_path, "lesion", "k" * 64) / "counts.npy"),
                                  Engine().correct_counts(0, sets))
    assert not partial[0].exists()


def test_run_log_writes_a_change_that_the_throttle_held_back(tmp_path):
    """A resumed run marks its cached tasks and starts the next ones within the throttle's interval; the
    last of those changes must reach run.json without waiting for another change (hours, for a CNN lesion
    task), so that `modlens study status` is right while the run goes on."""
    import json
    import time
    from types import SimpleNamespace

    from modlens.study.status import RunLog

    nodes = [SimpleNamespace(id=f"t{i}", kind="lesion") for i in range(3)]
    log = RunLog(tmp_path, "s", nodes, executor="processes", workers=2, interval=0.3)
    log.set("t0", "cached")
    log.set("t1", "running")             # within the interval of the first write
    time.sleep(0.6)
    states = {k: v["state"] for k, v in json.loads((tmp_path / "run.json").read_text())["tasks"].items()}
    assert states == {"t0": "cached", "t1": "running", "t2": "pending"}
    log.close(finished=True)
    assert json.loads((tmp_path / "run.json").read_text())["finished"]


def test_sets_measured_by_another_task_are_not_evaluated_again(tmp_path):
    sets = _sets(23)
    want = Engine().correct_counts(1, sets)
    names = ["a", "b", "c"]
    # another task measured every third set of layer 'b' (listed in another order, as a table keeps them)
    measured = {("b", ",".join(map(str, sorted(s)))): c for s, c in zip(sets[::3], want[::3])}
    measured[("a", ",".join(map(str, sorted(sets[1]))))] = np.array([-1, -1])   # another layer: not used
    engine, seen = Engine(), []
    saved = SavedCounts(engine, tmp_path / "partial", batch=5, measured=measured, layer_names=names)
    got = saved.correct_counts(1, sets, progress=seen.append)
    np.testing.assert_array_equal(got, want)
    assert saved.reused == len(sets[::3]) and sum(n for _, n in engine.calls) == len(sets) - len(sets[::3])
    assert sum(seen) == len(sets)
    # a batch whose every set was measured calls the engine for none of them
    engine = Engine()
    whole = {("b", ",".join(map(str, sorted(s)))): c for s, c in zip(sets, want)}
    again = SavedCounts(engine, tmp_path / "other", batch=5, measured=whole, layer_names=names)
    np.testing.assert_array_equal(again.correct_counts(1, sets), want)
    assert engine.calls == [] and again.reused == len(sets)
