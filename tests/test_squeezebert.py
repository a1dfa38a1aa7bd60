"""Transformer MLPs written as kernel-1 Conv1d maps over (batch, channels, tokens), grouped
(SqueezeBERT): the hidden channels are the neurons, a grouped map joins only channels of its group
in the weight graph (block-diagonal), and lesions equal the plain oracle in float64. Before, the model
was refused ("attention but no transformer MLP")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modlens
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

transformers = pytest.importorskip("transformers")


def _squeezebert():
    cfg = transformers.SqueezeBertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                         q_groups=2, k_groups=2, v_groups=2, post_attention_groups=1,
                                         intermediate_groups=4, output_groups=2, embedding_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.SqueezeBertForSequenceClassification(cfg).double().eval()


def test_grouped_conv1d_mlps_are_neurons_with_block_diagonal_edges_and_oracle_lesions():
    model = _squeezebert()
    ids = torch.randint(3, 60, (48, 12), generator=torch.Generator().manual_seed(0))
    a = NetworkAdapter(model, ids, input_name="input_ids")
    assert a.is_transformer and a.layer_sizes == [24, 24]
    assert all(name.endswith("intermediate.conv1d") for name in a.layer_names)
    blocks = a.residual_parts()["blocks"]
    w = model.transformer.encoder.layers[0].intermediate.conv1d.weight.detach().numpy()[:, :, 0]  # (24, 16 / 4)
    w_in = blocks[0].w_in
    for g in range(4):   # each group of 6 units reads its 4 channels only
        rows, cols = slice(6 * g, 6 * g + 6), slice(4 * g, 4 * g + 4)
        np.testing.assert_allclose(np.abs(w_in[rows, cols]), np.abs(w[rows]), rtol=1e-12)
        off = np.delete(w_in[rows], np.arange(4 * g, 4 * g + 4), axis=1)
        assert not off.any()
    assert blocks[0].w_out.shape == (16, 24)
    part = modlens.partition(model, "weights/global", n_clusters=2, random_state=0)
    assert list(part.layer_names) == a.layer_names
    with torch.no_grad():
        y = model(input_ids=ids).logits.argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, ids, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer, width in enumerate(a.layer_sizes):
        sets = [rng.choice(width, size=k, replace=False) for k in (1, 6, 12)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, ids, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1
