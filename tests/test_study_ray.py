"""The `digits` study on a local Ray instance gives the tables of the inline run (what CI runs); the
instance listens on 127.0.0.1 only, and its workers report per-task progress."""

import json
import os
import shutil
import subprocess

import pytest

from modlens.study.progress import StudyProgress
from modlens.study.runner import run_study
from modlens.study.spec import load_spec

from study_helpers import assert_same_tables

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore:Graph is not fully connected")]


def _ray_sockets() -> list[str]:
    """Local addresses of the listening TCP sockets of this Ray session's processes (``ss -ltnp``)."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    parents, mine = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        if session in cmdline:
            mine.add(int(entry))
    for pid in list(parents):  # and every descendant of this test process (raylet, workers)
        p, seen = pid, set()
        while p in parents and p not in seen:
            seen.add(p)
            if parents[p] == os.getpid() or parents[p] in mine:
                mine.add(pid)
                break
            p = parents[p]
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines if any(f"pid={pid}," in line for pid in mine)]


class _Recorder(StudyProgress):
    """The study's progress display, keeping every message and, at the first one, Ray's sockets."""

    messages: list = []
    sockets: list = []

    def update(self, task_id, what, n):
        if not _Recorder.sockets:
            _Recorder.sockets.extend(_ray_sockets())
        _Recorder.messages.append((task_id, what, n))
        super().update(task_id, what, n)


def test_digits_study_on_ray_matches_inline(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    monkeypatch.setattr("modlens.study.runner.StudyProgress", _Recorder)
    spec = load_spec("digits")
    on_ray = run_study(spec, tmp_path / "ray", executor="ray", workers=2, progress=True)
    # a local instance listens on the loopback interface only (GCS, raylet, workers)
    assert _Recorder.sockets, "no listening socket of the Ray session was found"
    loopback = [a for a in _Recorder.sockets if a.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")]
    assert loopback == _Recorder.sockets, _Recorder.sockets
    # Ray workers report per-task progress as the process pool's do
    lesions = [m for m in _Recorder.messages if m[0].startswith("lesion:")]
    assert {w for _, w, _ in lesions} == {"total", "advance"}
    total = next(n for t, w, n in lesions if w == "total")
    first = lesions[0][0]
    assert sum(n for t, w, n in lesions if t == first and w == "advance") == \
        next(n for t, w, n in lesions if t == first and w == "total") and total > 0
    inline = run_study(spec, tmp_path / "inline", executor="inline", progress=False)
    assert_same_tables(inline, on_ray)
    record = json.loads((on_ray / "study.json").read_text())
    assert record["executor"] == "ray" and len(record["networks"]) == 3
    assert not any(t["cached"] for t in record["tasks"])
