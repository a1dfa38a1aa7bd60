"""Partition a network's neurons by spectral clustering of its weight or activation graph.

Four methods (paper, section 3.1): {weights, activations} x {global, local}.

* weights: nodes are the input, hidden and output neurons; edge = |w| (rows 4 of the notes).
* activations: nodes are the hidden neurons; edge = squared Spearman correlation of their
  pre-activations over held-out data that is never the lesion test set.
* global: one clustering of the whole graph into ``n_clusters``.
* local: layer l is clustered on the graph of l and its adjacent layers, into as many
  clusters as layer l received in the global clustering of the same graph.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import sparse

from modlens.core import clustering, graph
from modlens.core.partition import UNCLUSTERED, Partition
from modlens.core.rng import as_generator
from modlens.nn.adapter import MLPAdapter
from modlens.nn.inputs import as_inputs, batches

METHODS = ("weights/global", "weights/local", "activations/global", "activations/local")
_METHOD_IDS = {m: i for i, m in enumerate(METHODS)}


def method_seed(random_state: int, method: str, stream: int = 0) -> np.random.SeedSequence:
    """Seed of one method's randomness; independent of the order methods are run in."""
    if not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise ValueError(f"random_state must be a non-negative int, got {random_state!r}")
    return np.random.SeedSequence([int(random_state), _METHOD_IDS.get(method, len(METHODS)), stream])


def check_method(method: str) -> tuple[str, str]:
    if method not in METHODS:
        raise ValueError(f"unknown partitioning method {method!r}; choose one of {', '.join(METHODS)}")
    kind, scope = method.split("/")
    return kind, scope


class Partitioner:
    """Builds each graph once and clusters it by any of the four methods."""

    def __init__(self, adapter: MLPAdapter, *, activation_data=None, n_clusters: int = 16,
                 random_state: int = 0, batch_size: int = 2048):
        self.adapter = adapter
        self.n_clusters = int(n_clusters)
        self.random_state = random_state
        self._activation_data = activation_data
        self._batch_size = batch_size
        self._graphs: dict[str, tuple] = {}
        self._cache: dict[str, Partition] = {}
        if self.n_clusters < 2:
            raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
        for name, width in zip(adapter.layer_names, adapter.layer_sizes):
            if self.n_clusters > width:
                raise ValueError(
                    f"n_clusters={self.n_clusters} is larger than hidden layer '{name}' ({width} neurons); "
                    f"choose n_clusters <= {min(adapter.layer_sizes)}"
                )

    def _graph(self, kind: str):
        """(adjacency, node-layer sizes, indices of the hidden node layers)."""
        if kind not in self._graphs:
            if kind == "weights":
                sizes = self.adapter.node_layer_sizes()
                adj = graph.weight_graph(sizes, self.adapter.weight_blocks())
                hidden = list(range(1, len(sizes) - 1))
            else:
                if self._activation_data is None:
                    raise ValueError(
                        "activation partitionings need activation data: pass activation_data (or data=) "
                        "as a held-out split that is not the lesion test set"
                    )
                x = as_inputs(self._activation_data, name="activation data")
                acts = self.adapter.preactivations(batches(x, self._batch_size, device=_device(self.adapter)))
                adj = graph.activation_graph(acts)
                sizes = self.adapter.layer_sizes
                hidden = list(range(len(sizes)))
            self._graphs[kind] = (adj, sizes, hidden)
        return self._graphs[kind]

    def partition(self, method: str) -> Partition:
        if method in self._cache:
            return self._cache[method]
        kind, scope = check_method(method)
        adj, sizes, hidden = self._graph(kind)
        seed = as_generator(method_seed(self.random_state, method))
        start = time.perf_counter()
        if scope == "global":
            labels = clustering.cluster_global(adj, sizes, self.n_clusters, random_state=seed)
            hidden_labels = [labels[i] for i in hidden]
            full_ncut = graph.ncut(adj, np.concatenate(labels))
        else:
            k_per_layer = self.partition(f"{kind}/global").clusters_per_layer()
            hidden_labels = clustering.cluster_local(adj, sizes, hidden, k_per_layer, random_state=seed)
            full_ncut = None
        seconds = time.perf_counter() - start
        result = Partition.from_labels(
            hidden_labels, self.adapter.layer_names, self.adapter.layer_sizes,
            method=method, n_clusters=self.n_clusters,
            ncut=_hidden_ncut(adj, sizes, hidden, hidden_labels, distinct_per_layer=(scope == "local")),
            info={
                "graph_nodes": int(sum(sizes)),
                "unclustered_per_layer": [int((l == UNCLUSTERED).sum()) for l in hidden_labels],
                "ncut_whole_graph": full_ncut,
                "clustering_seconds": seconds,
            },
        )
        self._cache[method] = result
        return result


def _device(adapter: MLPAdapter) -> torch.device:
    for p in adapter.model.parameters():
        return p.device
    return torch.device("cpu")


def _hidden_ncut(adj, sizes, hidden, labels, *, distinct_per_layer: bool) -> float:
    """n-cut of the hidden-neuron labels on the graph induced by the hidden neurons, so that
    all four methods are scored on comparable graphs. Local clusters of different layers are
    different clusters."""
    offsets = graph.layer_offsets(sizes)
    idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in hidden])
    lab, base = [], 0
    for l in labels:
        l = np.asarray(l, dtype=np.int64)
        if distinct_per_layer:
            l = np.where(l == UNCLUSTERED, UNCLUSTERED, l + base)
            base = int(l.max(initial=base - 1)) + 1
        lab.append(l)
    sub = adj[idx][:, idx] if sparse.issparse(adj) else adj[np.ix_(idx, idx)]
    return float(graph.ncut(sub, np.concatenate(lab)))


def partition(model, method: str, *, n_clusters: int = 16, data=None, random_state: int = 0) -> Partition:
    """Partition the hidden neurons of ``model`` (any MLP-like ``torch.nn.Module``).

    ``method`` is one of ``"weights/global"``, ``"weights/local"``, ``"activations/global"``,
    ``"activations/local"``. Activation methods need ``data``: inputs (or an
    ``(inputs, labels)`` pair, or a DataLoader) of a held-out split. Returns a
    :class:`~modlens.core.partition.Partition` with integer labels for every neuron of every
    hidden layer, in forward order (``-1`` for neurons with no edges).
    """
    check_method(method)
    adapter = model if isinstance(model, MLPAdapter) else MLPAdapter(model)
    return Partitioner(adapter, activation_data=data, n_clusters=n_clusters, random_state=random_state).partition(method)
