"""What each kind of study task computes: ``run_<kind>(out, params, inputs, context, say)``
writes the task's files into ``out`` (a temporary folder) and returns ``(digest, info)``.

``inputs`` maps a name to ``{"dir": folder of the upstream output, "digest": ...}`` (lists for the
statistics task), and ``{"model": {"source": record, "digest": ...}}`` for a model given by name;
named data files travel as ``inputs["data"]``; ``context`` holds what does not change results
(``data_dir``, ``device``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from modlens.analysis.storage import canonical
from modlens.study.inputs import load_files

_DATA_CACHE: dict[str, tuple] = {}


def _device(context: dict) -> str:
    want = context.get("device", "cpu")
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def network_data(data: dict, data_dir=None, *, require_labels: bool = True):
    """``((x_test, y_test), x_activation)`` tensors for a network's data description: a model
    manifest's ``dataset`` entry, or ``{"files": ...}`` (:mod:`modlens.study.inputs`). Kept for the
    next task of the process. ``require_labels=False``: token ids of the next-token task, no labels."""
    key = canonical([data, str(data_dir), require_labels])
    if key not in _DATA_CACHE:
        if "files" in data:
            value = load_files(data, data_dir=data_dir, require_labels=require_labels)
        else:
            from modlens.study.commands import model_data

            value = model_data({"dataset": data}, data_dir=data_dir)
        _DATA_CACHE.clear()  # one dataset at a time: MNIST-sized arrays are large enough
        _DATA_CACHE[key] = value
    return _DATA_CACHE[key]


def _data(params: dict, inputs: dict, context: dict):
    """The task's data: named files travel in ``inputs["data"]`` (their digest is in the key, their
    paths are not), a dataset record in ``params["data"]``."""
    data = inputs["data"]["description"] if "data" in inputs else params["data"]
    task = (params.get("config") or {}).get("task")
    return network_data(data, context.get("data_dir"), require_labels=task != "next-token")


def _load(inputs: dict, context: dict, x, cfg):
    """The model and its adapter, captured at the test inputs ``x`` as ``analyze`` captures it."""
    import torch

    from modlens.analysis.stages import network_adapter

    ref = inputs["model"]
    if "source" in ref:  # a model given by name: found again, and checked to be the one the key names
        from modlens.nn.sources import source_from_record

        source = source_from_record(ref["source"])
        if source.digest != ref["digest"]:
            raise RuntimeError(f"{ref['source']['name']} changed while the study ran (digest {source.digest[:12]}, "
                               f"expected {ref['digest'][:12]}); run the study again")
        model = source.build()
    else:
        from modlens.nn.io import load_model

        model, _ = load_model(ref["dir"])
    device = _device(context)
    if device != "cpu":
        model = model.to(device)
        x = x.to(device) if isinstance(x, torch.Tensor) else x
    return model, network_adapter(model, x, cfg)


def _read_partition(inputs: dict):
    from modlens.analysis.result import partition_from_dict

    return partition_from_dict(json.loads((Path(inputs["partition"]["dir"]) / "partition.json").read_text()))


def run_train(out: Path, params: dict, inputs: dict, context: dict, say):
    from modlens.experiments.train import default_epochs
    from modlens.study.commands import train_and_save

    recipe = params["recipe"]
    if params["arch"] == "gpt":  # the language model reports every step
        from modlens.experiments.train import recipe as arch_recipe

        say("total", int(recipe.get("steps") or arch_recipe({"type": "gpt"})["steps"]))
    else:
        say("total", int(recipe.get("epochs") or default_epochs(params["arch"], params["dataset"])))
    [(_, manifest)] = train_and_save(
        params["dataset"], seeds=[params["seed"]], out=out, folders=False, data_dir=context.get("data_dir"),
        data_seed=recipe.get("data_seed", 0), batch_size=recipe.get("batch_size"),
        epochs=recipe.get("steps") if params["arch"] == "gpt" else recipe.get("epochs"),
        n_val=recipe.get("n_val", 5000), arch=params["arch"], augment=recipe.get("augment"), l2=recipe.get("l2"),
        regularize=recipe.get("regularize", True), progress=lambda epoch, n, loss: say("advance", 1))
    sha = json.loads((out / "manifest.json").read_text())["sha256"]
    info = {"test_accuracy": manifest["accuracy"], "dataset": manifest["dataset"]}
    if "test_cross_entropy" in manifest.get("training", {}):
        info["test_cross_entropy"] = manifest["training"]["test_cross_entropy"]
    return sha, info


def run_partition(out: Path, params: dict, inputs: dict, context: dict, say):
    from modlens.analysis.result import partition_digest, partition_to_dict
    from modlens.analysis.stages import partition_one, stage_config

    cfg = stage_config(params["config"])
    (x, _), act = _data(params, inputs, context)
    _, adapter = _load(inputs, context, x, cfg)
    say("total", 1)
    part = partition_one(adapter, params["method"], cfg, activation_data=act)
    (out / "partition.json").write_text(json.dumps(partition_to_dict(part), default=float))
    say("advance", 1)
    return partition_digest(part), {"ncut": part.ncut, "n_subclusters": len(part.subclusters())}


def _test(x, y, cfg):
    """The test data as the task reads it: (inputs, labels), or next-token data."""
    from modlens.analysis.stages import test_data

    return test_data(x if cfg.task == "next-token" else (x, y), cfg)


#: A finished lesion task's record of what its class counts depend on (:func:`counts_identity`).
COUNTS_FILE = "counts-identity.json"


def counts_identity(params: dict, inputs: dict) -> str:
    """What the class counts of a lesioned set depend on besides the set and its layer: the model, the
    test data, the task and the capture options. Not the partition, how the sets were drawn, nor the
    options of the statistics computed from the counts (accuracy, class range, ties, effect rule): lesion
    tasks that differ only in those measure the same counts for the same set."""
    import hashlib

    cfg = params.get("config", {})
    body = {"model": (inputs.get("model") or {}).get("digest"), "data": params.get("data"),
            "data_id": params.get("data_id"), "data_files": (inputs.get("data") or {}).get("digest"),
            "task": cfg.get("task"), "input_name": cfg.get("input_name"), "output": cfg.get("output")}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def write_counts_identity(folder: Path, params: dict, inputs: dict) -> None:
    path = Path(folder) / COUNTS_FILE
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps({"identity": counts_identity(params, inputs)}))
    os.replace(tmp, path)


def _set_key(neurons) -> str:
    return ",".join(map(str, sorted(int(n) for n in neurons)))


def measured_counts(lesion_root: Path, identity: str) -> dict:
    """``{(layer name, sorted neurons): class counts}`` of every finished lesion task in ``lesion_root``
    (a study's ``tasks/lesion``) whose counts have ``identity``."""
    bank: dict = {}
    root = Path(lesion_root)
    if not root.is_dir():
        return bank
    for folder in sorted(root.iterdir()):
        record, table = folder / COUNTS_FILE, folder / "lesions.parquet"
        if folder.name.startswith(".") or not record.is_file() or not table.is_file():
            continue
        if json.loads(record.read_text()).get("identity") != identity:
            continue
        t = pd.read_parquet(table)
        if "class_correct" not in t.columns:   # next-token tables keep no class counts
            continue
        for name, neurons, counts in zip(t["layer_name"], t["neurons"], t["class_correct"]):
            bank[(name, _set_key(str(neurons).split(",")))] = np.array(str(counts).split(","), dtype=np.int64)
    return bank


class SavedCounts:
    """A lesion engine that evaluates a layer's sets in batches of at most ``batch`` and keeps each batch's
    class counts in ``folder``, named by the layer and a hash of the sets: a lesion task killed after some
    batches (a long CNN task, a session that ends) recomputes only the others when it runs again. The
    counts of a set do not depend on the other sets evaluated with it, so the table is the same.

    ``measured`` (:func:`measured_counts`, with the layer names of the engine's adapter in
    ``layer_names``) holds counts other lesion tasks measured for the same network and data: a set found
    there is not evaluated again (a study of the same networks with other statistics options)."""

    def __init__(self, engine, folder: Path, batch: int = 128, *, measured: dict | None = None,
                 layer_names=None):
        self.engine, self.folder, self.batch = engine, Path(folder), int(batch)
        self.measured, self.layer_names = measured or {}, layer_names
        self.computed = self.loaded = 0     # batches, for the tests
        self.reused = 0                     # sets whose counts came from ``measured``

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def correct_counts(self, layer: int, neuron_sets, *, progress=None) -> np.ndarray:
        import hashlib

        sets = [np.asarray(s, dtype=np.int64) for s in neuron_sets]
        parts = []
        for i in range(0, len(sets), self.batch):
            chunk = sets[i:i + self.batch]
            h = hashlib.sha256(repr([s.tolist() for s in chunk]).encode()).hexdigest()[:24]
            path = self.folder / f"layer{layer}-{h}.npy"
            if path.is_file():
                counts = np.load(path)
                self.loaded += 1
                if progress is not None:
                    progress(len(chunk))
            else:
                counts = self._counts(layer, chunk, progress)
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}-{os.getpid()}.npy")
                np.save(tmp, counts)
                os.replace(tmp, path)          # a batch file exists only when complete
                self.computed += 1
            parts.append(counts)
        return np.concatenate(parts) if parts else np.asarray(self.engine.correct_counts(layer, [], progress=progress))

    def _counts(self, layer: int, chunk: list, progress) -> np.ndarray:
        """The counts of ``chunk``: those measured before, the others evaluated (in one call)."""
        name = self.layer_names[layer] if self.layer_names is not None and self.measured else None
        known = [self.measured.get((name, _set_key(s))) if name is not None else None for s in chunk]
        missing = [i for i, k in enumerate(known) if k is None]
        if len(missing) == len(chunk):
            return np.asarray(self.engine.correct_counts(layer, chunk, progress=progress))
        self.reused += len(chunk) - len(missing)
        if progress is not None:
            progress(len(chunk) - len(missing))
        if missing:
            fresh = np.asarray(self.engine.correct_counts(layer, [chunk[i] for i in missing], progress=progress))
            for i, row in zip(missing, fresh):
                known[i] = row
        return np.stack(known).astype(np.int64)


