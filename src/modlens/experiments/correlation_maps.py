"""Correlation maps of first-layer subclusters (paper, figure 1, figure 6 and appendix A.4).

Each neuron's map is the Spearman correlation of its pre-activation with every input pixel
over a dataset. A subcluster's map is the mean of its neurons' maps after their signs are
aligned by the paper's Algorithm 2 (so anticorrelated neurons do not cancel); random sets
of the same size in the same layer give the control maps drawn below it in figure 6.

The original code's alignment never flips a neuron (notes row 20); :func:`align_signs`
implements Algorithm 2 as the paper describes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

from modlens.core.partition import Partition, Subcluster
from modlens.core.seeds import as_generator
from modlens.experiments.lesion_test import random_sets
from modlens.nn.inputs import to_model


def spearman_maps(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Spearman correlation (n_units, n_pixels) of each column of ``z`` (N, n_units) with
    each column of ``x`` (N, n_pixels): Pearson correlation of average-tie ranks, computed
    as one standardized matrix product. A constant column gives correlation 0."""
    def standardized_ranks(a):
        r = rankdata(a, axis=0, method="average")
        r -= r.mean(0)
        norm = np.sqrt((r * r).sum(0))
        return np.divide(r, norm, out=np.zeros_like(r), where=norm > 0)

    return standardized_ranks(np.asarray(z, dtype=np.float64)).T @ standardized_ranks(np.asarray(x, dtype=np.float64))


