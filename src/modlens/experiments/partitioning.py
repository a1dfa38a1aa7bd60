"""Partition a network's neurons by spectral clustering of its weight or activation graph.

Four methods (paper, section 3.1): {weights, activations} x {global, local}.

* weights: MLPs: nodes are the input, hidden and output neurons, edge = |w|; CNNs: nodes are
  conv channels only, edge = L1 norm of the kernel slice (or the matrix 1-norm,
  ``conv_edge="matrix_1_norm"``, row 1), batch norm folded in (row 3) (row 4 of the notes).
* activations: nodes are the hidden neurons (conv channels for CNNs); edge = squared Spearman
  correlation of their pre-activations (for a channel, the L1 norm of its map) over
  held-out data that is never the lesion test set, streamed batch by batch.
* global: one clustering of the whole graph into ``n_clusters``.
* local: layer l is clustered on the graph of l and its adjacent layers, into as many
  clusters as layer l received in the global clustering of the same graph (so never more than
  its width: ``n_clusters`` may exceed the width of a layer, as in a squeeze-excitation
  bottleneck of two channels). Adjacent layers
  are those joined to l by weights: l - 1 and l + 1 in a chain; in a residual network also
  every layer that writes to the residual stream l reads, or reads the stream l writes to.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import sparse

from modlens.core import clustering, graph, knn_graph
from modlens.core.knn_graph import DENSE_MAX_NODES, build_activation_graph, choose_graph_mode
from modlens.core.partition import UNCLUSTERED, Partition
from modlens.core.residual_graph import residual_weight_graph
from modlens.core.seeds import STREAM_POSITIONS, as_generator, int_seed, method_seed, root_seed  # noqa: F401
from modlens.core.weight_share import weight_share, weight_share_of_graph
from modlens.experiments.token_graphs import (ACT_TOKENS, VOCAB_NODES, layer_layout, resolve_act_tokens,  # noqa: F401
                                              residual_weight_share, vocab_parts)
from modlens.nn import ACT_REDUCTIONS, BN_FOLDS, NetworkAdapter, as_inputs, batches, spearman_graph_torch
from modlens.nn.tokens import TokenData, position_values, sample_positions

#: The most bytes of a transformer's kNN weight graph blocks (between hidden neurons, float32) kept from the
#: graph's pass for the weight share, instead of making them again (docs/transformers.md).
KEEP_BLOCKS_BYTES = 1 << 30

METHODS = ("weights/global", "weights/local", "activations/global", "activations/local")

#: A CNN's weight blocks with at most this many entries in all (400 MB in float64) are computed once and kept
#: for the weight graph and the weight share; larger ones are computed again on each pass and never held
#: together (:meth:`~modlens.nn.NetworkAdapter.lazy_weight_blocks`: two passes for a kNN graph's count and
#: build, one for the weight share). The same blocks either way, so the same graph.
KEEP_BLOCK_ENTRIES = 50_000_000


def check_graph_options(*, conv_edge: str = "l1", bn_fold: str = "paper", act_reduce: str = "l1") -> None:
    """Fail fast on a wrong graph option (rows 1-3 of the notes)."""
    for name, value, choices in (("conv_edge", conv_edge, graph.CONV_EDGE_NORMS), ("bn_fold", bn_fold, BN_FOLDS),
                                 ("act_reduce", act_reduce, ACT_REDUCTIONS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def make_adapter(model, data=None, *, input_name: str | None = None, output=None,
                 name: str = "data", input_shape=None, capture: str = "auto") -> NetworkAdapter:
    """The model's adapter, captured with ``torch.export`` at the shape of ``data`` (inputs or
    (inputs, labels)) when given, else at ``input_shape`` or the shape the model gives (a Hugging Face
    config, timm's ``pretrained_cfg``, its first layer; :class:`~modlens.nn.NetworkAdapter`).
    ``capture="fx"`` chooses torch.fx symbolic tracing instead."""
    if isinstance(model, NetworkAdapter):
        return model
    example = None if data is None else as_inputs(data, name=name)
    return NetworkAdapter(model, example, input_shape=None if example is not None else input_shape,
                          input_name=input_name, output=output, example_name=name, capture=capture)


def _widths(adapter, limit: int = 6) -> str:
    pairs = [f"'{n}': {w}" for n, w in zip(adapter.layer_names, adapter.layer_sizes)]
    return ", ".join(pairs[:limit]) + (f", ... {len(pairs) - limit} more" if len(pairs) > limit else "")


def check_method(method: str) -> tuple[str, str]:
    if method not in METHODS:
        raise ValueError(f"unknown partitioning method {method!r}; choose one of {', '.join(METHODS)}")
    kind, scope = method.split("/")
    return kind, scope


class Partitioner:
    """Builds each graph once and clusters it by any of the four methods.

    ``conv_edge`` (``"l1"`` or ``"matrix_1_norm"``, row 1), ``bn_fold`` (``"paper"``,
    ``"original"`` or ``"none"``, row 3) and ``act_reduce`` (``"l1"`` or ``"matrix_1_norm"``, row 2) choose
    how conv channels and normalizations enter the graphs. ``eigen_solver`` and ``n_init`` go to
    :func:`modlens.core.clustering.spectral_labels` (``"auto"``: ARPACK up to
    :data:`~modlens.core.clustering.ARPACK_MAX_NODES` nodes; 25 k-means initializations, 100
    above 2,000 nodes). ``random_state``: an int, ``SeedSequence``, ``Generator`` or ``None``
    (made a root once, :func:`modlens.core.seeds.root_seed`).

    Transformers (docs/language-models.md; :mod:`modlens.experiments.token_graphs`): ``act_tokens``
    (``"positions"``: one activation row per (sequence, position), at most ``max_positions`` drawn
    from stream :data:`~modlens.core.seeds.STREAM_POSITIONS`; ``"aggregate"``: the L1 norm over
    tokens; ``"auto"``: positions for ``task="next-token"``), ``vocab_nodes`` and ``token_groups``
    (the embedding and unembedding in the weight graph).
    """

    def __init__(self, adapter: NetworkAdapter, *, activation_data=None, n_clusters: int = 16,
                 random_state: int = 0, batch_size: int = 2048, conv_edge: str = "l1",
                 bn_fold: str = "paper", act_reduce: str = "l1",
                 eigen_solver: str = "auto", n_init: int | str = "auto", task: str = "classification",
                 act_tokens: str = "auto", max_positions: int = 4096, vocab_nodes: str = "auto",
                 token_groups=None):
        self.adapter = adapter
        self.n_clusters = int(n_clusters)
        self.random_state = root_seed(random_state)
        self._spectral = dict(eigen_solver=clustering.check_eigen_solver(eigen_solver),
                              n_init=clustering.check_n_init(n_init))
        self._activation_data = activation_data
        self._batch_size = batch_size
        self._conv_edge = conv_edge
        self._bn_fold = bn_fold
        self._act_reduce = act_reduce
        check_graph_options(conv_edge=conv_edge, bn_fold=self._bn_fold, act_reduce=act_reduce)
        self._act_tokens = resolve_act_tokens(act_tokens, task)
        self._max_positions = int(max_positions)
        self._vocab = (vocab_nodes, token_groups)
        vocab_parts({}, vocab_nodes, token_groups)  # fail fast on a wrong vocabulary option
        self._graphs: dict[str, tuple] = {}
        self._cache: dict[str, Partition] = {}
        if self.n_clusters < 2:
            raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
        # n_clusters may exceed a layer's width: global clustering does not split layers one by one, and
        # local clustering gives each layer at most as many clusters as it got globally (at most its width)
        n_hidden = int(sum(adapter.layer_sizes))
        if self.n_clusters > n_hidden:
            raise ValueError(
                f"n_clusters={self.n_clusters} is larger than the {n_hidden} hidden neurons of the model's "
                f"{len(adapter.layer_sizes)} layer(s) ({_widths(adapter)}); "
                f"choose n_clusters <= {n_hidden}"
            )

    def _weight_structure(self):
        """(node-layer sizes, weight blocks, hidden node layers, neighbours of each node layer)."""
        if "structure" not in self._graphs:
            transformer = getattr(self.adapter, "is_transformer", False)
            if transformer:  # the vocabulary decision (docs/language-models.md, section 9)
                self._graphs["parts"] = vocab_parts(self.adapter.residual_parts(), *self._vocab)
                sizes, hidden = layer_layout(self._graphs["parts"])
            else:
                sizes, hidden = self.adapter.node_layer_sizes(), self.adapter.hidden_node_layers()
            # a CNN's blocks are computed when read, one at a time (lazy_weight_blocks): together they can be larger
            # than memory (21 GB for torchvision's RegNetY-128GF), and activation partitions need only their pairs
            blocks = None if transformer else \
                self.adapter.lazy_weight_blocks(conv_edge=self._conv_edge, bn_fold=self._bn_fold)
            if transformer:
                # every block pair is joined through the stream; local clustering takes a block's MLP
                # layer with its neighbouring node layers (docs/transformers.md)
                neighbours = [[m for m in (l - 1, l + 1) if 0 <= m < len(sizes)] for l in range(len(sizes))]
            else:
                neighbours = graph.layer_neighbours(len(sizes), blocks.pairs)
            self._graphs["structure"] = (sizes, blocks, hidden, neighbours)
        return self._graphs["structure"]

    def _graph(self, kind: str):
        """(adjacency, node-layer sizes, indices of the hidden node layers, neighbours)."""
        if kind not in self._graphs:
            sizes, blocks, hidden, neighbours = self._weight_structure()
            if kind == "weights" and blocks is None:  # transformer: kNN (float32 products) above DENSE_MAX_NODES
                dense = choose_graph_mode(int(sum(sizes)), "auto") == "dense"
                dtype = np.float64 if dense else np.float32
                keep = None if dense else self._kept_blocks(sizes, hidden)
                # every block pair's sum of squares, for weight_share when the blocks are not kept (kNN graph only)
                pair_sq: dict = {}
                adj, _ = residual_weight_graph(**self._graphs["parts"], mode="auto", dtype=dtype, on_block=keep,
                                               pair_sq=None if dense or keep is not None else pair_sq)
                self._graphs["complete"] = dense
                self._graphs["pair_sq"] = (pair_sq, dtype) if not dense and keep is None else None
            elif kind == "weights":
                pairs = blocks.pairs if hasattr(blocks, "pairs") else [(i, j) for i, j, _ in blocks]
                entries = sum(int(sizes[i]) * int(sizes[j]) for i, j in pairs)
                if entries <= KEEP_BLOCK_ENTRIES and not isinstance(blocks, list):   # computed once and kept, for the graph and the weight share
                    blocks = list(blocks)
                    self._graphs["structure"] = (sizes, blocks, hidden, neighbours)
                # edges <= entries: blocks of fewer entries make an exact graph without counting (a count of lazy
                # blocks is one more pass computing every block)
                edges = entries if entries <= knn_graph.MAX_EXACT_WEIGHT_EDGES else knn_graph.weight_graph_edges(blocks)
                if edges > knn_graph.MAX_EXACT_WEIGHT_EDGES:  # a deep residual CNN: kNN, as a transformer's
                    adj = knn_graph.knn_weight_graph(sizes, blocks, knn_graph.DEFAULT_K)
                    self._graphs["weights_knn"] = {"k": knn_graph.DEFAULT_K, "edges_of_full_graph": edges}
                else:
                    adj = graph.weight_graph(sizes, blocks)
            else:
                if self._activation_data is None:
                    raise ValueError(
                        "activation partitionings need activation data: pass activation_data (or data=) "
                        "as a held-out split that is not the lesion test set"
                    )
                data = self._activation_data
                x = data.ids if isinstance(data, TokenData) else as_inputs(data, name="activation data")
                self.adapter.check_input(x, "activation data")
                device, dtype = self.adapter.device, self.adapter.dtype
                size = self.adapter.batch_size_for(x, self._batch_size)
                on_gpu = device.type != "cpu"
                knn = {"dtype": np.float32}  # float32 ranks on the kNN path (above DENSE_MAX_NODES): half the time and memory
                if getattr(self.adapter, "is_transformer", False) and self._act_tokens == "positions":
                    acts = self._position_rows(data, x, size)
                    on_gpu = False
                else:
                    acts = self.adapter.record(batches(x, size, device=device, dtype=dtype), reduce=self._act_reduce,
                                               as_numpy=not on_gpu)
                adj = spearman_graph_torch(acts) if on_gpu else build_activation_graph(acts, mode="auto", **knn)
                position = {h: i for i, h in enumerate(hidden)}
                neighbours = [[position[m] for m in neighbours[h] if m in position] for h in hidden]
                sizes = self.adapter.layer_sizes
                hidden = list(range(len(sizes)))
            if kind == "weights" and not _has_edges(adj):
                raise ValueError(self._no_edges_message(blocks))
            self._graphs[kind] = (adj, sizes, hidden, neighbours)
        return self._graphs[kind]

    def _kept_blocks(self, sizes, hidden):
        """A callback that keeps the kNN residual weight graph's blocks between hidden neurons as they are made,
        for the weight share (:meth:`weight_share`), when all of them (float32) take at most
        :data:`KEEP_BLOCKS_BYTES` and a third of the memory left; else None (the weight share makes them again)."""
        w = np.asarray([sizes[h] for h in hidden], dtype=np.float64)
        need = 4.0 * (w.sum() ** 2 - np.square(w).sum()) / 2
        available = graph.memory_available()
        if need > KEEP_BLOCKS_BYTES or (available is not None and need > available / 3):
            return None
        inside, kept = set(hidden), []
        self._graphs["kept_blocks"] = kept

        def keep(i, j, a):
            if i in inside and j in inside:
                kept.append((i, j, a))
        return keep

    def _no_edges_message(self, blocks) -> str:
        """Why a weight graph has no edge at all: the maps that join the layers are zero."""
        names = self.adapter.layer_names
        if blocks is None:  # transformer: each MLP's edges pass through its output map
            zero = [names[k] for k, b in enumerate(self._graphs["parts"]["blocks"]) if not np.any(b.w_out)]
            what = f"the output maps of {len(zero)} of the {len(names)} MLPs"
        else:
            hidden = self._weight_structure()[2]
            zero = [names[hidden.index(j)] for j in sorted({j for _, j, a in blocks if not np.any(a)}) if j in hidden]
            what = f"the weights into {len(zero)} of the {len(names)} layers"
        shown = ", ".join(f"'{z}'" for z in zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
        return (f"the weight graph has no edges: every weight that joins two analysed neurons is zero ({what} are "
                f"zero{f': {shown}' if zero else ''}). Models that start their residual branches at zero (a norm "
                "scale or last layer initialised to 0, as EfficientViT-M and SHViT do) look like this before "
                "training; partition a trained model, or an activations/ method with data")

    def _position_rows(self, data, x, batch_size: int) -> list[np.ndarray]:
        """Per-position activation rows (sequence x token) of the activation data."""
        candidates = data.positions() if isinstance(data, TokenData) else np.argwhere(np.ones(tuple(x.shape[:2]), bool))
        rng = as_generator(method_seed(self.random_state, "activations/global", STREAM_POSITIONS))
        positions = sample_positions(candidates, self._max_positions, rng)
        self._graphs["positions"] = int(len(positions))
        return position_values(self.adapter, x, positions, batch_size=batch_size, name="activation data")

    def weight_share(self, labels) -> dict:
        """Share of squared weight inside the clusters of hidden-neuron ``labels``, with its 1/k and
        size-matched baselines (:mod:`modlens.core.weight_share`), on the full weight graph. A transformer's
        edge blocks are products through the residual stream: they are read from its weight graph when that is
        built and holds every edge (not a kNN graph), else computed again; a CNN's are kept."""
        if getattr(self.adapter, "is_transformer", False):
            if self._graphs.get("complete") and "weights" in self._graphs:
                adj, sizes, hidden, _ = self._graphs["weights"]
                return weight_share_of_graph(adj, sizes, labels, hidden)
            if self._graphs.get("kept_blocks") is not None and "weights" in self._graphs:
                return weight_share(self._graphs["kept_blocks"], labels, self._graphs["weights"][2])
            parts = self.adapter.residual_parts()
            known = self._graphs.get("pair_sq")
            n = sum(b.width for b in parts["blocks"])
            # the totals recorded with the graph serve when weight_share's products take the same dtype
            same = known is not None and known[1] == (np.float32 if n > DENSE_MAX_NODES else np.float64)
            return residual_weight_share(parts, labels, known[0] if same else None)
        _, blocks, hidden, _ = self._weight_structure()
        return weight_share(blocks, labels, hidden)

    def partition(self, method: str) -> Partition:
        if method in self._cache:
            return self._cache[method]
        kind, scope = check_method(method)
        adj, sizes, hidden, neighbours = self._graph(kind)
        seed = as_generator(method_seed(self.random_state, method))
        start = time.perf_counter()
        k_per_layer = self.partition(f"{kind}/global").clusters_per_layer() if scope == "local" else None
        hidden_labels, ncut, full_ncut = cluster_graph(adj, sizes, hidden, neighbours, scope, self.n_clusters,
                                                       random_state=seed, k_per_layer=k_per_layer, **self._spectral)
        seconds = time.perf_counter() - start
        extra = {}
        if method == "weights/global":  # beside the n-cut: the share of squared weight inside clusters
            extra["weight_share"] = self.weight_share(hidden_labels)
        if kind == "weights" and "weights_knn" in self._graphs:
            extra["knn_graph"] = dict(self._graphs["weights_knn"])
        if kind == "activations" and "positions" in self._graphs:
            extra["activation_rows"] = {"kind": "positions", "n": self._graphs["positions"]}
        result = Partition.from_labels(
            hidden_labels, self.adapter.layer_names, self.adapter.layer_sizes,
            method=method, n_clusters=self.n_clusters, ncut=ncut,
            info={
                "graph_nodes": int(sum(sizes)),
                "unclustered_per_layer": [int((l == UNCLUSTERED).sum()) for l in hidden_labels],
                "ncut_whole_graph": full_ncut,
                "clustering_seconds": seconds,
                "eigen_solver": self._spectral["eigen_solver"],
                "n_init": self._spectral["n_init"],
                **extra,
            },
        )
        self._cache[method] = result
        return result


def cluster_graph(adj, sizes, hidden, neighbours, scope: str, n_clusters: int, *, random_state,
                  k_per_layer=None, **spectral):
    """Cluster one graph globally or locally; returns (hidden labels, hidden n-cut, whole-graph
    n-cut or None). Local clustering needs ``k_per_layer`` (clusters per hidden layer in the
    global clustering of the same graph). Used for the network and for its shuffled copies."""
    if scope == "global":
        labels = clustering.cluster_global(adj, sizes, n_clusters, random_state=random_state, **spectral)
        hidden_labels = [labels[i] for i in hidden]
        full_ncut = graph.ncut(adj, np.concatenate(labels))
    else:
        hidden_labels = _cluster_local(adj, sizes, hidden, k_per_layer, neighbours, random_state=random_state,
                                       **spectral)
        full_ncut = None
    ncut = _hidden_ncut(adj, sizes, hidden, hidden_labels, distinct_per_layer=(scope == "local"))
    return hidden_labels, ncut, full_ncut


def _has_edges(adj) -> bool:
    """Whether the graph has an edge between two different nodes."""
    if sparse.issparse(adj):
        adj = sparse.csr_array(adj)   # no copy of a CSR graph (a large CNN's has 10^8 entries)
        return int(np.count_nonzero(adj.data)) > int(np.count_nonzero(adj.diagonal()))
    a = np.asarray(adj)
    return bool(np.count_nonzero(a) - np.count_nonzero(np.diagonal(a)))


def _is_chain(neighbours, targets) -> bool:
    n = len(neighbours)
    return all(neighbours[l] == [m for m in (l - 1, l + 1) if 0 <= m < n] for l in targets)


def _cluster_local(adj, sizes, targets, ks, neighbours, *, random_state, **spectral):
    """Local clustering (section 3.1): layer l with the layers joined to it. For a chain of
    layers this is :func:`modlens.core.clustering.cluster_local` itself (l - 1, l, l + 1);
    otherwise the same procedure on l and its graph neighbours (residual networks)."""
    if _is_chain(neighbours, targets):
        return clustering.cluster_local(adj, sizes, targets, ks, random_state=random_state, **spectral)
    offsets = graph.layer_offsets(sizes)
    rng = as_generator(random_state)
    seeds = [int_seed(rng) for _ in targets]
    adj = sparse.csr_array(adj) if sparse.issparse(adj) else np.asarray(adj, dtype=np.float64)
    out = []
    for l, k, seed in zip(targets, ks, seeds):
        group = sorted({l, *neighbours[l]})
        nodes = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in group])
        sub = adj[nodes][:, nodes]
        start = int(sum(sizes[g] for g in group if g < l))
        stop = start + int(sizes[l])
        degrees = np.asarray(sub.sum(axis=1)).ravel() - sub.diagonal()
        n_active = int(np.count_nonzero(degrees > 0))
        layer = np.full(stop - start, UNCLUSTERED, dtype=np.int64)
        if n_active and k < 2:
            layer[degrees[start:stop] > 0] = 0
        elif n_active:
            labels = clustering.spectral_labels(sub, min(int(k), n_active), random_state=seed, **spectral)
            layer = clustering.relabel(labels[start:stop])
        out.append(layer)
    return out


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
    # the other nodes are left out of the cut as unclustered ones are: no copy of the graph (10^8 entries in
    # a large CNN's weight graph)
    full = np.full(int(offsets[-1]), UNCLUSTERED, dtype=np.int64)
    full[idx] = np.concatenate(lab)
    return float(graph.ncut(adj, full))


