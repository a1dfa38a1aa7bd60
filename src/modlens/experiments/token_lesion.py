"""The lesion test of the next-token task (docs/language-models.md, sections 4 and 5).

For every true subcluster and its random sets (the same draws as :func:`lesion_test`), the engine
(:mod:`modlens.nn.token_lesion`) gives, per cell of the scored test positions (token class x
position label), the correct next-token predictions and the sum of cross-entropies. From them:

* ``acc_drop``: next-token accuracy of the intact model minus that of the lesioned one, over all
  scored positions (the paper's accuracy drop with positions as the samples);
* ``ce_increase``: mean cross-entropy (nats) of the lesioned model minus that of the intact one
  (continuous: it ties far less than the accuracy);
* ``class_range``: max - min over token classes (the class of the target token, e.g. byte class) of
  the class-wise accuracy drop (the paper's class range with the predicted token's class);
* ``label_range``: the same over position labels (e.g. the genre of the sequence).

Classes (and labels) with fewer than ``min_positions`` scored positions are left out of the
ranges; a range over fewer than two classes is NaN (the metric is then not reported).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from modlens.core.partition import Partition
from modlens.experiments.lesion_test import ACCURACY_MODES, CLASS_RANGE_MODES, COLUMNS, announced_sets, drop_range

#: Classes with fewer scored test positions are left out of the class and label ranges.
MIN_POSITIONS = 50

#: Columns of the table :func:`token_lesion_test` returns, in order.
TOKEN_COLUMNS = COLUMNS[:8] + ["accuracy", "acc_drop", "cross_entropy", "ce_increase", "class_range", "label_range",
                               "class_correct", "cell_ce"]


def _range(rates: np.ndarray, base: np.ndarray, class_range: str) -> np.ndarray:
    return drop_range(base[None, :] - rates, class_range)


def token_lesion_metrics(correct: np.ndarray, ce: np.ndarray, base_correct: np.ndarray, base_ce: np.ndarray,
                         cell_sizes: np.ndarray, n_classes: int, n_labels: int, *, accuracy: str = "accuracy",
                         class_range: str = "range", min_positions: int = MIN_POSITIONS) -> dict[str, np.ndarray]:
    """The next-token metrics (module docstring) from per-cell counts ``correct`` and cross-entropy
    sums ``ce`` of shape (n_lesions, (n_classes + 1) * (n_labels + 1)), cell = class * (n_labels + 1)
    + label with the last class / label "none". ``accuracy="balanced"`` averages the accuracy over
    the token classes (row 9 of the notes, with token classes as the classes; all positions when
    there are none); ``class_range="normalized"`` divides each range by |mean change| (row 10)."""
    if accuracy not in ACCURACY_MODES:
        raise ValueError(f"accuracy must be one of {ACCURACY_MODES}, got {accuracy!r}")
    if class_range not in CLASS_RANGE_MODES:
        raise ValueError(f"class_range must be one of {CLASS_RANGE_MODES}, got {class_range!r}")
    shape = (n_classes + 1, n_labels + 1)
    correct = np.asarray(correct, dtype=np.float64).reshape(-1, *shape)
    ce = np.asarray(ce, dtype=np.float64).reshape(-1, *shape)
    base_correct = np.asarray(base_correct, dtype=np.float64).reshape(shape)
    base_ce = np.asarray(base_ce, dtype=np.float64).reshape(shape)
    sizes = np.asarray(cell_sizes, dtype=np.float64).reshape(shape)
    total = sizes.sum()
    out = {}
    by_class, base_by_class, class_sizes = correct.sum(2)[:, :n_classes], base_correct.sum(1)[:n_classes], sizes.sum(1)[:n_classes]
    keep_class = class_sizes >= min_positions
    if accuracy == "balanced" and keep_class.any():
        acc = (by_class[:, keep_class] / class_sizes[keep_class]).mean(1)
        base_acc = (base_by_class[keep_class] / class_sizes[keep_class]).mean()
    else:
        acc, base_acc = correct.sum((1, 2)) / total, base_correct.sum() / total
    out["accuracy"] = acc
    out["acc_drop"] = base_acc - acc
    out["cross_entropy"] = ce.sum((1, 2)) / total
    out["ce_increase"] = out["cross_entropy"] - base_ce.sum() / total
    nan = np.full(correct.shape[0], np.nan)
    out["class_range"] = nan.copy()
    if keep_class.sum() >= 2:
        out["class_range"] = _range(by_class[:, keep_class] / class_sizes[keep_class],
                                    base_by_class[keep_class] / class_sizes[keep_class], class_range)
    by_label, base_by_label = correct.sum(1)[:, :n_labels], base_correct.sum(0)[:n_labels]
    label_sizes = sizes.sum(0)[:n_labels]
    keep_label = label_sizes >= min_positions
    out["label_range"] = nan.copy()
    if keep_label.sum() >= 2:
        out["label_range"] = _range(by_label[:, keep_label] / label_sizes[keep_label],
                                    base_by_label[keep_label] / label_sizes[keep_label], class_range)
    return out


def token_lesion_test(engine, partition: Partition, *, n_random: int = 19, random_state=0, accuracy: str = "accuracy",
                      class_range: str = "range", max_fraction: float | None = None, name: str | None = None,
                      min_positions: int = MIN_POSITIONS, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Lesion every true subcluster of ``partition`` and its random controls on a next-token engine
    (:func:`modlens.nn.token_lesion.token_lesion_engine`); one row per (subcluster, draw), the random
    sets those of :func:`~modlens.experiments.lesion_test.lesion_test` with the same ``random_state``."""
    data = engine.data
    name = name or partition.method
    frames = []
    for layer, sets, rows in announced_sets(engine, partition, n_random=n_random, random_state=random_state,
                                            max_fraction=max_fraction, name=name):
        correct, ce = engine.lesion_counts(layer, sets, progress=progress)
        frame = pd.DataFrame(rows, columns=TOKEN_COLUMNS[:8])
        metrics = token_lesion_metrics(correct, ce, engine.baseline, engine.baseline_ce, engine.class_sizes,
                                       len(data.class_names), len(data.label_names), accuracy=accuracy,
                                       class_range=class_range, min_positions=min_positions)
        for key, values in metrics.items():
            frame[key] = values
        # per-cell correct counts and cross-entropy sums, so that other rules can be computed later
        frame["class_correct"] = [",".join(map(str, row)) for row in np.asarray(correct, dtype=np.int64)]
        frame["cell_ce"] = [",".join(f"{v:.17g}" for v in row) for row in ce]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=TOKEN_COLUMNS)
    return pd.concat(frames, ignore_index=True)


__all__ = ["token_lesion_test", "token_lesion_metrics", "TOKEN_COLUMNS", "MIN_POSITIONS"]
