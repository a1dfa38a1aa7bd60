"""The runs behind the command line: train and save reference networks, analyse saved models,
the demo, correlation maps of a saved MLP.

A saved model's manifest records its dataset and which examples were held out from training;
:func:`modlens.data.held_out_data` rebuilds the lesion test set and the activation split from
it, so the activation graph is never computed on the test set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from modlens.analysis import AnalysisConfig, AnalysisResult, analyze, combine, save_result
from modlens.data import TEXT_DATASETS, held_out_data, held_out_text, load_dataset
from modlens.experiments.replicates import train_replicates
from modlens.experiments.train import ARCHS, DIGITS_MLP_EPOCHS, train_reference, train_reference_mlp
from modlens.nn.io import save_model
from modlens.report.correlation import save_correlation_figure, saved_model_maps
from modlens.study.inputs import data_description, load_files, model_sources, network_names


def _is_digits(name: str) -> bool:
    return name.endswith("digits")


def train_and_save(
    dataset: str,
    *,
    seeds: Sequence[int],
    out: str | os.PathLike,
    data_dir=None,
    data_seed: int = 0,
    epochs: int | None = None,
    batch_size: int | None = None,
    n_val: int = 5000,
    arch: str = "mlp",
    augment: bool | None = None,
    l2: float | None = None,
    regularize: bool = True,
    progress: Callable | None = None,
    together: str = "auto",
    folders: bool = True,
) -> list[tuple[torch.nn.Module, dict]]:
    """Train the reference network ``arch`` (appendix A.2: ``"mlp"`` 784-256x4-10, ``"cnn"`` the
    small CNN, ``"vgg"`` the CIFAR VGG) on ``dataset`` once per seed and save each with a manifest.

    Epochs, batch size, L2 and augmentation default to the architecture's recipe;
    ``regularize=False`` gives the VGG without dropout and L2 (the paper's unregularized variant).
    MNIST-like data: ``n_val`` training examples are held out (never trained on) for the
    activation graph; digits: its fixed "val" split plays that role. Several seeds go through
    :func:`modlens.experiments.replicates.train_replicates` (``together="together"`` trains MLP or
    CNN replicates in one batched computation; ``"auto"``, on the CPU, one by one), each replicate
    equal to the network trained alone with its seed. Replicate ``seed`` is saved in
    ``out/seed{seed}``, or in ``out`` itself with ``folders=False`` and one seed. ``progress`` gets
    ``(epoch, epochs, loss)`` with one seed, ``(epoch, epochs, losses)`` with several.
    """
    seeds = [int(s) for s in seeds]
    if not folders and len(seeds) != 1:
        raise ValueError(f"folders=False saves one model, got {len(seeds)} seeds")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose {', '.join(ARCHS)}")
    if (arch == "gpt") != (dataset in TEXT_DATASETS):
        raise ValueError(f"--arch gpt (the reference language model) trains on --dataset text, and the text corpus "
                         f"trains --arch gpt; got arch {arch!r} with dataset {dataset!r}")
    if arch == "gpt":  # one replicate at a time; with several seeds progress gets a list, as train_replicates gives it
        each = (lambda s, n, loss: progress(s, n, [loss])) if progress is not None and len(seeds) > 1 else progress
        return [_train_lm(seed, out=Path(out) / f"seed{seed}" if folders else Path(out), data_dir=data_dir,
                          data_seed=data_seed, steps=epochs, batch_size=batch_size, progress=each)
                for seed in seeds]
    train = load_dataset(dataset, "train", data_dir=data_dir, seed=data_seed)
    test = load_dataset(dataset, "test", data_dir=data_dir, seed=data_seed)
    digits = _is_digits(dataset)
    if epochs is None and digits and arch == "mlp":
        epochs = DIGITS_MLP_EPOCHS
    architecture = {"type": arch}
    if not regularize:
        if arch != "vgg":
            raise ValueError("--no-regularization applies to the VGG (dropout and L2); the MLP and CNN have none")
        architecture["dropout"] = False
        l2 = 0.0
    data = (torch.from_numpy(train.x), torch.from_numpy(train.y), torch.from_numpy(test.x), torch.from_numpy(test.y))
    kwargs = dict(epochs=epochs, batch_size=batch_size, n_val=0 if digits else n_val, weight_decay_l2=l2, augment=augment)
    if len(seeds) == 1:  # the single path itself
        trained = [train_reference(architecture, *data, seed=seeds[0], progress=progress, **kwargs)]
    else:
        trained = train_replicates(architecture, *data, seeds=seeds, together=together, progress=progress, **kwargs)
    results = []
    for seed, (model, info) in zip(seeds, trained):
        activation_split = {"split": "val"} if digits else {
            "split": "train", "n_total": info["n_total"], "n_val": info["n_val"], "val_seed": info["val_seed"]}
        manifest = {
            "architecture": info["architecture"],
            "dataset": {"name": dataset, "data_seed": data_seed, "activation_split": activation_split},
            "seed": seed,
            "accuracy": info["test_accuracy"],
            "training": info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_model(model, Path(out) / f"seed{seed}" if folders else out, manifest)
        results.append((model, manifest))
    return results


def _train_lm(seed: int, *, out: Path, data_dir, data_seed: int, steps: int | None, batch_size: int | None,
              progress) -> tuple[torch.nn.Module, dict]:
    """The reference decoder (``gpt`` recipe) trained on the text corpus and saved with its manifest,
    whose dataset record names the held-out sequences its analysis uses."""
    from modlens.data import load_text
    from modlens.experiments.train import recipe
    from modlens.experiments.train_lm import train_reference_lm

    r = recipe({"type": "gpt"})
    train = load_text("train", context=r["context"], seed=data_seed, data_dir=data_dir)
    test = load_text("test", context=r["context"], seed=data_seed, data_dir=data_dir)
    model, info = train_reference_lm({"type": "gpt"}, train, test, seed=seed, steps=steps, batch_size=batch_size,
                                     progress=progress)
    manifest = {
        "architecture": info["architecture"],
        "dataset": {"name": "text", "data_seed": data_seed, "context": r["context"], "n_test": r["n_test"],
                    "n_activation": r["n_activation"], "activation_split": {"split": "val"}},
        "seed": seed, "task": "next-token", "accuracy": info["test_accuracy"], "training": info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model(model, out, manifest)
    return model, manifest


def model_data(manifest: dict, *, data_dir=None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``((x_test, y_test), x_activation)`` tensors of a saved model (its manifest's dataset); for a
    language model on the text corpus ``((test contexts, None), activation contexts)`` as
    :class:`~modlens.data.TextDataset` (next-token data with byte classes and genres)."""
    record = manifest.get("dataset")
    if isinstance(record, dict) and record.get("name") in TEXT_DATASETS:
        test, act = held_out_text(record, data_dir=data_dir)
        return (test, None), act
    x, y, act = held_out_data(record, data_dir=data_dir)
    return (torch.from_numpy(x), torch.from_numpy(y)), torch.from_numpy(act)


def analyze_saved(
    models: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    data_dir=None,
    overwrite: bool = False,
    progress: bool = False,
    config: AnalysisConfig | None = None,
    weights=None,
    model_args: dict | None = None,
    init_seed: int = 0,
    test_data=None,
    activation_data=None,
    data_options: dict | None = None,
    **options,
) -> AnalysisResult:
    """Analyse one or more models; several are replicates (Fisher-Bates).

    ``models`` are names as :func:`modlens.nn.sources.resolve_model` reads them (modlens model
    folders, ``pkg.module:factory``, ``timm:NAME``, ``torchvision:NAME``, ``hf:REPO_OR_FOLDER``), with
    ``weights`` (one per model, or several files for one model), ``model_args`` and ``init_seed``.
    ``test_data`` / ``activation_data`` / ``data_options`` name the data
    (:mod:`modlens.study.inputs`); a modlens folder given none uses its manifest's dataset.
    ``config``/``options`` are the :class:`~modlens.analysis.AnalysisConfig` of every model. Every
    name, file and weight is checked before anything is written; the result is written atomically."""
    cfg = AnalysisConfig.build(config, **options)  # fails here, before any model is read
    if out is not None:
        target = Path(out)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {target} is not empty; choose another folder or pass --overwrite")
    sources = model_sources(models, weights, model_args=model_args, init_seed=init_seed)
    descriptions = [data_description(s, test_data, activation_data, data_options) for s in sources]
    results, names, records, loaded = [], network_names(sources), [], {}
    for i, (source, data) in enumerate(zip(sources, descriptions)):
        model = source.build()
        record = source.record()
        run_cfg = cfg if cfg.input_name is not None or not record.get("input_name") else \
            dataclasses.replace(cfg, input_name=record["input_name"])
        if (source.facts.get("manifest") or {}).get("task") == "next-token":
            if "task" not in options and (config is None or config.task != "next-token"):
                run_cfg = AnalysisConfig.build(run_cfg, task="next-token")   # a language model: the next-token task
        next_token = run_cfg.task == "next-token"
        key = json.dumps([data, next_token], sort_keys=True)
        if key not in loaded:
            loaded.clear()  # one data set in memory at a time
            loaded[key] = model_data({"dataset": data}, data_dir=data_dir) if "files" not in data else \
                load_files(data, data_dir=data_dir, require_labels=not next_token)
        test, act = loaded[key]
        if next_token:
            test = test[0]  # token ids: every position is scored against the next token (labels are not read)
        if act is None and any(p.startswith("activations/") for p in run_cfg.partitionings):
            raise ValueError(f"{source.name}: the activation partitionings need activation data (--activation-data "
                             "SOURCE, held out from the test set), or keep to --partitionings weights/global weights/local")
        if progress:
            print(f"[{i + 1}/{len(sources)}] {source.name}: {_describe(record, data, test)}", file=sys.stderr, flush=True)
        results.append(analyze(model, test, activation_data=act, config=run_cfg, progress=progress))
        manifest = source.facts.get("manifest") or {}
        records.append({"path": source.name, "source": record, "dataset": data, "seed": manifest.get("seed"),
                        "accuracy": manifest.get("accuracy"), "sha256": (record.get("weights") or {}).get("sha256"),
                        "digest": record["digest"]})
    result = results[0] if len(results) == 1 else combine(results, names, alpha=cfg.alpha)
    if len(results) == 1:
        result.subclusters["network"] = names[0]
        result.tests["network"] = names[0]
    if out is not None:
        save_result(result, out, overwrite=overwrite, extra_manifest={"models": records})
    return result


def _describe(record: dict, data: dict, test) -> str:
    if "files" not in data:
        return f"{data.get('name')} (its manifest's dataset)"
    pre = record.get("preprocessing") or {}
    return (f"test data {data['files']['test']} ({len(test[1])} examples"
            + (f"; preprocessing from {pre['from']}" if pre.get("from") else "") + ")")


def demo(
    *,
    dataset: str = "digits",
    seed: int = 0,
    epochs: int = DIGITS_MLP_EPOCHS,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    config: AnalysisConfig | None = None,
    **options,
) -> AnalysisResult:
    """Train a 4x256 MLP on an embedded dataset (no download) and analyse it four ways.
    ``config``/``options`` are the :class:`~modlens.analysis.AnalysisConfig` (``random_state``
    defaults to ``seed``)."""
    options.setdefault("random_state", seed)
    cfg = AnalysisConfig.build(config, **options)
    if not _is_digits(dataset):
        raise ValueError(f"the demo runs on the embedded digits data ('digits' or a variant such as 'halves-digits'), not {dataset!r}")
    train = load_dataset(dataset, "train", seed=seed)
    val = load_dataset(dataset, "val", seed=seed)
    test = load_dataset(dataset, "test", seed=seed)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(f"training a {train.x[0].size}-256-256-256-256-{train.n_classes} MLP on {dataset} "
        f"({len(train)} train / {len(val)} held out / {len(test)} test) for {epochs} epochs")
    t0 = time.perf_counter()

    def report(epoch, n, loss):
        if progress and (epoch == n or epoch % 10 == 0):
            say(f"  epoch {epoch}/{n}  loss {loss:.4f}")

    model, info = train_reference_mlp(
        torch.from_numpy(train.x), torch.from_numpy(train.y), torch.from_numpy(test.x), torch.from_numpy(test.y),
        seed=seed, epochs=epochs, n_val=0, progress=report,
    )
    say(f"test accuracy {info['test_accuracy']:.4f} ({time.perf_counter() - t0:.1f} s)")
    result = analyze(
        model, (torch.from_numpy(test.x), torch.from_numpy(test.y)), activation_data=torch.from_numpy(val.x),
        config=cfg, progress=progress,
    )
    result.config["model"] = {"dataset": dataset, "seed": seed, "epochs": epochs, "test_accuracy": info["test_accuracy"]}
    if out is not None:
        save_result(result, out, overwrite=overwrite)
    return result


def correlation_figure(model_dir: str | os.PathLike, out: str | os.PathLike, **options):
    """Figure 1/6 of the paper for a saved MLP (:func:`modlens.report.correlation.saved_model_maps`
    with ``options``): sign-aligned Spearman correlation maps of its first-layer subclusters over
    the test set, beside random subclusters of the same size. Returns the path and the maps."""
    maps = saved_model_maps(model_dir, **options)
    return Path(save_correlation_figure(maps, out)), maps


__all__ = ["train_and_save", "model_data", "analyze_saved", "demo", "correlation_figure"]