def align_signs(maps, sweeps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2 of the paper: sign-align neuron maps (k, ...).

    For ``sweeps`` passes, for each neuron i in order: c = sum over j != i of
    cos(v_i, v_j) with the current (already flipped) maps; if c < 0, v_i is negated.
    A map of norm 0 has cosine 0 with everything. Returns ``(aligned, flips)``: the aligned
    maps (same shape) and a bool array (k,) telling which neurons end up negated.
    """
    v = np.array(maps, dtype=np.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise ValueError(f"align_signs needs at least one map, got shape {v.shape}")
    flat = v.reshape(v.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1)
    unit = np.divide(flat, norms[:, None], out=np.zeros_like(flat), where=norms[:, None] > 0)
    cos = unit @ unit.T
    np.fill_diagonal(cos, 0.0)
    sign = np.ones(v.shape[0])
    for _ in range(int(sweeps)):
        for i in range(v.shape[0]):
            if sign[i] * (cos[i] @ sign) < 0:  # sum_j cos(s_i v_i, s_j v_j)
                sign[i] = -sign[i]
    return v * sign.reshape((-1,) + (1,) * (v.ndim - 1)), sign < 0


def half_preference(maps) -> np.ndarray:
    """|mass of |map| on the left half - mass on the right half| / total mass.

    ``maps`` has shape (..., C, H, W) (or a single (H, W) map); the result has shape (...),
    the mean over channels. The middle column of an odd width counts for neither half.
    1 means a map lives on one half only; 0 means both halves weigh the same.
    """
    a = np.abs(np.asarray(maps, dtype=np.float64))
    if a.ndim == 2:
        a = a[None]
    if a.ndim < 3:
        raise ValueError(f"maps must have shape (..., C, H, W), got {a.shape}")
    w = a.shape[-1]
    left = a[..., : w // 2].sum((-2, -1))
    right = a[..., w - w // 2:].sum((-2, -1))
    total = a.sum((-2, -1))
    pref = np.divide(np.abs(left - right), total, out=np.zeros_like(total), where=total > 0)
    return pref.mean(-1)


@dataclass
class CorrelationMaps:
    """Subcluster correlation maps.

    subclusters:    the true subclusters of the layer, in cluster order.
    true_maps:      (m, C, H, W) mean sign-aligned map of each true subcluster.
    random_maps:    (m, n_random, C, H, W) the same for random sets of the same size.
    random_neurons: random_neurons[i][j] are the neurons of random set j of subcluster i.
    neuron_maps:    (n_neurons, C, H, W) every neuron's Spearman map (unaligned).
    """

    subclusters: list[Subcluster]
    true_maps: np.ndarray
    random_maps: np.ndarray
    random_neurons: list[list[np.ndarray]]
    neuron_maps: np.ndarray
    config: dict = field(default_factory=dict)

    @property
    def true_half_preference(self) -> np.ndarray:
        """(m,) :func:`half_preference` of each true subcluster map (mean over channels)."""
        return half_preference(self.true_maps)

    @property
    def random_half_preference(self) -> np.ndarray:
        """(m, n_random) :func:`half_preference` of the random maps (mean over channels)."""
        return half_preference(self.random_maps)


def subcluster_map(neuron_maps: np.ndarray, neurons, sweeps: int = 20) -> np.ndarray:
    """Mean of the sign-aligned maps of ``neurons``."""
    aligned, _ = align_signs(neuron_maps[np.asarray(neurons)], sweeps=sweeps)
    return aligned.mean(0)


def _preactivations(adapter, x: torch.Tensor, layer: int, batch_size: int = 4096) -> np.ndarray:
    batches = (to_model(x[i:i + batch_size], adapter.device, adapter.dtype) for i in range(0, x.shape[0], batch_size))
    return adapter.record(batches, [layer])[0].astype(np.float64)


def correlation_maps(
    adapter,
    partition: Partition,
    x,
    *,
    layer: int = 0,
    n_random: int = 4,
    random_state=0,
    sweeps: int = 20,
    min_size: int = 2,
) -> CorrelationMaps:
    """Correlation maps of the subclusters of hidden layer ``layer`` (default: the first)
    and of ``n_random`` random sets of the same size for each, over inputs ``x`` (N, C, H, W).
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"x must be a batch of at least 2 images (N, C, H, W), got shape {tuple(x.shape)}")
    if not 0 <= layer < len(adapter.layers):
        raise ValueError(f"layer must be in 0..{len(adapter.layers) - 1}, got {layer}")
    if list(partition.layer_sizes) != list(adapter.layer_sizes):
        raise ValueError(
            f"the partition has layers of sizes {list(partition.layer_sizes)} but the model's hidden "
            f"layers ({', '.join(adapter.layer_names)}) have sizes {list(adapter.layer_sizes)}"
        )
    if n_random < 0:
        raise ValueError(f"n_random must be non-negative, got {n_random}")
    shape = tuple(x.shape[1:])
    z = _preactivations(adapter, x, layer)
    neuron_maps = spearman_maps(x.reshape(x.shape[0], -1).double().numpy(), z).reshape((-1,) + shape)
    rng = as_generator(random_state)
    width = adapter.layers[layer].n_neurons
    subs = [s for s in partition.subclusters(min_size=min_size) if s.layer == layer]
    true_maps, rand_maps, rand_neurons = [], [], []
    for sc in subs:
        sets = random_sets(width, sc.size, n_random, rng)
        true_maps.append(subcluster_map(neuron_maps, sc.neurons, sweeps))
        rand_maps.append([subcluster_map(neuron_maps, s, sweeps) for s in sets])
        rand_neurons.append(sets)
    m = len(subs)
    true_arr = np.array(true_maps).reshape((m,) + shape)
    rand_arr = np.array(rand_maps).reshape((m, n_random) + shape)
    config = {"layer": int(layer), "n_random": int(n_random), "sweeps": int(sweeps), "n_inputs": int(x.shape[0]),
              "partitioning": partition.method, "min_size": int(min_size),
              "random_state": int(random_state) if isinstance(random_state, (int, np.integer)) else None}
    return CorrelationMaps(subs, true_arr, rand_arr, rand_neurons, neuron_maps, config)


__all__ = ["correlation_maps", "CorrelationMaps", "align_signs", "spearman_maps", "half_preference", "subcluster_map"]
