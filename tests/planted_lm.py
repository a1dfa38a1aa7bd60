"""A decoder language model with planted modules, built by hand (issue 18's positive control).

Two genres of token sequences: genre 0 uses tokens 0-7 and continues ``t -> (t + 1) mod 8``,
genre 1 uses tokens 8-15 and continues ``t -> 8 + (t - 8 + 3) mod 8``. The model is modlens's
reference :class:`~modlens.nn.models.Decoder` (2 blocks, width 64, 16 MLP units per block, tied
embeddings) with weights set so that the next token is computed by two modules of MLP neurons,
one per genre, and by nothing else:

* every vector the model writes is one of 32 orthogonal zero-mean directions (dims ``2k`` and
  ``2k + 1`` = +-1/sqrt 2), so LayerNorm only rescales; token ``t`` embeds as direction ``t`` and
  has an "intermediate code" direction ``16 + t``; attention writes nothing (its output map is 0)
  and positions embed as 0;
* block 0, neuron ``t``: fires on token ``t`` (reads direction ``t``, bias -4 after LayerNorm's
  factor 8) and writes the code of ``t``; block 1, neuron ``t``: fires on that code and writes 3 x
  the embedding of the next token, so the tied unembedding predicts it (the current token's own
  embedding scores 1, the next one 3);
* the neurons of a genre also read the other tokens (block 0) / codes (block 1) of their genre
  with weight ``eps``: too little to fire, enough to join the genre's neurons in the weight graph,
  which then has exactly two connected parts, one per genre.

Lesioning a genre's neurons in either block makes every prediction of that genre the current
token (wrong) and leaves the other genre's exact: each module is needed for one genre only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modlens.nn.models import build_model

V, T, D, MLP = 16, 16, 64, 16
GENRE_OF_TOKEN = np.repeat([0, 1], 8)


def next_token(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t)
    return np.where(t < 8, (t + 1) % 8, 8 + (t - 8 + 3) % 8)


def _direction(k: int) -> torch.Tensor:
    v = torch.zeros(D, dtype=torch.float64)
    v[2 * k], v[2 * k + 1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    return v


def planted_decoder(eps: float = 0.05) -> torch.nn.Module:
    model = build_model({"type": "gpt", "vocab_size": V, "context": T, "d_model": D, "n_blocks": 2, "n_heads": 2,
                         "d_mlp": MLP}, generator=torch.Generator().manual_seed(0)).double().eval()
    tok = torch.stack([_direction(t) for t in range(V)])
    code = torch.stack([_direction(V + t) for t in range(V)])
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        model.tok.weight.copy_(tok)
        model.pos.weight.zero_()
        b0, b1 = model.blocks
        for b in (b0, b1):
            b.attn.proj.weight.zero_()
            b.attn.proj.bias.zero_()
        for b, reads, scale in ((b0, tok, 8.0), (b1, code, 8.0 / math.sqrt(2))):
            for t in range(V):
                same = reads[GENRE_OF_TOKEN == GENRE_OF_TOKEN[t]].sum(0) - reads[t]
                b.fc.weight[t] = reads[t] + eps * same
                b.fc.bias[t] = -scale / 2
        v0 = float(gelu(torch.tensor(4.0, dtype=torch.float64)))
        v1 = float(gelu(torch.tensor(8.0 / math.sqrt(2) / 2, dtype=torch.float64)))
        b0.out.weight.copy_((code / v0).T)
        b1.out.weight.copy_((3 * tok[torch.as_tensor(next_token(np.arange(V)))] / v1).T)
        b0.out.bias.zero_()
        b1.out.bias.zero_()
    return model


def planted_text(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(ids (n, T), genre (n,))``: half the sequences of each genre, each from a random start token
    of its genre, following that genre's rule."""
    rng = np.random.default_rng(seed)
    genre = np.arange(n) % 2
    ids = np.zeros((n, T), dtype=np.int64)
    ids[:, 0] = rng.integers(0, 8, n) + 8 * genre
    for t in range(1, T):
        ids[:, t] = next_token(ids[:, t - 1])
    return torch.from_numpy(ids), genre


#: The planted modules: neurons 0-7 of each block serve genre 0, neurons 8-15 genre 1.
MODULES = [GENRE_OF_TOKEN.copy(), GENRE_OF_TOKEN.copy()]
