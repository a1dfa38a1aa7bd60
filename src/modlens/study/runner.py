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
from modlens.analysis.storage import atomic_write_frame, atomic_write_text, copy_folder, pretty
from modlens.core.seeds import derived_seed
from modlens.report import write_study_outputs
from modlens.study.executors import make_executor
from modlens.study.progress import StudyProgress
from modlens.study.spec import NetworkGroup, SpecError, StudySpec
from modlens.study.task_kinds import data_identity
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
    return {"dir": result["dir"], "digest": result["digest"]}


def check_requirements(spec: StudySpec, data_dir=None) -> None:
    """Fail before any work when a study needs files that are not there (one line each)."""
    from modlens.data import data_root

    root = data_root(data_dir)
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
            if not (Path(m) / "manifest.json").is_file():
                raise SpecError(f"study {spec.name!r}, group {g.group!r}: no model folder at {m}; save the weights there "
                                "with modlens.nn.io.save_model (model.safetensors + manifest.json)")
        if g.imagenet is not None and not Path(g.imagenet["folder"]).is_dir():
            raise SpecError(f"study {spec.name!r}, group {g.group!r}: no ImageNet validation folder at "
                            f"{g.imagenet['folder']}; put the images there as <wnid>/<image>.JPEG (or pass --data-dir DIR)")


def _network_ids(group: NetworkGroup) -> list[str]:
    if group.trained:
        return [f"{group.group}-s{s}" for s in group.seeds]
    names = [Path(m).name for m in group.models]
    if len(set(names)) != len(names):
        names = [f"{i}" for i in range(len(names))]
    return [group.group if len(names) == 1 else f"{group.group}-{n}" for n in names]


def build_graph(spec: StudySpec, study_dir: Path) -> tuple[list[Node], dict[str, dict], list[dict]]:
    """The task nodes (in a fixed order), the finished inputs that need no task (saved models),
    and one record per (network, k) analysis."""
    a = spec.analysis
    nodes: list[Node] = []
    given: dict[str, dict] = {}
    analyses: list[dict] = []
    several_k = len(a.n_clusters) > 1
    for g in spec.networks:
        for i, nid in enumerate(_network_ids(g)):
            if g.trained:
                src = f"train:{nid}"
                nodes.append(Node(src, "train", [], lambda done, g=g, i=i: (
                    {"arch": g.arch, "dataset": g.dataset, "seed": g.seeds[i], "recipe": dict(g.recipe)}, {})))
            else:
                src = f"model:{nid}"
                manifest = json.loads((Path(g.models[i]) / "manifest.json").read_text())
                data = {"imagenet": g.imagenet} if g.imagenet is not None else manifest.get("dataset")
                if not isinstance(data, dict):
                    raise SpecError(f"group {g.group!r}: the manifest of {g.models[i]} names no dataset; "
                                    "give an imagenet = {...} table or save the model with its dataset")
                given[src] = {"kind": "model", "dir": str(Path(g.models[i]).resolve()), "digest": manifest["sha256"],
                              "info": {"dataset": data}}

            def net_facts(done, src=src):
                model = done[src]
                data = model["info"]["dataset"]
                return model, data, data_identity(data), derived_seed(a.random_state, model["digest"])

            for k in a.n_clusters:
                aid = f"{nid}-k{k}" if several_k else nid
                parts, lesions, vis = [], [], []
                for method in a.partitionings:
                    pid, lid, vid = (f"{kind}:{aid}:{method}" for kind in ("partition", "lesion", "vis"))

                    # each task's params hold the fields of the network's AnalysisConfig that its stage
                    # reads (stages.STAGE_FIELDS), so its key changes exactly when one of them does
                    def make_partition(done, k=k, method=method, net_facts=net_facts):
                        model, data, ident, rs = net_facts(done)
                        return ({"method": method, "config": config_subset(a.network_config(k, rs), "partition"),
                                 "data": data, "data_id": ident}, {"model": _ref(model)})

                    def make_test(done, kind, k=k, method=method, pid=pid, net_facts=net_facts):
                        model, data, ident, rs = net_facts(done)
                        return ({"method": method, "config": config_subset(a.network_config(k, rs), kind),
                                 "data": data, "data_id": ident}, {"model": _ref(model), "partition": _ref(done[pid])})

                    nodes.append(Node(pid, "partition", [src], make_partition))
                    nodes.append(Node(lid, "lesion", [src, pid], partial(make_test, kind="lesion")))
                    parts.append(pid)
                    lesions.append(lid)
                    if a.feature_vis:
                        nodes.append(Node(vid, "vis", [src, pid], partial(make_test, kind="vis")))
                        vis.append(vid)
                sid = f"stats:{aid}"
                record = {"id": aid, "network": nid, "group": g.group, "label": g.label, "k": k, "stats": sid,
                          "source": src, "seed": g.seeds[i] if g.trained else None,
                          "model_path": None if g.trained else str(Path(g.models[i]).resolve())}

                def make_stats(done, k=k, parts=parts, lesions=lesions, vis=vis, record=record, net_facts=net_facts):
                    model, data, ident, rs = net_facts(done)
                    net = {"id": record["id"], "group": record["group"], "seed": record["seed"], "digest": model["digest"],
                           "dataset": data if "imagenet" not in data else ident}
                    return ({"config": config_subset(a.network_config(k, rs), "stats"), "network": net,
                             "figures": a.figures and a.feature_vis},
                            {"partitions": [_ref(done[p]) for p in parts], "lesions": [_ref(done[x]) for x in lesions],
                             "vis": [_ref(done[x]) for x in vis]})

                nodes.append(Node(sid, "stats", [src, *parts, *lesions, *vis], make_stats))
                analyses.append(record)
    return nodes, given, analyses


