"""Runs behind the CLI: train a reference MLP, analyse saved models, the demo.

A saved model's manifest records its dataset and which examples were held out from
training; :func:`model_data` rebuilds the lesion test set and the activation split from it,
so the activation graph is never computed on the test set.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from modlens.data import load_dataset
from modlens.experiments.train import split_validation, train_reference_mlp
from modlens.experiments.train import train_reference as fit_reference
from modlens.nn.io import load_model, save_model
from modlens.study.analyze import AnalysisResult, analyze, combine, save_result
from modlens.study.config import AnalysisConfig

DIGITS_EPOCHS = 60


def _is_digits(name: str) -> bool:
    return name.endswith("digits")


def train_reference(
    dataset: str,
    *,
    seed: int = 0,
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
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train a reference network (appendix A.2) on ``dataset`` and save it with a manifest.

    ``arch`` is ``"mlp"`` (784-256x4-10), ``"cnn"`` (the small CNN) or ``"vgg"`` (the CIFAR
    VGG); epochs, batch size, L2 and augmentation default to that architecture's recipe.
    ``regularize=False`` gives the VGG without dropout and L2 (the paper's unregularized
    variant). MNIST-like data: ``n_val`` training examples are held out (never trained on)
    for the activation graph. Digits: its fixed "val" split plays that role.
    """
    return train_reference_set(dataset, seeds=[seed], out=out, data_dir=data_dir, data_seed=data_seed, epochs=epochs,
                               batch_size=batch_size, n_val=n_val, arch=arch, augment=augment, l2=l2,
                               regularize=regularize, progress=progress, folders=False)[0]


