"""Graphical clusterability of a network's weight partitionings (Filan et al., 2021).

The pure part (shuffles, n-cut comparison) is :mod:`modlens.core.clusterability`; this
module reads the weight blocks through the adapter (:meth:`NetworkAdapter.weight_blocks`, via
the :class:`~modlens.experiments.partitioning.Partitioner` that made the partition) and
clusters every shuffled network exactly as the network itself was clustered.
"""

from __future__ import annotations

import time

import numpy as np

from modlens.core import clusterability as _cl
from modlens.core import graph
from modlens.core import clustering
from modlens.core.partition import UNCLUSTERED
from modlens.core.seeds import as_generator, int_seed, method_seed, null_seeds
from modlens.experiments.partitioning import Partitioner, check_method, cluster_graph


def local_graphs_ncut(adj, sizes, targets, ks, neighbours, *, random_state, **spectral) -> float:
    """Mean over target layers of the n-cut of each local graph (layer l and the layers joined
    to it) under its own spectral clustering. Seeds, subgraphs and cluster counts are those of
    local clustering (:func:`~modlens.experiments.partitioning._cluster_local`), so with the
    partition's seed the labels of layer l are the partition's."""
    offsets = graph.layer_offsets(sizes)
    rng = as_generator(random_state)
    seeds = [int_seed(rng) for _ in targets]
    values = []
    for l, k, seed in zip(targets, ks, seeds):
        group = sorted({l, *neighbours[l]})
        nodes = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in group])
        sub = adj[nodes][:, nodes]
        degrees = np.asarray(sub.sum(axis=1)).ravel() - sub.diagonal()
        n_active = int(np.count_nonzero(degrees > 0))
        if n_active == 0 or k < 2:
            values.append(0.0)
            continue
        labels = clustering.spectral_labels(sub, min(int(k), n_active), random_state=seed, **spectral)
        values.append(graph.ncut(sub, np.where(labels == UNCLUSTERED, UNCLUSTERED, labels)))
    return float(np.mean(values)) if values else float("nan")


def clusterability_test(partitioner: Partitioner, method: str, *, n_null: int = 50, batch_size: int = 10) -> dict:
    """n-cut of ``method``'s partition against ``n_null`` networks with each layer's weights
    shuffled, each clustered the same way (same k, same global/local procedure, same
    eigensolver). Seeds come from the partitioner's root (:func:`modlens.core.seeds.null_seeds`).

    For ``weights/global`` the n-cut is the partition's (:attr:`Partition.ncut`); for
    ``weights/local`` it is the mean over layers of the n-cut of each local graph
    (:func:`local_graphs_ncut`), since n-cuts of per-layer clusters on the whole graph count
    every edge between layers as cut. Returns ``partitioning``, ``ncut``, ``null_mean``, ``null_sd``, ``z``, ``p_value``
    (one-sided, low = more clusterable than the shuffles; floor 1/(1 + n_null)), ``n_null``,
    ``null_ncuts`` and ``seconds``.
    """
    kind, scope = check_method(method)
    if kind != "weights":
        raise ValueError(f"the clusterability test shuffles weights; {method!r} is not a weight partitioning")
    start = time.perf_counter()
    sizes, blocks, hidden, neighbours = partitioner._weight_structure()
    blocks = list(blocks)   # computed once here: every batch of shuffles reads them
    shuffle_seed, cluster_seeds = null_seeds(partitioner.random_state, method, n_null)
    spectral = dict(partitioner._spectral)
    k = partitioner.n_clusters

    if scope == "global":  # the partition's own n-cut (hidden neurons, paper's factor 1/2)
        observed = partitioner.partition(method).ncut
    else:  # mean n-cut of the local graphs, with the partition's seed and cluster counts
        ks = partitioner.partition("weights/global").clusters_per_layer()
        observed = local_graphs_ncut(partitioner._graph("weights")[0], sizes, hidden, ks, neighbours,
                                     random_state=as_generator(method_seed(partitioner.random_state, method)),
                                     **spectral)

    def ncut_of(shuffled, draw: int) -> float:
        adj = graph.weight_graph(sizes, shuffled)
        rng = as_generator(cluster_seeds[draw])
        glob, ncut, _ = cluster_graph(adj, sizes, hidden, neighbours, "global", k, random_state=rng, **spectral)
        if scope == "global":
            return ncut
        ks = [int(np.unique(l[l >= 0]).size) for l in glob]
        return local_graphs_ncut(adj, sizes, hidden, ks, neighbours, random_state=rng, **spectral)

    out = _cl.clusterability_test(observed, blocks, ncut_of, n_null=n_null, random_state=shuffle_seed,
                                  batch_size=batch_size)
    return {"partitioning": method, **out, "seconds": time.perf_counter() - start}
