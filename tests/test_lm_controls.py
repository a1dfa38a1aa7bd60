"""Controls for language models (issue 18): planted modules are found and detected, random
decoders are not called modular more often than alpha allows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import modlens
from modlens.nn.models import build_model
from planted_lm import MODULES, T, V, planted_decoder, planted_text

pytestmark = pytest.mark.filterwarnings("ignore")


def test_the_planted_decoder_does_what_it_says():
    model = planted_decoder()
    ids, genre = planted_text(40, seed=0)
    with torch.no_grad():
        pred = model(ids).argmax(-1)
    assert (pred[:, :-1] == ids[:, 1:]).all()          # every next token right
    for g in (0, 1):  # without a genre's block-1 neurons its predictions fail, the other genre's stay right
        m = planted_decoder()
        with torch.no_grad():
            m.blocks[1].out.weight[:, 8 * g:8 * g + 8] = 0
            pred = m(ids).argmax(-1)[:, :-1]
        right = (pred == ids[:, 1:]).double().mean(1).numpy()
        assert (right[genre == g] == 0).all() and (right[genre != g] == 1).all()


def test_planted_language_modules_are_recovered_and_detected():
    model = planted_decoder()
    test, genre = planted_text(40, seed=1)
    held, _ = planted_text(40, seed=2)
    part = modlens.partition(model, "weights/global", n_clusters=2, data=held, task="next-token", random_state=0)
    for labels, truth in zip(part.labels, MODULES):
        assert adjusted_rand_score(truth, labels) == 1.0
    # 4 subclusters (2 modules x 2 blocks), 99 random sets each: p < 1e-4 is reachable
    res = modlens.analyze(model, test, activation_data=held, task="next-token", position_classes=genre,
                          n_clusters=2, n_random=99, partitionings=["weights/global"], random_state=0)
    row = res.summary.set_index(["partitioning", "metric"]).loc[("weights/global", "label_range")]
    assert row["n_subclusters"] == 4 and row["p_value"] < 1e-4 and row["significant"]
    assert row["effect"] > 1.5   # the genre range of a module (1.0) against random sets of the same size (~0.3)
    tests = res.tests[res.tests["metric"] == "label_range"]
    assert np.allclose(tests["value"], 1.0)       # each module serves one genre: range 1 - 0


def test_random_decoders_are_not_called_modular_more_often_than_alpha_allows():
    """Null control: 6 random-weight decoders (no training), random token data, a random label per
    sequence; every partitioning-metric p value of the next-token task. Under no modularity a
    (conservative) test rejects at most alpha of them; allow two binomial standard errors."""
    p_values = []
    for seed in range(6):
        model = build_model({"type": "gpt", "vocab_size": 32, "context": T, "d_model": 32, "n_blocks": 2,
                             "n_heads": 2, "d_mlp": 32}, generator=torch.Generator().manual_seed(seed)).eval()
        with torch.no_grad():   # GPT-2's 0.02 init leaves lesions nearly silent; unit-scale weights make them bite
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 1 / np.sqrt(p.shape[1]), generator=torch.Generator().manual_seed(100 + seed))
        g = torch.Generator().manual_seed(1000 + seed)
        test = torch.randint(0, 32, (40, T), generator=g)
        act = torch.randint(0, 32, (40, T), generator=g)
        res = modlens.analyze(model, test, activation_data=act, task="next-token", n_clusters=4, n_random=19,
                              token_classes=np.arange(32) % 4, position_classes=np.arange(40) % 2,
                              partitionings=["weights/global", "activations/global"], feature_vis=True,
                              random_state=seed)
        assert len(res.summary) == 2 * 5
        p_values += res.summary["p_value"].tolist()
    p = np.asarray(p_values)
    alpha = 0.05
    bound = alpha + 2 * np.sqrt(alpha * (1 - alpha) / p.size)
    assert np.isfinite(p).all() and (p < alpha).mean() <= bound, sorted(p)[:8]