def partition(model, method: str, *, n_clusters: int = 16, data=None, random_state=0,
              conv_edge: str = "l1", act_reduce: str = "l1", bn_fold: str = "paper",
              input_name: str | None = None, output=None, eigen_solver: str = "auto",
              n_init: int | str = "auto", task: str = "classification", act_tokens: str = "auto",
              max_positions: int = 4096, vocab_nodes: str = "auto", token_groups=None, example=None,
              input_shape=None, capture: str = "auto") -> Partition:
    """Partition the hidden neurons of ``model`` (any ``torch.nn.Module`` modlens can capture:
    MLPs, CNNs, residual, grouped/depthwise and normalized networks; for CNNs the conv channels).

    ``method`` is one of ``"weights/global"``, ``"weights/local"``, ``"activations/global"``,
    ``"activations/local"``. Activation methods need ``data``: inputs (or an
    ``(inputs, labels)`` pair, or a DataLoader) of a held-out split; when given, the model is
    captured with ``torch.export`` at the data's shape. Weight methods need no data: the model is
    exported at ``example`` (a batch of inputs) or ``input_shape`` (one input's shape, e.g.
    ``(3, 224, 224)``) when given, else at the shape the model says it takes (a Hugging Face
    config's ``image_size``/``num_channels`` or ``vocab_size``, an ``image_size``/``img_size``
    attribute, timm's ``pretrained_cfg["input_size"]``, its first layer), else torch.fx is tried as
    the last resort and its failure asks for ``input_shape=``; ``capture="fx"`` chooses torch.fx.
    ``input_name`` passes the input as a keyword (``"pixel_values"`` for Hugging Face models; found
    from the model when it gives the shape), ``output`` selects the logits.
    ``conv_edge``, ``act_reduce`` and ``bn_fold`` are rows 1-3 of the notes. Returns a
    :class:`~modlens.core.partition.Partition` with integer labels for every neuron of every
    hidden layer, in forward order (``-1`` for neurons with no edges).

    ``eigen_solver`` (``"auto"``, ``"arpack"``, ``"lobpcg"``, ``"lanczos"``, ``"amg"``) and
    ``n_init`` (k-means initializations; ``"auto"``: 25, or 100 above 2,000 nodes, as the
    original code) go to
    :func:`modlens.core.clustering.spectral_labels`.

    Language models (docs/language-models.md): ``task="next-token"`` (``data``: token ids, or
    anything :func:`modlens.nn.tokens.as_token_data` takes), ``act_tokens``, ``max_positions``,
    ``vocab_nodes`` and ``token_groups`` as in :class:`Partitioner`.
    """
    check_method(method)
    check_graph_options(conv_edge=conv_edge, bn_fold=bn_fold, act_reduce=act_reduce)
    if task == "next-token" and data is not None:
        from modlens.nn.tokens import as_token_data

        data = as_token_data(data, name="activation data")
    if data is not None and example is not None:
        raise ValueError("pass data (activation data, also used for capture) or example (inputs for capture only), not both")
    name = "activation data" if example is None else "example"
    example = data.ids if isinstance(data, TokenData) else data if example is None else example
    adapter = make_adapter(model, example, input_name=input_name, output=output, name=name,
                           input_shape=input_shape, capture=capture)
    return Partitioner(adapter, activation_data=data, n_clusters=n_clusters, random_state=random_state,
                       conv_edge=conv_edge, act_reduce=act_reduce, bn_fold=bn_fold,
                       eigen_solver=eigen_solver, n_init=n_init, task=task, act_tokens=act_tokens,
                       max_positions=max_positions, vocab_nodes=vocab_nodes, token_groups=token_groups).partition(method)
