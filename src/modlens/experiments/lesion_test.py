"""The lesion test (paper, section 4.1): importance and class coherence of subclusters.

Every true subcluster is lesioned, and so are ``n_random`` random sets of neurons of the
same size in the same layer. For each lesion the table records the accuracy drop
(importance) and the range of class-wise accuracy drops (coherence w.r.t. class). The same
code serves MLPs (units), CNNs and residual networks (conv channels): a lesioned neuron
contributes nothing downstream (see :mod:`modlens.nn.lesion`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from modlens.core.partition import Partition
from modlens.core.seeds import as_generator
from modlens.nn import LesionEngine

ACCURACY_MODES = ("accuracy", "balanced")
CLASS_RANGE_MODES = ("range", "normalized")

#: Columns of the table :func:`lesion_test` returns, in order.
COLUMNS = [
    "partitioning", "layer", "layer_name", "cluster", "size", "kind", "draw", "neurons",
    "accuracy", "acc_drop", "class_range", "class_correct",
]


def random_sets(width: int, size: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random neuron sets of ``size`` drawn without replacement from ``width`` neurons."""
    return [np.sort(rng.choice(width, size=size, replace=False)) for _ in range(n)]


def subcluster_sets(adapter, partition: Partition, *, n_random: int, random_state, max_fraction: float | None,
                    name: str):
    """Per layer with subclusters: ``(layer, sets, rows)``, the true subclusters of ``partition`` each
    followed by its ``n_random`` random sets of the same size in the same layer (drawn in this order
    from one generator, so every test that uses this function draws the same sets), and one row
    ``(name, layer, layer_name, cluster, size, kind, draw, neurons)`` per set."""
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random}")
    if list(partition.layer_sizes) != adapter.layer_sizes:
        raise ValueError(
            f"the partition has layers of sizes {list(partition.layer_sizes)} but the model's hidden "
            f"layers ({', '.join(adapter.layer_names)}) have sizes {adapter.layer_sizes}"
        )
    rng = as_generator(random_state)
    subclusters = partition.subclusters(max_fraction=max_fraction)
    for layer in range(len(adapter.layers)):
        in_layer = [s for s in subclusters if s.layer == layer]
        if not in_layer:
            continue
        width = adapter.layers[layer].n_neurons
        sets, rows = [], []
        for sc in in_layer:
            for draw, neurons in enumerate([sc.neurons] + random_sets(width, sc.size, n_random, rng)):
                sets.append(neurons)
                rows.append((name, layer, sc.layer_name, sc.cluster, sc.size,
                             "true" if draw == 0 else "random", draw, ",".join(map(str, neurons))))
        yield layer, sets, rows


def announced_sets(engine, partition: Partition, **kwargs) -> list:
    """:func:`subcluster_sets` of ``engine``'s adapter as a list, its layers announced to an engine that takes
    them (``prepare``: the fast engine fills several layers' caches in one probe pass)."""
    items = list(subcluster_sets(engine.adapter, partition, **kwargs))
    if hasattr(engine, "prepare"):
        engine.prepare([layer for layer, _, _ in items])
    return items


def lesion_metrics(
    counts: np.ndarray,
    baseline: np.ndarray,
    class_sizes: np.ndarray,
    *,
    accuracy: str = "accuracy",
    class_range: str = "range",
) -> dict[str, np.ndarray]:
    """Accuracy, accuracy drop and class-wise range of drops from per-class correct counts.

    ``counts`` has shape (n_lesions, n_classes). ``accuracy="balanced"`` uses the mean of the
    per-class accuracies, as the original code did (row 9 of the notes).
    ``class_range="normalized"`` divides the range by |mean class-wise change| as the original
    code did (row 10): 0/0 gives 0 and x/0 gives inf. Classes absent from the test set are
    left out of class-wise measures.
    """
    if accuracy not in ACCURACY_MODES:
        raise ValueError(f"accuracy must be one of {ACCURACY_MODES}, got {accuracy!r}")
    if class_range not in CLASS_RANGE_MODES:
        raise ValueError(f"class_range must be one of {CLASS_RANGE_MODES}, got {class_range!r}")
    present = class_sizes > 0
    per_class = counts[:, present] / class_sizes[present]
    base_class = baseline[present] / class_sizes[present]
    if accuracy == "balanced":
        acc, base_acc = per_class.mean(1), base_class.mean()
    else:
        acc, base_acc = counts.sum(1) / class_sizes.sum(), baseline.sum() / class_sizes.sum()
    return {"accuracy": acc, "acc_drop": base_acc - acc,
            "class_range": drop_range(base_class[None, :] - per_class, class_range)}


def drop_range(drops: np.ndarray, class_range: str = "range") -> np.ndarray:
    """Per row of ``drops`` (lesions x classes of class-wise accuracy drops): their range, or with
    ``class_range="normalized"`` the range over |mean change| (0/0 gives 0, x/0 inf)."""
    out = drops.max(1) - drops.min(1)
    if class_range == "normalized":
        mean_change = np.abs(drops.mean(1))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(out == 0, 0.0, out / mean_change)
    return out


def lesion_test(
    engine: LesionEngine,
    partition: Partition,
    *,
    n_random: int = 19,
    random_state=0,
    accuracy: str = "accuracy",
    class_range: str = "range",
    max_fraction: float | None = None,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Lesion every true subcluster of ``partition`` and its random controls on ``engine``
    (:func:`modlens.nn.lesion_engine`: the network, its test set and how lesions are evaluated).

    Returns a tidy table with one row per (subcluster, draw): ``kind`` is ``"true"`` for
    the subcluster itself (``draw`` 0) and ``"random"`` for its controls (``draw`` 1..n).
    ``progress`` is called with the number of lesions finished, as they finish.
    """
    name = name or partition.method
    frames = []
    for layer, sets, rows in announced_sets(engine, partition, n_random=n_random, random_state=random_state,
                                            max_fraction=max_fraction, name=name):
        counts = engine.correct_counts(layer, sets, progress=progress)
        frame = pd.DataFrame(rows, columns=COLUMNS[:8])
        metrics = lesion_metrics(counts, engine.baseline, engine.class_sizes, accuracy=accuracy, class_range=class_range)
        for key, values in metrics.items():
            frame[key] = values
        # per-class correct counts, so that other accuracy / class-range rules can be computed later
        frame["class_correct"] = [",".join(map(str, row)) for row in np.asarray(counts, dtype=np.int64)]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)