def run_lesion(out: Path, params: dict, inputs: dict, context: dict, say):
    from modlens.analysis.stages import lesion_one, make_engine, stage_config

    cfg = stage_config(params["config"])
    (x, y), _ = _data(params, inputs, context)
    _, adapter = _load(inputs, context, x, cfg)
    part = _read_partition(inputs)
    say("total", len(part.subclusters(max_fraction=cfg.max_fraction)) * (cfg.n_random + 1))
    engine = make_engine(adapter, _test(x, y, cfg), cfg, engine=context.get("engine", cfg.engine))
    if context.get("partial_dir"):
        lesion_root = Path(context["partial_dir"]).parent
        measured = measured_counts(lesion_root, counts_identity(params, inputs)) if cfg.task != "next-token" else {}
        engine = SavedCounts(engine, Path(context["partial_dir"]), measured=measured, layer_names=adapter.layer_names)
    table = lesion_one(engine, part, cfg, name=params["method"], progress=lambda n: say("advance", n))
    table.to_parquet(out / "lesions.parquet", index=False)
    write_counts_identity(out, params, inputs)
    info = {"rows": len(table)}
    if isinstance(engine, SavedCounts) and engine.reused:
        info["counts_reused"] = engine.reused
    return None, info


def run_vis(out: Path, params: dict, inputs: dict, context: dict, say):
    """The visualizations of one partition; for inputs that cannot be visualized (token ids) the
    reason, in ``skipped.json``, as ``analyze`` skips them."""
    from modlens.analysis.stages import n_vis_images, stage_config, vis_one, vis_problem

    cfg = stage_config(params["config"])
    (x, y), _ = _data(params, inputs, context)
    _, adapter = _load(inputs, context, x, cfg)
    part = _read_partition(inputs)
    problem = vis_problem(adapter, x, cfg)
    if problem:
        (out / "skipped.json").write_text(json.dumps({"skipped": problem}))
        return None, {"skipped": problem}
    say("total", n_vis_images(part, x, cfg))
    vis_in = _test(x, y, cfg) if cfg.task == "next-token" else x  # token inputs: the top-activating positions
    res = vis_one(adapter, part, vis_in, cfg, name=params["method"], progress=lambda n: say("advance", n))
    res.table.to_parquet(out / "vis.parquet", index=False)
    np.save(out / "images.npy", np.asarray(res.images, dtype=np.float32))
    (out / "config.json").write_text(json.dumps(res.config, default=float))
    return None, {"rows": len(res.table)}