def train_reference_set(
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
    """:func:`train_reference` for several seeds (replicates) through
    :func:`modlens.experiments.replicates.train_replicates`; ``together="together"`` trains the MLP
    or small CNN replicates in one batched computation (``"auto"``, on the CPU: one by one, where
    batching was measured not to pay). Each replicate equals the network trained alone with its
    seed (bit-identical one by one; batched: see ``train_replicates``).

    Saves replicate ``seed`` in ``out/seed{seed}`` (``folders=False`` with one seed: in ``out``).
    With several seeds ``progress(epoch, epochs, losses)`` gets one loss per replicate.
    """
    from modlens.experiments.replicates import train_replicates

    seeds = [int(s) for s in seeds]
    if not folders and len(seeds) != 1:
        raise ValueError(f"folders=False saves one model, got {len(seeds)} seeds")
    train = load_dataset(dataset, "train", data_dir=data_dir, seed=data_seed)
    test = load_dataset(dataset, "test", data_dir=data_dir, seed=data_seed)
    digits = _is_digits(dataset)
    if arch not in ("mlp", "cnn", "vgg"):
        raise ValueError(f"unknown architecture {arch!r}; choose mlp, cnn or vgg")
    if epochs is None and digits and arch == "mlp":
        epochs = DIGITS_EPOCHS
    architecture = {"type": arch}
    if not regularize:
        if arch != "vgg":
            raise ValueError("--no-regularization applies to the VGG (dropout and L2); the MLP and CNN have none")
        architecture["dropout"] = False
        l2 = 0.0
    data = (torch.from_numpy(train.x), torch.from_numpy(train.y), torch.from_numpy(test.x), torch.from_numpy(test.y))
    kwargs = dict(epochs=epochs, batch_size=batch_size, n_val=0 if digits else n_val, weight_decay_l2=l2, augment=augment)
    if len(seeds) == 1:  # the single path itself
        trained = [fit_reference(architecture, *data, seed=seeds[0], progress=progress, **kwargs)]
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


def model_data(manifest: dict, *, data_dir=None):
    """(test data, activation data) for a saved model, as recorded in its manifest."""
    ds = manifest.get("dataset")
    if not isinstance(ds, dict) or "name" not in ds:
        raise ValueError("the model's manifest names no dataset; pass test and activation data through the Python API")
    name, data_seed = ds["name"], int(ds.get("data_seed", 0))
    test = load_dataset(name, "test", data_dir=data_dir, seed=data_seed)
    split = ds.get("activation_split", {})
    if split.get("split") == "val":
        val = load_dataset(name, "val", data_dir=data_dir, seed=data_seed)
        act = val.x
    else:
        train = load_dataset(name, "train", data_dir=data_dir, seed=data_seed)
        if len(train) != int(split["n_total"]):
            raise ValueError(f"the manifest expects {split['n_total']} training examples of {name}, found {len(train)}")
        _, val_idx = split_validation(int(split["n_total"]), int(split["n_val"]), int(split["val_seed"]))
        act = train.x[val_idx]
    return (torch.from_numpy(test.x), torch.from_numpy(test.y)), torch.from_numpy(act)


def analyze_saved(
    model_dirs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    data_dir=None,
    overwrite: bool = False,
    **options,
) -> AnalysisResult:
    """Analyse one or more saved models; several models are replicates (Fisher-Bates)."""
    if not model_dirs:
        raise ValueError("give at least one model folder")
    progress = bool(options.pop("progress", False))
    cfg = AnalysisConfig.build(options.pop("config", None), **options)  # fails here, before any model is read
    if out is not None:
        target = Path(out)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {target} is not empty; choose another folder or pass --overwrite")
    results, names, manifests = [], [], []
    for i, d in enumerate(model_dirs):
        model, manifest = load_model(d)
        test, act = model_data(manifest, data_dir=data_dir)
        if progress:
            print(f"[{i + 1}/{len(model_dirs)}] {d}: {manifest['dataset']['name']}, seed {manifest.get('seed')}, "
                  f"test accuracy {manifest.get('accuracy', float('nan')):.4f}", file=sys.stderr, flush=True)
        results.append(analyze(model, test, activation_data=act, config=cfg, progress=progress))
        names.append(Path(d).name)
        manifests.append({"path": str(d), "dataset": manifest["dataset"], "seed": manifest.get("seed"),
                          "accuracy": manifest.get("accuracy"), "sha256": manifest.get("sha256")})
    result = results[0] if len(results) == 1 else combine(results, names, alpha=cfg.alpha)
    if len(results) == 1:
        result.subclusters["network"] = names[0]
        result.tests["network"] = names[0]
    if out is not None:
        save_result(result, out, overwrite=overwrite, extra_manifest={"models": manifests})
    return result


def demo(
    *,
    dataset: str = "digits",
    seed: int = 0,
    n_clusters: int = 16,
    n_random: int = 19,
    epochs: int = DIGITS_EPOCHS,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    feature_vis: bool = False,
    vis_options: dict | None = None,
    **options,
) -> AnalysisResult:
    """Train a 4x256 MLP on an embedded dataset (no download) and analyse it four ways.
    ``options`` are further :class:`~modlens.study.config.AnalysisConfig` fields."""
    cfg = AnalysisConfig.build(n_clusters=n_clusters, n_random=n_random, random_state=seed, feature_vis=feature_vis,
                               vis_options=vis_options, **options)
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


def correlation_figure(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "weights/global",
    n_clusters: int = 16,
    n_random: int = 4,
    seed: int = 0,
    data_dir=None,
    n_images: int | None = None,
) -> tuple[Path, "CorrelationMaps"]:
    """Figure 1/6 of the paper for a saved MLP: sign-aligned Spearman correlation maps of its
    first-layer subclusters over the test set, beside random subclusters of the same size."""
    from modlens.experiments.correlation_maps import correlation_maps
    from modlens.experiments.partitioning import partition
    from modlens.nn.adapter import MLPAdapter
    from modlens.study.figures import save_correlation_figure

    model, manifest = load_model(model_dir)
    (x, _), act = model_data(manifest, data_dir=data_dir)
    if n_images is not None:
        x = x[:n_images]
    adapter = MLPAdapter(model)
    part = partition(adapter, method, n_clusters=n_clusters, data=act, random_state=seed)
    maps = correlation_maps(adapter, part, x, layer=0, n_random=n_random, random_state=seed)
    path = save_correlation_figure(maps, out)
    return Path(path), maps


__all__ = ["train_reference", "train_reference_set", "model_data", "analyze_saved", "demo", "correlation_figure"]
