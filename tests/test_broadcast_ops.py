"""A size-1 dimension inserted, or other dimensions repeated or broadcast (``unsqueeze``, ``repeat``,
``expand``), keeps a layer's channels; a softmax over a dimension of size 1 is the constant 1, so the
output does not depend on what it reads. Together they are SwiftFormer's additive attention as Hugging
Face writes it: the queries pooled over the tokens by a softmax over a size-1 score, then repeated over
the tokens and multiplied with the keys (a gate). Before, the model was refused at the softmax ("reaches
the model output through operation 'softmax.int'"). Fast lesions equal the plain oracle in float64 on
both capture paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modlens
from modlens.nn._ops import UnsupportedModelError
from modlens.nn.adapter import NetworkAdapter
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
from test_ops_families import _oracle_check


class PooledGate(nn.Module):
    """(B, 3, 4, 4) -> conv -> tokens (B, 16, 8) -> a pooled-query gate over the keys -> head.

    ``mode`` picks how the pooled queries (B, 8) are spread over the tokens again: ``repeat``
    (``unsqueeze(1).repeat(1, N, 1)``, as SwiftFormer), ``expand`` (``unsqueeze(1).expand(-1, N, -1)``)
    or ``broadcast`` (``unsqueeze(1)`` and the product's own broadcasting)."""

    def __init__(self, mode: str = "repeat"):
        super().__init__()
        self.mode = mode
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.to_query, self.to_key = nn.Linear(8, 8), nn.Linear(8, 8)
        self.w_g = nn.Parameter(torch.randn(8, 1))
        self.proj, self.final = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = F.relu(self.stem(x)).flatten(2).transpose(1, 2)            # (B, N, C)
        q, k = F.normalize(self.to_query(t), dim=-1), F.normalize(self.to_key(t), dim=-1)
        score = (q @ self.w_g * 0.5).softmax(dim=-1)                    # (B, N, 1): all ones
        g = torch.sum(score * q, dim=1)                                 # (B, C)
        if self.mode == "repeat":
            g = g.unsqueeze(1).repeat(1, t.shape[1], 1)
        elif self.mode == "expand":
            g = g.unsqueeze(1).expand(-1, t.shape[1], -1)
        else:
            g = torch.unsqueeze(g, 1)
        t = t + self.final(self.proj(g * k) + q)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("mode", ["repeat", "expand", "broadcast"])
def test_pooled_gate_is_followed_and_lesions_equal_the_oracle(mode, capture):
    a = _oracle_check(PooledGate(mode), (3, 4, 4), capture=capture)
    assert a.capture_method == capture
    assert a.layer_names == ["stem", "to_query", "to_key", "proj", "final", "fc1", "fc2"]


def test_the_queries_reach_the_gate_and_the_constant_softmax_ends_its_path():
    torch.manual_seed(0)
    m = PooledGate().double().eval()
    a = NetworkAdapter(m, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    blocks = {(i, j): b for i, j, b in a.weight_blocks()}
    q, k, proj = (a.layer_names.index(n) for n in ("to_query", "to_key", "proj"))
    # the queries and the keys both reach proj (through the gate): its weights are their edges
    np.testing.assert_allclose(blocks[(q, proj)], m.proj.weight.abs().detach().numpy())
    np.testing.assert_allclose(blocks[(k, proj)], m.proj.weight.abs().detach().numpy())
    # the score's softmax is 1 whatever w_g computes: the output does not depend on it, so w_g (a product
    # with a weight, made a layer by the capture) has no neurons
    assert "w_g" not in a.layer_names
    part = modlens.partition(a, "weights/global", n_clusters=2, random_state=0)
    assert list(part.layer_names) == a.layer_names


def test_a_softmax_over_the_channels_still_refuses():
    class Scores(PooledGate):
        def forward(self, x):
            t = F.relu(self.stem(x)).flatten(2).transpose(1, 2)
            return self.head((self.to_query(t).softmax(dim=-1) * t).mean(1))

    with pytest.raises(UnsupportedModelError, match="'to_query' reaches the model output through operation 'softmax"):
        NetworkAdapter(Scores(), torch.randn(2, 3, 4, 4))


def test_repeating_the_channels_is_refused_in_one_line():
    class Repeats(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(12, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)).repeat(1, 2))

    with pytest.raises(UnsupportedModelError, match=r"repeats or moves the channels of layer 'fc1'") as err:
        NetworkAdapter(Repeats(), torch.randn(2, 5))
    assert "\n" not in str(err.value)


def test_hugging_face_swiftformer_runs_and_its_lesions_equal_the_oracle():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16], image_size=16,
                                         num_labels=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.SwiftFormerForImageClassification(cfg).double().eval()
    x = torch.randn(32, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = NetworkAdapter(model, x[:2], input_name="pixel_values")
    assert any(n.endswith("attn.to_query") for n in a.layer_names)
    assert not any(n.endswith("attn.w_g") for n in a.layer_names)
    part = modlens.partition(model, "weights/global", n_clusters=2, random_state=0)   # without data
    assert list(part.layer_names) == a.layer_names
    with torch.no_grad():
        for _ in range(3):
            a.output_module.bias -= model(pixel_values=x).logits.mean(0)
        y = model(pixel_values=x).logits.argmax(-1)
    assert len(y.unique()) > 1
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    attn = [i for i, n in enumerate(a.layer_names) if ".attn." in n]
    assert len(attn) >= 4
    for layer in attn[:4]:   # one attention's query, key, proj and final (the plain oracle reruns the model)
        width = a.layer_sizes[layer]
        sets = [rng.choice(width, size=k, replace=False) for k in (1, max(1, width // 2))]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y),
                                      err_msg=a.layer_names[layer])
