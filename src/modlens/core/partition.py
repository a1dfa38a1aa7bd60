"""Partitions of a network's neurons into clusters, and their per-layer subclusters.

A :class:`Partition` holds one integer label array per hidden (neuron) layer, in forward
order. Label ``-1`` marks a neuron that was not clustered (a zero-degree node of the graph).
A *subcluster* is the set of neurons of one layer that share a cluster label (paper,
section 3.1); only subclusters with more than one neuron that are not the whole layer are
tested (section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

UNCLUSTERED = -1


@dataclass(frozen=True)
class Subcluster:
    """The neurons of one layer that belong to one cluster."""

    layer: int
    layer_name: str
    cluster: int
    neurons: np.ndarray  # sorted neuron indices within the layer

    @property
    def size(self) -> int:
        return int(self.neurons.size)


@dataclass(frozen=True)
class Partition:
    """Cluster labels for every neuron of every hidden layer, in forward order.

    Attributes
    ----------
    labels:
        One int64 array per layer; ``labels[l][i]`` is the cluster of neuron ``i`` of layer
        ``l``, or ``-1`` when the neuron was left out of clustering (zero degree).
    layer_names:
        A stable name per layer (the module path of the layer in the model).
    method:
        How the partition was made (``"weights/global"``, ..., or ``"user"``).
    n_clusters:
        The number of clusters asked for (``None`` for user partitions).
    ncut:
        Normalized cut of the clustering on the graph it was computed on, with the paper's
        factor 1/2 (appendix A.1); ``None`` for user partitions. For local partitions it
        is the mean over layers of the n-cut of each local graph.
    """

    labels: tuple[np.ndarray, ...]
    layer_names: tuple[str, ...]
    method: str = "user"
    n_clusters: int | None = None
    ncut: float | None = None
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.layer_names):
            raise ValueError(
                f"a partition needs one label array per layer: got {len(self.labels)} label arrays "
                f"for {len(self.layer_names)} layers ({', '.join(self.layer_names)})"
            )

    @classmethod
    def from_labels(
        cls,
        labels: Sequence[Sequence[int] | np.ndarray],
        layer_names: Sequence[str],
        layer_sizes: Sequence[int],
        *,
        method: str = "user",
        n_clusters: int | None = None,
        ncut: float | None = None,
        info: dict | None = None,
    ) -> "Partition":
        """Validate user- or algorithm-supplied labels against the model's layers."""
        layer_names = tuple(str(n) for n in layer_names)
        if len(labels) != len(layer_sizes):
            raise ValueError(
                f"expected {len(layer_sizes)} label arrays (one per hidden layer: "
                f"{', '.join(layer_names)}), got {len(labels)}"
            )
        arrays = []
        for name, size, lab in zip(layer_names, layer_sizes, labels):
            arr = np.asarray(lab)
            if arr.ndim != 1 or arr.shape[0] != size:
                raise ValueError(
                    f"labels for layer '{name}' have shape {tuple(arr.shape)}; expected ({size},), "
                    "one integer label per neuron"
                )
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                    raise ValueError(f"labels for layer '{name}' must be integers, got dtype {arr.dtype}")
            arr = arr.astype(np.int64)
            if arr.size and arr.min() < UNCLUSTERED:
                raise ValueError(
                    f"labels for layer '{name}' are out of range: minimum {int(arr.min())}; "
                    "use non-negative cluster ids, or -1 for an unclustered neuron"
                )
            arr.setflags(write=False)
            arrays.append(arr)
        return cls(tuple(arrays), layer_names, method, n_clusters, ncut, dict(info or {}))

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return tuple(int(l.size) for l in self.labels)

    def clusters_per_layer(self) -> list[int]:
        """Number of distinct clusters (ignoring -1) found in each layer."""
        return [int(np.unique(l[l != UNCLUSTERED]).size) for l in self.labels]

    def subclusters(self, *, min_size: int = 2, max_fraction: float | None = None) -> list[Subcluster]:
        """Subclusters to test, in (layer, cluster) order.

        By default (the paper, section 3.2) a subcluster is kept when it has more than one
        neuron and is not the whole layer. ``max_fraction`` (the original code used 0.99,
        row 7 of the notes) additionally drops subclusters larger than that fraction of the
        layer.
        """
        out = []
        for layer, (name, lab) in enumerate(zip(self.layer_names, self.labels)):
            width = lab.size
            for cluster in np.unique(lab[lab != UNCLUSTERED]):
                neurons = np.flatnonzero(lab == cluster)
                if neurons.size < min_size or neurons.size >= width:
                    continue
                if max_fraction is not None and neurons.size > max_fraction * width:
                    continue
                out.append(Subcluster(layer, name, int(cluster), neurons))
        return out

    def no_subclusters_reason(self, *, min_size: int = 2, max_fraction: float | None = None) -> str | None:
        """Why :meth:`subclusters` is empty, in words with what to try (None when it is not).

        Per layer: one cluster holds the whole layer, every piece of it has fewer than
        ``min_size`` neurons, its pieces exceed ``max_fraction`` of it, or it has no clustered
        neuron at all."""
        if self.subclusters(min_size=min_size, max_fraction=max_fraction):
            return None
        kinds = {"whole": 0, "small": 0, "fraction": 0, "empty": 0}
        for lab in self.labels:
            clustered = lab[lab != UNCLUSTERED]
            sizes = np.unique(clustered, return_counts=True)[1] if clustered.size else np.zeros(0, int)
            if not clustered.size:
                kinds["empty"] += 1
            elif (sizes >= lab.size).any():
                kinds["whole"] += 1
            elif (sizes < min_size).all():
                kinds["small"] += 1
            else:
                kinds["fraction"] += 1
        n = len(self.labels)
        if kinds["whole"] == n:
            why = (f"every cluster spans whole layers (each of the {n} layers lies in one cluster)" if n > 1 else
                   "the one layer lies in one cluster")
        else:
            words = {"whole": "lie whole in one cluster", "small": f"are split into pieces of fewer than {min_size} neurons",
                     "fraction": f"are split only into pieces above max_fraction={max_fraction}",
                     "empty": "have no clustered neuron (no edges)"}
            why = "of the " + str(n) + " layers, " + ", ".join(f"{c} {words[k]}" for k, c in kinds.items() if c)
        k = self.n_clusters
        tries = []
        if kinds["whole"]:
            more = f"a larger n_clusters (k = {k} now" + (f", for {n} layers" if n > 1 else "") + ")" if k else \
                "a larger n_clusters"
            tries.append(f"{more}; a local partitioning gives each layer as many clusters as the global one of the "
                         "same graph gave it, so it splits a layer only where the global one does")
        if kinds["small"]:
            tries.append("a local partitioning (each layer clustered with its neighbouring layers only) or a smaller "
                         "n_clusters, for pieces of at least two neurons")
        if kinds["fraction"]:
            tries.append("max_fraction=None, the paper's rule")
        if kinds["empty"]:
            tries.append("checking the layers without edges (dead units, zero weights)")
        return f"no subcluster qualifies: {why}; try " + "; or ".join(tries)

    def _repr_html_(self) -> str:
        """The notebook display: method, k and n-cut, then per layer its neurons, clusters,
        unclustered neurons and tested subclusters (:mod:`modlens.core.html`'s pieces)."""
        from modlens.core.html import Cell, Table, fragment, kv_html, table_html

        tested = [0] * len(self.labels)
        for s in self.subclusters():
            tested[s.layer] += 1
        table = Table("partition", "", "", ["Layer", "Neurons", "Clusters", "Unclustered", "Subclusters tested"])
        for i, (name, lab, k) in enumerate(zip(self.layer_names, self.labels, self.clusters_per_layer())):
            table.rows.append([Cell(name), Cell(str(lab.size)), Cell(str(k)), Cell(str(int((lab < 0).sum()))),
                               Cell(str(tested[i]))])
        facts = {"method": self.method, "k": self.n_clusters if self.n_clusters is not None else "n/a",
                 "n-cut": "n/a" if self.ncut is None else f"{self.ncut:.4f}", "layers": len(self.labels),
                 "neurons": int(sum(self.layer_sizes)), "subclusters tested": sum(tested)}
        return fragment(f"Partition ({self.method})", kv_html(facts) + table_html(table, heading=False))
