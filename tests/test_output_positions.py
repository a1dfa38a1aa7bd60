"""Class scores read from a per-position output layer (issue 20): one fixed position (Perceiver's
``logits[:, 0, :]``) or the mean over positions (EuroBERT's late pooling). The output layer stays the
last layer; lesions equal the plain oracle; reads along the class dimension stay refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from modlens.nn._ops import UnsupportedModelError
from tiny_transformers import TokenClassifier

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected")

READS = {
    "index": lambda z: z[:, 0, :],
    "index-last": lambda z: z[:, -1],
    "select": lambda z: z.select(1, 2),
    "mean": lambda z: z.mean(1),
    "sum": lambda z: z.sum(dim=1),
}


class PerPosition(TokenClassifier):
    """The head scores every position; ``read`` turns (B, T, classes) into (B, classes)."""

    def __init__(self, read, **kw):
        super().__init__(**kw)
        self.read = read

    def forward(self, x):
        return self.read(self.head(self.norm(self.blocks(self.embed(x) + self.pos))))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("read", list(READS))
def test_scores_read_at_positions_after_the_output_layer_and_lesions_equal_the_oracle(read, capture):
    torch.manual_seed(3)
    m = PerPosition(READS[read], n_blocks=2).double().eval()
    x = torch.randn(80, 5, 6, dtype=torch.float64)
    y = m(x).argmax(-1)
    a = NetworkAdapter(m, x, capture=capture)
    assert a.layer_names == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"] and a.structure.output_layer.target == "head"
    assert a.n_classes == 3
    ev = IncrementalLesions(a, x, y)
    changed = 0
    for layer in range(2):
        sets = [np.arange(k) for k in (1, 6, 12)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        changed += int((fast != ev.baseline).any())
    assert changed


@pytest.mark.parametrize("read", [lambda z: z[:, :, 0:2].mean(1), lambda z: z.mean(1)[:, :2],
                                  lambda z: z.select(2, 0)])
def test_reads_along_the_class_dimension_stay_refused(read):
    m = PerPosition(read).double().eval()
    with pytest.raises(UnsupportedModelError, match="model output is computed by"):
        NetworkAdapter(m, torch.randn(4, 5, 6, dtype=torch.float64))


def test_perceiver_sequence_classifier_reads_its_one_query():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.PerceiverConfig(num_latents=4, d_latents=16, d_model=16, num_blocks=1,
                                       num_self_attends_per_block=1, num_self_attention_heads=2,
                                       num_cross_attention_heads=2, vocab_size=40, max_position_embeddings=8,
                                       num_labels=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.PerceiverForSequenceClassification(cfg).double().eval()
    ids = torch.randint(0, 40, (30, 8), generator=torch.Generator().manual_seed(0))
    a = NetworkAdapter(model, ids, input_name="inputs")
    assert a.structure.output_layer.target.endswith("decoder.decoder.final_layer")
    with torch.no_grad():
        y = model(inputs=ids).logits.argmax(-1)
    ev = IncrementalLesions(a, ids, y)
    for layer in range(len(a.layer_sizes)):
        sets = [np.arange(k) for k in (1, a.layer_sizes[layer] // 2)]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, ids, y))


class WidenedPooler(TokenClassifier):
    """A pooler Linear whose output is widened (repeated twice) before the head: the head's columns are
    not the pooler's rows, so there is no head map to compose (before: a matmul error)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pool = torch.nn.Linear(8, 4)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.pool(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1))
        return self.head(h.repeat(1, 2))


def test_a_head_read_through_a_width_change_is_not_composed_with_the_pooler():
    torch.manual_seed(0)
    m = WidenedPooler(n_blocks=2).double().eval()
    a = NetworkAdapter(m, torch.randn(8, 5, 6, dtype=torch.float64))
    parts = a.residual_parts()
    assert parts["head"] is None and len(parts["blocks"]) == 2
    assert {(i, j) for i, j, _ in a.weight_blocks()} >= {(0, 1), (1, 2)}
