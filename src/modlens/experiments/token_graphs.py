"""The graphs of a transformer over tokens (docs/language-models.md, sections 7, 9 and 10).

* **Activation rows** (``act_tokens``): ``"positions"``: one row per (sequence, position) of the
  activation data, at most ``max_positions`` drawn without replacement (the default for the
  next-token task: a language model predicts at every position and its neurons take a value at
  every position); ``"aggregate"``: one row per sequence, the L1 norm over tokens
  (docs/transformers.md; the default for classifiers).
* **Vocabulary nodes** (``vocab_nodes``): the embedding's inputs and the unembedding's outputs of
  the residual weight graph as one node per token (``"tokens"``), left out (``"none"``), or one node
  per group of ``token_groups`` (``"groups"``: each group contracted to one node, the edge to it the
  sum of the edges to its tokens). ``"auto"``: groups when ``token_groups`` is given, else tokens for
  layers of at most :data:`VOCAB_MAX_NODES` nodes and none above.
* **Share of squared weight inside clusters** of a transformer's weight partition (:func:`residual_weight_share`).
"""

from __future__ import annotations

import numpy as np

from modlens.core.knn_graph import DENSE_MAX_NODES
from modlens.core.residual_graph import residual_edge_blocks, residual_inside_sq, residual_layer_sizes
from modlens.core.weight_share import weight_share, weight_share_of_sums

ACT_TOKENS = ("auto", "positions", "aggregate")
VOCAB_NODES = ("auto", "tokens", "none", "groups")
#: Input or output layers of the weight graph with more nodes are left out under ``vocab_nodes="auto"``.
VOCAB_MAX_NODES = 4096


def resolve_act_tokens(act_tokens: str, task: str) -> str:
    if act_tokens not in ACT_TOKENS:
        raise ValueError(f"act_tokens must be one of {', '.join(ACT_TOKENS)}, got {act_tokens!r}")
    if act_tokens == "auto":
        return "positions" if task == "next-token" else "aggregate"
    return act_tokens


def vocab_parts(parts: dict, vocab_nodes: str = "auto", token_groups=None) -> dict:
    """The keyword arguments of :func:`~modlens.core.residual_graph.residual_weight_graph` with the
    vocabulary decision applied to ``parts`` (an adapter's ``residual_parts()``)."""
    if vocab_nodes not in VOCAB_NODES:
        raise ValueError(f"vocab_nodes must be one of {', '.join(VOCAB_NODES)}, got {vocab_nodes!r}")
    out = dict(parts)
    if vocab_nodes == "groups" and token_groups is None:
        raise ValueError("vocab_nodes='groups' needs token_groups=: an int per vocabulary entry (-1: left out)")
    mode = vocab_nodes
    if mode == "auto":
        mode = "groups" if token_groups is not None else "tokens"
    for key, groups_key, axis in (("embedding", "input_groups", 1), ("head", "output_groups", 0)):
        m = out.get(key)
        if m is None:
            continue
        n = int(np.shape(m)[axis])
        if mode == "none" or (vocab_nodes == "auto" and token_groups is None and n > VOCAB_MAX_NODES):
            out[key] = None
            if key == "head":
                out["final_gamma"] = None
        elif mode == "groups":
            groups = np.asarray(token_groups, dtype=np.int64)
            if groups.shape != (n,):
                # an input layer that is not the vocabulary (a ViT's pixels) or a class head keeps its nodes
                continue
            out[groups_key] = groups
    return out


def layer_layout(parts: dict) -> tuple[list[int], list[int]]:
    """(node-layer sizes, indices of the hidden node layers) of a residual weight graph."""
    sizes = residual_layer_sizes(parts["blocks"], embedding=parts.get("embedding"), head=parts.get("head"),
                                 input_groups=parts.get("input_groups"), output_groups=parts.get("output_groups"))
    first = 0 if parts.get("embedding") is None else 1
    return sizes, [first + i for i in range(len(parts["blocks"]))]


def residual_weight_share(parts: dict, labels, pair_sq: dict | None = None) -> dict:
    """:func:`~modlens.core.weight_share.weight_share` of MLP-neuron ``labels`` (one array per block)
    on the full (not kNN) residual weight graph between MLP blocks, one block pair at a time
    (float32 products above the dense-graph size). With ``pair_sq``, every block pair's sum of squares
    recorded while the weight graph was built (``residual_weight_graph(pair_sq=...)``, same dtype), only the
    edges inside clusters are computed again (:func:`~modlens.core.residual_graph.residual_inside_sq`)."""
    n = sum(b.width for b in parts["blocks"])
    dtype = np.float32 if n > DENSE_MAX_NODES else np.float64
    if pair_sq is not None:
        inside = residual_inside_sq(parts["blocks"], labels, dtype=dtype, transitions=parts.get("transitions", ()))
        return weight_share_of_sums(pair_sq, inside, labels)
    triples = residual_edge_blocks(parts["blocks"], dtype=dtype, neurons_only=True,
                                   transitions=parts.get("transitions", ()))
    return weight_share(triples, labels, list(range(len(parts["blocks"]))))


__all__ = ["ACT_TOKENS", "VOCAB_NODES", "VOCAB_MAX_NODES", "resolve_act_tokens", "vocab_parts", "layer_layout",
           "residual_weight_share"]