def run_clusterability(out: Path, params: dict, inputs: dict, context: dict, say):
    """The clusterability test of one weight partitioning (as ``analyze`` runs it with
    ``clusterability=True``), a one-row table."""
    from modlens.analysis.stages import clusterability_one, make_partitioner, stage_config

    cfg = stage_config(params["config"])
    (x, _), act = _data(params, inputs, context)
    _, adapter = _load(inputs, context, x, cfg)
    say("total", 1)
    row = clusterability_one(make_partitioner(adapter, cfg, activation_data=act), params["method"], cfg)
    pd.DataFrame([row]).to_parquet(out / "clusterability.parquet", index=False)
    say("advance", 1)
    return None, {"p_value": float(row["p_value"])}


def _read_vis(folder: Path):
    """A ``VisResult``, or the reason the visualizations were skipped (a str)."""
    from modlens.experiments.feature_vis import VisResult

    if (folder / "skipped.json").is_file():
        return json.loads((folder / "skipped.json").read_text())["skipped"]
    return VisResult(pd.read_parquet(folder / "vis.parquet"), np.load(folder / "images.npy"),
                     json.loads((folder / "config.json").read_text()))


def run_stats(out: Path, params: dict, inputs: dict, context: dict, say):
    """Per-network statistics: the network's saved analysis result (the ``save_result`` format),
    assembled by the stage ``analyze`` ends with."""
    import dataclasses

    from modlens.analysis.result import partition_from_dict, save_result
    from modlens.analysis.stages import assemble, clusterability_table, stage_config

    cfg = dataclasses.replace(stage_config(params["config"]), engine=context.get("engine", "incremental"))
    say("total", 1)
    partitions = {}
    for item in inputs["partitions"]:
        p = partition_from_dict(json.loads((Path(item["dir"]) / "partition.json").read_text()))
        partitions[p.method] = p
    lesions = [pd.read_parquet(Path(item["dir"]) / "lesions.parquet") for item in inputs["lesions"]]
    vis = [_read_vis(Path(item["dir"])) for item in inputs.get("vis", [])]
    skipped = next((v for v in vis if isinstance(v, str)), None)
    cl_rows = [pd.read_parquet(Path(item["dir"]) / "clusterability.parquet").iloc[0].to_dict()
               for item in inputs.get("clusterability", [])]
    result = assemble(partitions, lesions, [] if skipped else vis, cfg, vis_skipped=skipped,
                      clusterability=clusterability_table(cl_rows) if cl_rows else None,
                      facts={"network": params["network"]})
    for frame in (result.subclusters, result.tests, result.visualizations, result.clusterability):
        if frame is not None:
            frame["network"] = params["network"]["id"]
    save_result(result, out / "result", extra_manifest={"models": [params["network"]]}, figures=params["figures"])
    say("advance", 1)
    return None, {"n_subclusters": int(result.summary["n_subclusters"].max())}


#: What each kind of task runs: ``KINDS[kind](out, params, inputs, context, say) -> (digest, info)``.
KINDS = {"train": run_train, "partition": run_partition, "lesion": run_lesion, "vis": run_vis,
         "clusterability": run_clusterability, "stats": run_stats}

__all__ = ["KINDS", "network_data"]
