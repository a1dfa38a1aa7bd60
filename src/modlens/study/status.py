"""Where a study run stands: ``run.json`` in the study folder, rewritten (atomically, at most twice a
second) as tasks start and finish, and read by ``modlens study status DIR``.

``run.json`` lists every task of the run's graph with its kind and state (``pending``,
``running``, ``done``, ``cached``: done by an earlier run, ``failed``) and, for finished ones, the
seconds it took (wall time, and the CPU time of the process that ran it). Whether a run is still going is told by the study folder's lock, not by the
file: a run that was killed leaves tasks marked running, and :func:`study_status` reports them as
interrupted (the next run starts them again).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from modlens.analysis.storage import atomic_write_text, pretty

STATUS_FILE = "run.json"
STATES = ("done", "cached", "running", "pending", "failed")


class RunLog:
    """The state of every task of one run, written to ``run.json``."""

    def __init__(self, study_dir: Path, name: str, nodes, *, executor: str, workers: int, interval: float = 0.5):
        self.path = Path(study_dir) / STATUS_FILE
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None   # the write a throttled change is waiting for
        self.record = {"format": "modlens-study-run", "name": name, "pid": os.getpid(), "executor": executor,
                       "workers": workers, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "finished": None, "tasks": {n.id: {"kind": n.kind, "state": "pending"} for n in nodes}}
        self._write(force=True)

    def set(self, task_id: str, state: str, seconds: float | None = None, error: str | None = None, *,
            cpu_seconds: float | None = None) -> None:
        with self._lock:
            entry = self.record["tasks"][task_id]
            entry["state"] = state
            if seconds is not None:
                entry["seconds"] = round(float(seconds), 3)
            if cpu_seconds is not None:
                entry["cpu_seconds"] = round(float(cpu_seconds), 3)
            if error is not None:
                entry["error"] = error
        self._write(force=state == "failed")

    def close(self, *, finished: bool) -> None:
        with self._lock:
            if finished:
                self.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        """Write now if forced or if the last write is ``interval`` old; otherwise once that much time has
        passed (a change is never left unwritten: the tasks that start right after a burst of cached ones
        may run for hours)."""
        with self._lock:
            wait = self.interval - (time.monotonic() - self._last)
            if not force and wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._write, kwargs={"force": True})
                    self._timer.daemon = True
                    self._timer.start()
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            atomic_write_text(self.path, pretty(self.record))
            self._last = time.monotonic()


def _run_active(study_dir: Path) -> bool:
    """Whether a ``modlens study run`` holds the folder's lock now."""
    import fcntl

    lock = study_dir / ".lock"
    if not lock.is_file():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def study_status(study_dir) -> dict:
    """Counts of tasks done (this run or an earlier one), running, left and failed, per kind, with
    the seconds the finished ones took, and whether a run is active."""
    study_dir = Path(study_dir)
    path = study_dir / STATUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{study_dir} holds no {STATUS_FILE}: it is not a study folder, or no "
                                "`modlens study run` has started in it yet")
    record = json.loads(path.read_text())
    active = _run_active(study_dir)
    kinds: dict[str, dict] = {}
    for entry in record["tasks"].values():
        k = kinds.setdefault(entry["kind"], {**{s: 0 for s in STATES}, "seconds": 0.0, "cpu_seconds": 0.0,
                                             "cpu_tasks": 0})
        state = entry["state"]
        if state == "running" and not active:
            state = "pending"  # the run that started it is gone: it will run again
        k[state] += 1
        if state in ("done", "cached"):
            k["seconds"] += float(entry.get("seconds", 0.0))
            if entry.get("cpu_seconds") is not None:  # absent for tasks finished before it was recorded
                k["cpu_seconds"] += float(entry["cpu_seconds"])
                k["cpu_tasks"] += 1
    total = {s: sum(k[s] for k in kinds.values()) for s in (*STATES, "seconds", "cpu_seconds", "cpu_tasks")}
    return {"name": record.get("name"), "active": active, "finished": record.get("finished"),
            "started": record.get("started"), "pid": record.get("pid"), "executor": record.get("executor"),
            "workers": record.get("workers"), "kinds": kinds, "total": total,
            "failed": {t: e.get("error") for t, e in record["tasks"].items() if e["state"] == "failed"}}


def format_status(status: dict, study_dir) -> str:
    """The status as a small table, one row per kind of task."""
    if status["active"]:
        head = f"running since {status['started']} (pid {status['pid']}, {status['executor']}, {status['workers']} workers)"
    elif status["finished"]:
        head = f"finished at {status['finished']}"
    else:
        head = f"stopped (started {status['started']}); `modlens study run` resumes it"
    lines = [f"study {status['name']!r} in {study_dir}: {head}",
             f"{'kind':<15}{'done':>6}{'running':>9}{'left':>6}{'failed':>8}  time of the finished ones (wall; CPU)"]
    order = ("train", "model", "partition", "lesion", "vis", "clusterability", "stats")
    kinds = sorted(status["kinds"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    rows = [*kinds, ("total", status["total"])]
    for kind, k in rows:
        done = k["done"] + k["cached"]
        cpu = ""
        if k.get("cpu_tasks"):
            cpu = f"; {k['cpu_seconds']:.1f} s CPU" + (f" of {k['cpu_tasks']}" if k["cpu_tasks"] < done else "")
        lines.append(f"{kind:<15}{done:>6}{k['running']:>9}{k['pending']:>6}{k['failed']:>8}  "
                     f"{k['seconds']:.1f} s{cpu}" + (f" ({k['cached']} from earlier runs)" if k["cached"] else ""))
    for task, error in status["failed"].items():
        lines.append(f"failed: {task}: {error}")
    return "\n".join(lines)


__all__ = ["STATUS_FILE", "RunLog", "study_status", "format_status"]
