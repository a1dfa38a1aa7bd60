"""The top-activating-positions test: coherence for token inputs (docs/language-models.md, section 5).

Feature visualization (paper, section 4.2) optimizes an input for a set of neurons; token ids are
discrete and cannot be optimized. In its place, for a set ``c`` of neurons of one layer (a true
subcluster, or one of its random sets: the same draws as the lesion test), every scored test
position ``p`` gets the objective of the paper's visualization, the L1 norm of the set's
pre-activations there, ``a_c(p) = sum_{i in c} |z_i(p)|``; the ``q`` highest positions (``q`` =
``top_fraction`` of the positions, at least ``min_top``; ties broken by position order) are the
set's top positions, and

* ``top_concentration``: the Kullback-Leibler divergence ``sum_k f_k log(f_k / pi_k)`` of the classes
  of the top positions (``f``) from those of all positions (``pi``), in nats; high = the set
  responds most to positions of one kind (coherent). The classes are the cells of the joint
  classification token class x position label (:meth:`modlens.nn.tokens.TokenData.cells`);
* ``top_entropy``: the entropy of ``f`` (recorded, not tested: it calls a set concentrated whenever
  its top positions follow the most common class).

The divergence is tested against the random sets like every other metric. Positions are those of
the test data (not the activation data, on which activation partitions are fitted), at most
``max_positions`` of them, drawn once for all sets from ``random_state``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from modlens.core.partition import Partition
from modlens.experiments.lesion_test import COLUMNS, subcluster_sets
from modlens.nn.tokens import TokenData, position_values, sample_positions

TOP_COLUMNS = COLUMNS[:8] + ["top_concentration", "top_entropy", "n_top"]
TOP_FRACTION = 0.01
MIN_TOP = 100
MAX_POSITIONS = 16384


def n_top(n_positions: int, top_fraction: float = TOP_FRACTION, min_top: int = MIN_TOP) -> int:
    """How many top positions a set gets among ``n_positions``."""
    return int(min(n_positions, max(min_top, round(top_fraction * n_positions))))


def concentration(top_cells: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KL divergence from ``base``, entropy), per row of ``top_cells`` (sets x q cell indices);
    ``base`` holds the cell shares of all positions."""
    n_sets, q = top_cells.shape
    counts = np.zeros((n_sets, base.size))
    np.add.at(counts, (np.repeat(np.arange(n_sets), q), top_cells.ravel()), 1.0)
    f = counts / q
    with np.errstate(divide="ignore", invalid="ignore"):
        logf = np.where(f > 0, np.log(f), 0.0)
        kl = np.sum(np.where(f > 0, f * (logf - np.log(np.where(base > 0, base, 1.0))), 0.0), axis=1)
    return kl, -np.sum(f * logf, axis=1)


def top_position_test(adapter, partition: Partition, data: TokenData, *, n_random: int = 19, random_state=0,
                      positions_seed=0, max_fraction: float | None = None, name: str | None = None,
                      top_fraction: float = TOP_FRACTION, min_top: int = MIN_TOP,
                      max_positions: int | None = MAX_POSITIONS, batch_size: int = 256,
                      progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """One row per (subcluster, draw) with its ``top_concentration`` and ``top_entropy`` (module
    docstring); ``random_state`` draws the random sets (the lesion test's), ``positions_seed`` the
    positions when there are more than ``max_positions``."""
    from modlens.core.seeds import as_generator

    if not 0 < top_fraction <= 1 or min_top < 1:
        raise ValueError(f"top_fraction must lie in (0, 1] and min_top be >= 1, got {top_fraction}, {min_top}")
    name = name or partition.method
    cells = data.cells().numpy()
    candidates = np.argwhere(cells >= 0)
    positions = sample_positions(candidates, max_positions, as_generator(positions_seed))
    cell_of = cells[positions[:, 0], positions[:, 1]]
    base = np.bincount(cell_of, minlength=data.n_cells) / len(cell_of)
    q = n_top(len(positions), top_fraction, min_top)
    frames = []
    values = None
    for layer, sets, rows in subcluster_sets(adapter, partition, n_random=n_random, random_state=random_state,
                                             max_fraction=max_fraction, name=name):
        if values is None:  # every layer at once: one pass over the test sequences
            values = position_values(adapter, data.ids, positions, batch_size=batch_size, name="test data")
        z = np.abs(values[layer]).astype(np.float64)
        member = np.zeros((z.shape[1], len(sets)))
        for j, s in enumerate(sets):
            member[np.asarray(s, dtype=np.int64), j] = 1.0
        scores = z @ member                                   # (P, sets)
        order = np.argsort(-scores, axis=0, kind="stable")[:q]  # top q per set, ties by position order
        kl, entropy = concentration(cell_of[order.T], base)
        frame = pd.DataFrame(rows, columns=TOP_COLUMNS[:8])
        frame["top_concentration"], frame["top_entropy"], frame["n_top"] = kl, entropy, q
        frames.append(frame)
        if progress is not None:
            progress(len(sets))
    if not frames:
        return pd.DataFrame(columns=TOP_COLUMNS)
    return pd.concat(frames, ignore_index=True)


__all__ = ["top_position_test", "concentration", "n_top", "TOP_COLUMNS", "TOP_FRACTION", "MIN_TOP", "MAX_POSITIONS"]
