"""Products with a weight inside attention's score path: position terms (docs/transformers.md).

Attention with relative positions adds to the scores ``q k^T`` a product of an activation with a
weight: the queries times a relative-position table (``einsum("bhid,ijd->bhij", q, table[idx])``,
SAM's decomposed terms, Wav2Vec2-BERT's distance embedding), the queries plus a learned bias vector
times a projected position embedding (Transformer-XL, XLNet, Funnel, the Conformer), or the queries
times a segment embedding. Such a product is part of the attention pattern: everything computed from
it ends in the softmax over keys (or in the mask of ``scaled_dot_product_attention``), whose
output only weighs the values. It carries no channel into the residual stream, so it is no layer
of neurons and has no weight edge, like the rest of the score path; lesions recompute it with the
attention it belongs to.

:func:`leaves_scores` tells such a product from a linear map written as a matrix product with a
parameter (``einsum("btc,cd->btd", x, W)`` added to the stream or read by an MLP), which stays
refused: some value computed from it reaches a layer, a normalization or the model output without
passing such a softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from modlens.nn._stream import _users

aten = torch.ops.aten
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_ENDS = ("layer", "token_mix", "output", "norm", "stat", "take_tokens", "final")


def _mixes_tokens(s, node: fx.Node) -> bool:
    return node.target in _SDPA or (s.kind(node) == "attention" and len(s.tensor_inputs(node)) >= 2)


def _weighs_values(s, softmax: fx.Node) -> bool:
    """Whether a softmax is attention's: its output (through reshapes, casts, dropout, masks) is
    multiplied by another activation, the values."""
    seen, todo = {softmax}, [softmax]
    while todo:
        for u in _users(s, todo.pop()):
            if u in seen:
                continue
            seen.add(u)
            if _mixes_tokens(s, u):
                return True
            if s.kind(u) not in _ENDS:
                todo.append(u)
    return False


def _is_value(sdpa: fx.Node, node: fx.Node) -> bool:
    return (len(sdpa.args) > 2 and sdpa.args[2] is node) or sdpa.kwargs.get("value") is node


def leaves_scores(s, product: fx.Node) -> fx.Node | None:
    """None when every value computed from ``product`` ends in attention scores: an attention
    softmax, or the query, key or mask of ``scaled_dot_product_attention``; else the first
    operation reached that is outside the score path (a layer, a normalization, the output, the
    values of attention)."""
    seen, todo = {product}, [product]
    while todo:
        node = todo.pop()
        for u in _users(s, node):
            if u in seen:
                continue
            seen.add(u)
            if u.target in _SDPA:
                if _is_value(u, node):
                    return u
                continue
            kind = s.kind(u)
            if kind == "final" and _weighs_values(s, u):
                continue
            if kind in _ENDS:
                return u
            todo.append(u)
    return None