def _digests(inputs: dict) -> dict:
    out = {}
    for name, value in inputs.items():
        out[name] = [v["digest"] for v in value] if isinstance(value, list) else value["digest"]
    return out


def run_study(spec: StudySpec, out, *, data_dir=None, executor: str = "inline", workers: int | None = None,
              progress: bool = True, device: str = "cpu", ray_address: str | None = None) -> Path:
    """Run every task of ``spec`` that is not already in ``out``'s cache, then write the outputs."""
    check_requirements(spec, data_dir)
    study_dir = Path(out)
    study_dir.mkdir(parents=True, exist_ok=True)
    with _locked(study_dir):
        clean_temporaries(study_dir)
        return _run_locked(spec, study_dir, data_dir=data_dir, executor=executor, workers=workers, progress=progress,
                           device=device, ray_address=ray_address)


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


def _run_locked(spec: StudySpec, study_dir: Path, *, data_dir, executor, workers, progress, device, ray_address) -> Path:
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    nodes, given, analyses = build_graph(spec, study_dir)
    # what a task needs but its results do not depend on (so it is not in the task keys)
    context = {"data_dir": None if data_dir is None else str(Path(data_dir).resolve()), "device": device,
               "engine": spec.analysis.config.engine}
    bar = StudyProgress(len(nodes), enabled=progress, desc=spec.name)
    pool = make_executor(executor, workers=workers, progress=bar.update, ray_address=ray_address)
    done: dict[str, dict] = dict(given)
    timings: list[dict] = []
    pending = list(nodes)
    running: dict = {}
    try:
        while pending or running:
            submitted = True
            while submitted and len(running) < pool.capacity:
                submitted = False
                for node in pending:
                    if all(d in done for d in node.deps):
                        pending.remove(node)
                        params, inputs = node.make(done)
                        key = task_key(node.kind, params, _digests(inputs))
                        cached = read_done(study_dir, node.kind, key)
                        if cached is not None:
                            done[node.id] = dict(cached, dir=str(task_dir(study_dir, node.kind, key)))
                            timings.append({"task": node.id, "kind": node.kind, "key": key, "seconds": cached["seconds"],
                                            "cached": True})
                            bar.finished(node.id, cached=True)
                        else:
                            bar.started(node.id)
                            args = (str(study_dir), node.kind, key, params, inputs, context)
                            running[pool.submit(node.id, args)] = (node, key)
                        submitted = True
                        break
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
                    raise StudyError(f"task {node.id} ({node.kind}, key {key[:12]}) failed: "
                                     f"{type(error).__name__}: {error}") from error
                done[node.id] = dict(result, dir=str(task_dir(study_dir, node.kind, key)))
                timings.append({"task": node.id, "kind": node.kind, "key": key, "seconds": result["seconds"],
                                "cached": False})
                bar.finished(node.id)
    finally:
        bar.close()
        pool.close()
    write_outputs(spec, study_dir, done, analyses, timings=timings, started=started,
                  seconds=time.perf_counter() - t0, executor=executor, workers=workers)
    return study_dir


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


def write_outputs(spec: StudySpec, study_dir: Path, done: dict, analyses: list[dict], *, timings: list[dict],
                  started: str, seconds: float, executor: str, workers: int | None) -> None:
    nets = study_dir / "networks"
    nets.mkdir(exist_ok=True)
    for r in analyses:
        copy_folder(Path(done[r["stats"]]["dir"]) / "result", nets / r["id"])
    atomic_write_frame(study_rows(spec, analyses, done), study_dir / "study_rows")
    networks = []
    for r in analyses:
        src = done[r["source"]]
        networks.append({
            "id": r["id"], "network": r["network"], "group": r["group"], "label": r["label"], "k": r["k"],
            "train_seed": r["seed"], "random_state": derived_seed(spec.analysis.random_state, src["digest"]),
            "model_dir": os.path.relpath(src["dir"], study_dir) if r["model_path"] is None else r["model_path"],
            "model_sha256": src["digest"], "dataset": src["info"].get("dataset"),
            "test_accuracy": src["info"].get("test_accuracy"),
        })
    record = {
        "format": "modlens-study", "name": spec.name, "description": spec.description, "source": spec.source,
        "spec": spec.raw, "resolved": {"analysis": spec.analysis.record(), "networks": [_plain(g) for g in spec.networks]},
        "networks": networks, "versions": _versions(), "executor": executor, "workers": workers,
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds,
        "tasks": timings,
    }
    atomic_write_text(study_dir / "study.json", pretty(record))
    write_study_outputs(study_dir)


def _plain(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


__all__ = ["run_study", "build_graph", "study_rows", "check_requirements", "StudyError", "write_outputs"]
