"""The tasks of a study and the cache that holds their outputs.

A task is ``(kind, params, inputs)``: ``params`` are JSON-able options, ``inputs`` the outputs of
the tasks it depends on. Its key is the SHA-256 of its kind, a format version, its params and the
digests of its inputs (a model's digest is the SHA-256 of its weights, a partition's that of its
labels), so the key changes exactly when something the task depends on changes. A task writes into
``<study>/tasks/<kind>/.tmp-<key>-<pid>/`` and renames that folder to ``<study>/tasks/<kind>/<key>/``
when it is complete: a finished task is a folder that exists, a killed one leaves only a temporary
folder that the next run removes. A long task may keep finished parts of its work in
``<study>/tasks/<kind>/.partial-<key>/`` (lesion tasks keep the class counts of each batch of lesion
sets there): a killed run leaves that folder, the next run of the same task reads it instead of
recomputing those parts, and the folder is removed when the task is complete.

Every task runs with one CPU thread (torch and the BLAS libraries): results of floating-point
reductions depend on the number of threads, and a study's tables must not depend on how many
workers run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from modlens.analysis.storage import canonical, is_temporary
from modlens.study.task_kinds import KINDS

#: Bump a kind's version when what its task computes changes, so old cache entries are not reused.
VERSIONS = {"train": 1, "partition": 2, "lesion": 2, "vis": 2, "clusterability": 1,
            "stats": 2}  # 2: params hold AnalysisConfig fields
RESULT_FILE = "result.json"


def task_key(kind: str, params: dict, input_digests: dict[str, str]) -> str:
    from modlens._version import __version__

    body = {"kind": kind, "version": VERSIONS[kind], "modlens": __version__, "params": params,
            "inputs": input_digests}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def task_dir(study_dir: Path, kind: str, key: str) -> Path:
    return Path(study_dir) / "tasks" / kind / key


def read_done(study_dir: Path, kind: str, key: str) -> dict | None:
    """The recorded result of a finished task, or None."""
    path = task_dir(study_dir, kind, key) / RESULT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def clean_temporaries(study_dir: Path) -> int:
    """Remove the temporary folders and files that killed runs left behind."""
    n = 0
    root = Path(study_dir)
    for path in [*root.glob("tasks/*/.tmp-*"), *(p for p in [*root.iterdir(), *root.glob("networks/*")]
                                                  if is_temporary(p))]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        n += 1
    return n


@contextmanager
def single_thread():
    """Run torch and the BLAS libraries on one thread; restore the previous settings afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- execution in a worker

Progress = Callable[[str, int], None]  # ("total", n) once, then ("advance", n)


def execute(study_dir: str, kind: str, key: str, params: dict, inputs: dict, context: dict,
            progress: Progress | None = None) -> dict:
    """Run one task (in whatever process the executor chose) unless its folder already exists;
    return its recorded result (``digest``, ``seconds``: wall time, ``cpu_seconds``: the CPU time of the
    process that ran it, absent from results written before it was recorded, ``info``)."""
    study_dir = Path(study_dir)
    done = read_done(study_dir, kind, key)
    if done is not None:
        return done
    final = task_dir(study_dir, kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key[:16]}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    say = progress or (lambda what, n: None)
    partial = final.parent / f".partial-{key[:16]}"   # parts of the work a killed run finished (same key)
    context = {**context, "partial_dir": str(partial)}
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with single_thread():
            digest, info = KINDS[kind](tmp, params, inputs, context, say)
        # cpu_seconds: the CPU time of the process that ran the task (every thread of it), over the task
        result = {"kind": kind, "key": key, "digest": digest or key, "seconds": time.perf_counter() - started,
                  "cpu_seconds": time.process_time() - cpu_started, "info": info}
        (tmp / RESULT_FILE).write_text(canonical(result))
        try:
            os.rename(tmp, final)
        except OSError:  # another worker finished the same task first: keep its output
            if read_done(study_dir, kind, key) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_done(study_dir, kind, key)


__all__ = ["VERSIONS", "task_key", "task_dir", "read_done", "clean_temporaries", "execute", "single_thread"]
