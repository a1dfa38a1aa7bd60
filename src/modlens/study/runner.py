"""Run a study: the task graph train -> partition -> lesion test / feature visualization ->
statistics, run on an executor, cached in the study folder, and the study's outputs.

Outputs in the study folder (``--out``):

* ``networks/<network_id>/``: each network's analysis, in the format of ``modlens analyze``
  (``<network_id>-k<k>`` when the study has several k values);
* ``study_rows.parquet`` / ``.csv``: one row per (group, k, partitioning, metric), the Fisher-Bates
  p value over the group's replicates and the effect measure, ready for per-table corrections;
* ``study.json``: the resolved spec, versions, seeds, per-task timings, start and end time;
* ``tasks/``: the task cache (a rerun skips every task whose key is there).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd

from modlens.analysis.stages import config_subset
from modlens.analysis.statistics import summarize, table_family
from modlens.analysis.storage import atomic_write_frame, atomic_write_text, canonical, copy_folder, pretty
from modlens.core.seeds import derived_seed
from modlens.report import write_study_outputs
from modlens.study.executors import make_executor
from modlens.study.progress import StudyProgress
from modlens.study.results import StudyResult
from modlens.study.status import RunLog
from modlens.study.spec import NetworkGroup, SpecError, StudySpec
from modlens.nn.sources import parse_model_name
from modlens.study.inputs import data_identity, network_names, resolve_networks
from modlens.study.task_kinds import COUNTS_FILE, write_counts_identity
from modlens.study.tasks import clean_temporaries, read_done, task_dir, task_key


class StudyError(RuntimeError):
    """A task of the study failed; the message names the task."""


@dataclass
class Node:
    id: str
    kind: str
    deps: list[str]
    make: Callable[[dict], tuple[dict, dict]]  # finished results of the deps -> (params, inputs)


def _ref(result: dict) -> dict:
    """What a task needs of an upstream result: its folder, or for a model given by name its source
    record (only the digest enters the task's key)."""
    return {k: result[k] for k in ("dir", "source", "digest") if k in result}


def check_requirements(spec: StudySpec, data_dir=None) -> dict[str, list]:
    """Fail before any work when a study needs files that are not there, or names a model, a weights
    file or data that cannot be used (one line each). Returns each saved-model group's resolved
    networks (:func:`modlens.study.inputs.resolve_networks`), every model built once to check that
    its weights fit."""
    from modlens.data import data_root

    root = data_root(data_dir)
    resolved = {}
    for g in spec.networks:
        if g.trained and g.dataset == "text":
            missing = [f for f in ("prose.txt", "code.txt") if not (root / "text" / f).is_file()]
            if missing:
                raise SpecError(f"study {spec.name!r} needs the two-genre text corpus: put {', '.join(missing)} in "
                                f"{root / 'text'} (or pass --data-dir DIR)")
        if g.trained and g.dataset == "cifar10":
            folder = root / "cifar-10-batches-py"
            if not (folder / "test_batch").is_file() and not (root / "cifar-10-python.tar.gz").is_file():
                raise SpecError(f"study {spec.name!r} needs CIFAR-10: put cifar-10-python.tar.gz (or its extracted "
                                f"cifar-10-batches-py/ folder) in {root} (or pass --data-dir DIR)")
        for m in g.models:
            if parse_model_name(m)[0] == "folder" and not (Path(m) / "manifest.json").is_file():
                raise SpecError(f"study {spec.name!r}, group {g.group!r}: no model folder at {m}; save the weights there "
                                "with modlens.nn.io.save_model (model.safetensors + manifest.json), or name the model "
                                "(pkg.module:factory, timm:NAME, torchvision:NAME, hf:REPO_OR_FOLDER)")
        if g.imagenet is not None and not Path(g.imagenet["folder"]).is_dir():
            raise SpecError(f"study {spec.name!r}, group {g.group!r}: no ImageNet validation folder at "
                            f"{g.imagenet['folder']}; put the images there as <wnid>/<image>.JPEG (or pass --data-dir DIR)")
        if g.models:
            try:
                resolved[g.group] = resolve_networks(g.models, g.weights, model_args=g.model_args, init_seed=g.init_seed,
                                                     data=g.data, build=True)
            except (ValueError, TypeError, ImportError, OSError) as exc:
                raise SpecError(f"study {spec.name!r}, group {g.group!r}: {exc}") from None
    return resolved


def _network_ids(group: NetworkGroup, networks=None) -> list[str]:
    if group.trained:
        return [f"{group.group}-s{s}" for s in group.seeds]
    names = network_names([source for source, _ in networks])
    return [group.group if len(names) == 1 else f"{group.group}-{n}" for n in names]


def build_graph(spec: StudySpec, study_dir: Path, resolved: dict | None = None
                ) -> tuple[list[Node], dict[str, dict], list[dict]]:
    """The task nodes (in a fixed order), the finished inputs that need no task (models given by
    folder or name: ``resolved`` from :func:`check_requirements`, resolved here without building
    when not given), and one record per (network, k) analysis."""
    a = spec.analysis
    nodes: list[Node] = []
    given: dict[str, dict] = {}
    analyses: list[dict] = []
    several_k = len(a.n_clusters) > 1
    resolved = dict(resolved or {})
    identities: dict[str, dict] = {}
    for g in spec.networks:
        if g.models and g.group not in resolved:
            resolved[g.group] = resolve_networks(g.models, g.weights, model_args=g.model_args, init_seed=g.init_seed,
                                                 data=g.data)
        for i, nid in enumerate(_network_ids(g, resolved.get(g.group))):
            if g.trained:
                src = f"train:{nid}"
                nodes.append(Node(src, "train", [], lambda done, g=g, i=i: (
                    {"arch": g.arch, "dataset": g.dataset, "seed": g.seeds[i], "recipe": dict(g.recipe)}, {})))
            else:
                src = f"model:{nid}"
                source, data = resolved[g.group][i]
                record = source.record()
                given[src] = {"kind": "model", "source": record, "digest": source.digest, "info": {"dataset": data}}
                if source.kind == "folder":
                    given[src]["dir"] = str(Path(source.target).resolve())

            def net_facts(done, src=src):
                model = done[src]
                data = model["info"]["dataset"]
                if src not in identities:  # hashing an image folder once per network, not once per task
                    identities[src] = data_identity(data)
                return model, data, identities[src], derived_seed(a.random_state, model["digest"])

            for k in a.n_clusters:
                aid = f"{nid}-k{k}" if several_k else nid
                parts, lesions, vis, clus = [], [], [], []
                for method in a.partitionings:
                    pid, lid, vid, cid = (f"{kind}:{aid}:{method}" for kind in ("partition", "lesion", "vis",
                                                                                 "clusterability"))

                    # each task's params hold the fields of the network's AnalysisConfig that its stage
                    # reads (stages.STAGE_FIELDS), so its key changes exactly when one of them does
                    def make_task(done, kind, k=k, method=method, pid=pid, net_facts=net_facts):
                        model, data, ident, rs = net_facts(done)
                        params, inputs = _data_parts(data, ident)
                        params.update(method=method, config=config_subset(a.network_config(k, rs), kind))
                        inputs["model"] = _ref(model)
                        if kind in ("lesion", "vis"):
                            inputs["partition"] = _ref(done[pid])
                        return params, inputs

                    nodes.append(Node(pid, "partition", [src], partial(make_task, kind="partition")))
                    nodes.append(Node(lid, "lesion", [src, pid], partial(make_task, kind="lesion")))
                    parts.append(pid)
                    lesions.append(lid)
                    if a.feature_vis:
                        nodes.append(Node(vid, "vis", [src, pid], partial(make_task, kind="vis")))
                        vis.append(vid)
                    if a.clusterability and method.startswith("weights/"):  # as analyze: weight partitionings
                        nodes.append(Node(cid, "clusterability", [src], partial(make_task, kind="clusterability")))
                        clus.append(cid)
                sid = f"stats:{aid}"
                record = {"id": aid, "network": nid, "group": g.group, "label": g.label, "k": k, "stats": sid,
                          "source": src, "seed": g.seeds[i] if g.trained else None}

                def make_stats(done, k=k, parts=parts, lesions=lesions, vis=vis, clus=clus, record=record,
                               net_facts=net_facts):
                    model, data, ident, rs = net_facts(done)
                    net = {"id": record["id"], "group": record["group"], "seed": record["seed"], "digest": model["digest"],
                           "dataset": data if "files" not in data else ident}
                    inputs = {"partitions": [_ref(done[p]) for p in parts], "lesions": [_ref(done[x]) for x in lesions],
                              "vis": [_ref(done[x]) for x in vis]}
                    if clus:
                        inputs["clusterability"] = [_ref(done[x]) for x in clus]
                    return ({"config": config_subset(a.network_config(k, rs), "stats"), "network": net,
                             "figures": a.figures and a.feature_vis}, inputs)

                nodes.append(Node(sid, "stats", [src, *parts, *lesions, *vis, *clus], make_stats))
                analyses.append(record)
    return nodes, given, analyses


def _data_parts(data: dict, ident: dict) -> tuple[dict, dict]:
    """A task's data: a dataset record in its params (as before), named files as an input whose
    digest is that of their identity (so a moved folder keeps the task's key, changed files do not)."""
    if "files" not in data:
        return {"data": data, "data_id": ident}, {}
    digest = hashlib.sha256(canonical(ident).encode()).hexdigest()
    return {"data_id": ident}, {"data": {"description": data, "digest": digest}}


def _digests(inputs: dict) -> dict:
    out = {}
    for name, value in inputs.items():
        out[name] = [v["digest"] for v in value] if isinstance(value, list) else value["digest"]
    return out


def run_study(spec: StudySpec, out, *, data_dir=None, executor: str = "auto", workers: int | None = None,
              progress: bool = True, device: str = "cpu", ray_address: str | None = None) -> StudyResult:
    """Run every task of ``spec`` that is not already in ``out``'s cache, then write the outputs.
    ``executor="auto"`` (the default) runs the tasks on every core (every GPU with several GPUs and
    ``device`` not ``"cpu"``); ``"inline"``, ``"processes"`` and ``"ray"`` give the same tables.
    Returns the study folder as a :class:`~modlens.study.results.StudyResult` (a path that displays
    the study's tables and figures in a notebook)."""
    resolved = check_requirements(spec, data_dir)
    study_dir = Path(out)
    study_dir.mkdir(parents=True, exist_ok=True)
    with _locked(study_dir):
        clean_temporaries(study_dir)
        return _run_locked(spec, study_dir, data_dir=data_dir, executor=executor, workers=workers, progress=progress,
                           device=device, ray_address=ray_address, resolved=resolved)


@contextmanager
def _locked(study_dir: Path):
    """One run per study folder at a time (the lock goes with the process, even when it is killed)."""
    import fcntl

    with open(study_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StudyError(f"another modlens study run is using {study_dir}; wait for it or choose another --out") from None
        yield


def _run_locked(spec: StudySpec, study_dir: Path, *, data_dir, executor, workers, progress, device, ray_address,
                resolved=None) -> Path:
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    nodes, given, analyses = build_graph(spec, study_dir, resolved)
    # what a task needs but its results do not depend on (so it is not in the task keys)
    context = {"data_dir": None if data_dir is None else str(Path(data_dir).resolve()), "device": device,
               "engine": spec.analysis.config.engine}
    bar = StudyProgress(len(nodes), enabled=progress, desc=spec.name)
    pool = make_executor(executor, workers=workers, progress=bar.update, ray_address=ray_address, device=device)
    log = RunLog(study_dir, spec.name, nodes, executor=pool.name, workers=pool.capacity)
    done: dict[str, dict] = dict(given)
    timings: list[dict] = []
    pending = list(nodes)
    running: dict = {}
    ready: dict[str, tuple] = {}   # task -> (params, inputs, key) once its inputs exist and it is not cached
    completed = False
    try:
        while pending or running:
            # Tasks done by an earlier run are taken as soon as their inputs are, whether or not a worker
            # is free (they need none); the others start while workers are free, in the graph's order.
            progressed = True
            while progressed:
                progressed = False
                for node in list(pending):
                    if not all(d in done for d in node.deps):
                        continue
                    if node.id not in ready:
                        params, inputs = node.make(done)
                        key = task_key(node.kind, params, _digests(inputs))
                        cached = read_done(study_dir, node.kind, key)
                        if cached is not None:
                            if node.kind == "lesion":   # tasks finished before lesion counts were shared
                                folder = task_dir(study_dir, node.kind, key)
                                if not (folder / COUNTS_FILE).is_file():
                                    write_counts_identity(folder, params, inputs)
                            pending.remove(node)
                            done[node.id] = dict(cached, dir=str(task_dir(study_dir, node.kind, key)))
                            timings.append({"task": node.id, "kind": node.kind, "key": key, "seconds": cached["seconds"],
                                            "cpu_seconds": cached.get("cpu_seconds"), "cached": True})
                            bar.finished(node.id, cached=True)
                            log.set(node.id, "cached", cached["seconds"], cpu_seconds=cached.get("cpu_seconds"))
                            progressed = True
                            continue
                        ready[node.id] = (params, inputs, key)
                    if len(running) < pool.capacity:
                        pending.remove(node)
                        params, inputs, key = ready.pop(node.id)
                        bar.started(node.id)
                        log.set(node.id, "running")
                        args = (str(study_dir), node.kind, key, params, inputs, context)
                        running[pool.submit(node.id, args)] = (node, key)
                        progressed = True
            if not running:
                if pending:
                    raise StudyError(f"tasks {[n.id for n in pending]} wait on tasks that never run")
                break
            finished = pool.wait(list(running), timeout=0.2)
            for task_id, what, n in pool.poll_progress():
                bar.update(task_id, what, n)
            for handle, result, error in finished:
                node, key = running.pop(handle)
                if error is not None:
                    log.set(node.id, "failed", error=f"{type(error).__name__}: {error}")
                    raise StudyError(f"task {node.id} ({node.kind}, key {key[:12]}) failed: "
                                     f"{type(error).__name__}: {error}") from error
                done[node.id] = dict(result, dir=str(task_dir(study_dir, node.kind, key)))
                timings.append({"task": node.id, "kind": node.kind, "key": key, "seconds": result["seconds"],
                                "cpu_seconds": result.get("cpu_seconds"), "cached": False})
                bar.finished(node.id)
                log.set(node.id, "done", result["seconds"], cpu_seconds=result.get("cpu_seconds"))
        completed = True
    finally:
        bar.close()
        pool.close()
        log.close(finished=False)
    run = {"executor": pool.name, "executor_requested": executor, "workers": pool.capacity}
    write_outputs(spec, study_dir, done, analyses, timings=timings, started=started,
                  seconds=time.perf_counter() - t0, run=run)
    log.close(finished=completed)
    return StudyResult(study_dir)


def study_rows(spec: StudySpec, analyses: list[dict], done: dict) -> pd.DataFrame:
    """One row per (group, k, partitioning, metric): Fisher-Bates over the group's replicates."""
    frames = []
    keys = list(dict.fromkeys((r["group"], r["k"]) for r in analyses))
    for group, k in keys:
        members = [r for r in analyses if r["group"] == group and r["k"] == k]
        tests = pd.concat([pd.read_parquet(Path(done[r["stats"]]["dir"]) / "result" / "tests.parquet").assign(network=r["id"])
                           for r in members], ignore_index=True)
        rows = summarize(tests, partitionings=list(spec.analysis.partitionings), alpha=spec.analysis.alpha,
                         combine=spec.analysis.combine, random_state=spec.analysis.random_state)
        rows = rows.drop(columns=["q_value", "significant"])
        rows.insert(0, "table_family", [table_family(m) for m in rows["metric"]])
        rows.insert(1, "group", group)
        rows.insert(2, "network_label", members[0]["label"])
        rows.insert(3, "k", int(k))
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def _versions() -> dict:
    import numpy
    import scipy
    import sklearn
    import torch

    from modlens._version import __version__

    return {"modlens": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
            "pandas": pd.__version__, "platform": platform.platform()}


def utilization(timings: list[dict], wall_seconds: float, workers: int) -> float | None:
    """Task-seconds over wall-seconds x workers, of the tasks run (not taken from the cache); None
    when none ran."""
    busy = sum(t["seconds"] for t in timings if not t["cached"])
    if not any(not t["cached"] for t in timings) or wall_seconds <= 0 or not workers:
        return None  # every task came from the cache: nothing ran to keep the workers busy
    return busy / (wall_seconds * workers)


def _cpu_seconds(timings: list[dict]) -> float | None:
    """The CPU seconds of the tasks, None when a task's result predates the CPU-time record."""
    cpu = [t.get("cpu_seconds") for t in timings]
    return None if not cpu or any(c is None for c in cpu) else float(sum(cpu))


def write_outputs(spec: StudySpec, study_dir: Path, done: dict, analyses: list[dict], *, timings: list[dict],
                  started: str, seconds: float, run: dict) -> None:
    """``networks/``, ``study_rows``, ``study.json`` (with the run's executor, workers and
    utilization: task-seconds over the run's wall-seconds, from reading the spec to the last task,
    times workers) and the report's tables and figures."""
    nets = study_dir / "networks"
    nets.mkdir(exist_ok=True)
    for r in analyses:
        copy_folder(Path(done[r["stats"]]["dir"]) / "result", nets / r["id"])
    atomic_write_frame(study_rows(spec, analyses, done), study_dir / "study_rows")
    networks = []
    for r in analyses:
        src = done[r["source"]]
        source = src.get("source")
        if source is not None:  # the result records where its model came from, weights file included
            _add_source(nets / r["id"] / "manifest.json", source)
        networks.append({
            "id": r["id"], "network": r["network"], "group": r["group"], "label": r["label"], "k": r["k"],
            "train_seed": r["seed"], "random_state": derived_seed(spec.analysis.random_state, src["digest"]),
            "model_dir": (os.path.relpath(src["dir"], study_dir) if source is None else src["dir"]) if "dir" in src else None,
            "model_source": source, "model_sha256": src["digest"], "dataset": src["info"].get("dataset"),
            "test_accuracy": src["info"].get("test_accuracy"),
        })
    record = {
        "format": "modlens-study", "name": spec.name, "description": spec.description, "source": spec.source,
        "spec": spec.raw, "resolved": {"analysis": spec.analysis.record(), "networks": [_plain(g) for g in spec.networks]},
        "networks": networks, "versions": _versions(), **run,
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds,
        "utilization": {"task_seconds": sum(t["seconds"] for t in timings if not t["cached"]),
                        "task_cpu_seconds": _cpu_seconds([t for t in timings if not t["cached"]]),
                        "wall_seconds": seconds, "workers": run["workers"],
                        "value": utilization(timings, seconds, run["workers"])},
        "tasks": timings,
    }
    atomic_write_text(study_dir / "study.json", pretty(record))
    write_study_outputs(study_dir)


def _add_source(path: Path, source: dict) -> None:
    manifest = json.loads(path.read_text())
    for m in manifest.get("models", []):
        m["source"] = source
    atomic_write_text(path, pretty(manifest))


def _plain(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


__all__ = ["run_study", "build_graph", "study_rows", "check_requirements", "StudyError", "write_outputs", "utilization"]
