"""Products with a weight that belong to attention: position terms and projections (docs/transformers.md).

Attention with relative positions adds to the scores ``q k^T`` a product of an activation with a
weight: the queries times a relative-position table (``einsum("bhid,ijd->bhij", q, table[idx])``,
SAM's decomposed terms, Wav2Vec2-BERT's distance embedding), the queries plus a learned bias vector
times a projected position embedding (Transformer-XL, XLNet, Funnel, the Conformer), or the queries
times a segment embedding. Such a product is part of the attention pattern: everything computed from
it ends in the softmax over keys (or in the mask of ``scaled_dot_product_attention``), whose
output only weighs the values. It carries no channel into the residual stream, so it is no layer
of neurons and has no weight edge, like the rest of the score path; lesions recompute it with the
attention it belongs to.

Some models also write attention's own projections as products with a weight tensor (XLNet:
``einsum("ibh,hnd->ibnd", h, self.q)`` for the queries, keys and values, ``einsum("ibnd,hnd->ibh",
attn_vec, self.o)`` for the output). They are what ``nn.Linear`` projections of queries, keys,
values and output are in any other transformer: not neuron layers, and not in the residual-stream
weight graph, which follows the MLPs only. A product belongs to attention (:func:`outside_attention`
returns None) when

* every value computed from it reaches attention's mixing of tokens (the scores' softmax, the
  query, key, value or mask of ``scaled_dot_product_attention``, a product of two activations such
  as ``q k^T`` or ``p v``) before any layer, normalization or the model output: a position term, a
  query, key or value projection; or
* it reads the output of such a mixing product (through reshapes, permutes and copies) and its result
  goes straight to the stream (a residual addition or a normalization, through reshapes, copies and
  scales, no activation function): an output projection.

A matrix product with a weight that reads the stream and writes it (``einsum("btc,cd->btd", x, W)``
added to the stream, or read by an MLP) stays refused: it is a linear map modlens cannot find.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from modlens.nn._stream import _MOVES, _is_activation, _users

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


def _before_mixing(s, product: fx.Node) -> fx.Node | None:
    """None when every value computed from ``product`` reaches attention's mixing of tokens first;
    else the first operation reached outside attention."""
    seen, todo = {product}, [product]
    while todo:
        for u in _users(s, todo.pop()):
            if u in seen:
                continue
            seen.add(u)
            kind = s.kind(u)
            if _mixes_tokens(s, u) or (kind == "final" and _weighs_values(s, u)):
                continue
            if kind in _ENDS:
                return u
            todo.append(u)
    return None


def _reads_mixing(s, product: fx.Node) -> bool:
    """Whether the one activation ``product`` reads comes from a mixing of tokens, through reshapes,
    permutes and copies."""
    node = next(iter(s.tensor_inputs(product)), None)
    while node is not None and not _mixes_tokens(s, node):
        ins = s.tensor_inputs(node)
        if s.kind(node) not in _MOVES + ("unary",) or len(ins) != 1 or _is_activation(s, node):
            return False
        node = ins[0]
    return node is not None


def _writes_stream(s, product: fx.Node) -> fx.Node | None:
    """None when every path from ``product`` goes to a residual addition or a normalization through
    reshapes, copies and scales only; else the first operation met on the way."""
    seen, todo = {product}, [product]
    while todo:
        for u in _users(s, todo.pop()):
            if u in seen:
                continue
            seen.add(u)
            kind = s.kind(u)
            if kind in ("join", "norm"):
                continue
            if kind not in _MOVES + ("unary", "scale") or len(s.tensor_inputs(u)) != 1 or _is_activation(s, u):
                return u
            todo.append(u)
    return None


def outside_attention(s, product: fx.Node) -> fx.Node | None:
    """None when ``product`` (an activation times a weight) belongs to attention (see the module
    docstring); else the first operation its result reaches outside attention, for the refusal."""
    end = _before_mixing(s, product)
    if end is None:
        return None
    if len(s.tensor_inputs(product)) == 1 and _reads_mixing(s, product) and _writes_stream(s, product) is None:
        return None
    return end
