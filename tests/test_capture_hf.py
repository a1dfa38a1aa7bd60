"""Issue 8: Hugging Face image classifiers built from tiny configs (nothing is downloaded) run
through ``partition`` (all four methods) and ``analyze`` (lesions and feature visualization);
the incremental lesion engine equals the plain oracle on each (float64); the user's model is
left exactly as it was after success and after an exception mid-run."""

import time

import numpy as np
import pytest
import torch

import modlens
from modlens.experiments.partitioning import METHODS
from modlens.nn.adapter import NetworkAdapter, UnsupportedModelError
from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")

SIZE = 32


def _make(family: str):
    t = transformers
    torch.manual_seed(0)
    if family == "resnet-basic":
        cfg = t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
        return t.ResNetForImageClassification(cfg)
    if family == "resnet-bottleneck":
        cfg = t.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                             num_labels=3)
        return t.ResNetForImageClassification(cfg)
    if family == "convnext":
        cfg = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        return t.ConvNextForImageClassification(cfg)
    if family == "mobilenet_v2":
        cfg = t.MobileNetV2Config(depth_multiplier=0.25, num_labels=3, image_size=SIZE)
        return t.MobileNetV2ForImageClassification(cfg)
    if family == "regnet":
        cfg = t.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=3)
        return t.RegNetForImageClassification(cfg)
    raise AssertionError(family)


FAMILIES = ["resnet-basic", "resnet-bottleneck", "convnext", "mobilenet_v2", "regnet"]


def _data(model, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=dtype)
    with torch.no_grad():
        y = model(pixel_values=x).logits.argmax(-1)
    return x, y


def _center(model, x):
    """Shift the classifier's bias so that the random model predicts several classes."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias -= model(pixel_values=x).logits.mean(0)


def _snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: m.training for n, m in model.named_modules()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, flags, hooks, grads


def _assert_unchanged(model, snap):
    state, flags, hooks, grads = snap
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k].detach(), v), k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules()) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_face_classifier_partition_and_analyze(family, record_property):
    model = _make(family).eval()
    x0, _ = _data(model, 24, 3)
    _center(model, x0)
    model.train()  # the user's flag; modlens must run in eval and restore it
    test = _data(model.eval(), 24, 1)
    held, _ = _data(model, 24, 2)
    model.train()
    snap = _snapshot(model)
    part = modlens.partition(model, "weights/global", n_clusters=2, data=held, input_name="pixel_values")
    adapter = NetworkAdapter(model, held, input_name="pixel_values")  # captured once for the other methods
    for method in METHODS:
        part = modlens.partition(adapter, method, n_clusters=2, data=held, random_state=0)
        assert len(part.labels) == len(part.layer_names) > 0
    assert all("." in name for name in part.layer_names)  # module paths, e.g. resnet.embedder...
    started = time.perf_counter()
    # MobileNetV2 (52 layers): its activation graph takes ~20 s to cluster, so analyze runs the weight methods
    parts = ["weights/global", "weights/local"] if family == "mobilenet_v2" else list(METHODS)
    res = modlens.analyze(model, test, activation_data=held, input_name="pixel_values", n_clusters=2, n_random=2,
                          partitionings=parts, feature_vis=True, vis_options={"steps": 2}, random_state=0)
    seconds = time.perf_counter() - started
    record_property("analyze_seconds", round(seconds, 1))
    print(f"\nanalyze {family}: {seconds:.1f} s, {len(res.config['layers'])} layers, capture {res.config['capture']}")
    assert res.config["capture"] == "export"
    assert set(res.summary["partitioning"]) == set(parts)
    assert {"acc_drop", "vis_score"} <= set(res.summary["metric"])
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_engine_equals_plain_oracle_on_hugging_face_models(family):
    model = _make(family).double().eval()
    x0, _ = _data(model, 16, 3, torch.float64)
    _center(model, x0)
    x, y = _data(model, 32, 1, torch.float64)
    a = NetworkAdapter(model, x, input_name="pixel_values")
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    layers = range(len(a.layers)) if len(a.layers) < 20 else rng.choice(len(a.layers), 12, replace=False)
    changed = 0
    for layer in layers:
        width = a.layer_sizes[layer]
        sets = [rng.choice(width, size=max(1, width // 3), replace=False) for _ in range(2)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_model_is_left_as_it_was_after_an_exception_mid_run(monkeypatch):
    model = _make("resnet-basic")
    model.train()
    snap = _snapshot(model)
    test, held = _data(model.eval(), 16, 1), _data(model, 16, 2)[0]
    model.train()
    calls = []
    baseline = IncrementalLesions._baseline

    def boom(self):
        calls.append(baseline(self))  # after capture, partitioning and a pass over the test set
        raise RuntimeError("interrupted mid-run")

    monkeypatch.setattr(IncrementalLesions, "_baseline", boom)
    with pytest.raises(RuntimeError, match="mid-run"):
        modlens.analyze(model, test, activation_data=held, input_name="pixel_values", n_clusters=2, n_random=1,
                        partitionings=["weights/global"])
    assert calls
    _assert_unchanged(model, snap)


def test_vit_mlp_units_are_the_neuron_layers():  # (transformers: tests/test_transformers.py)
    t = transformers
    cfg = t.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, num_labels=3)
    model = t.ViTForImageClassification(cfg).eval()
    a = NetworkAdapter(model, torch.randn(2, 3, 16, 16), input_name="pixel_values")
    assert a.is_transformer and a.layer_names == ["vit.layers.0.mlp.fc1"] and a.layer_sizes == [16]


def test_shared_layers_are_one_neuron_layer_per_application_lesioned_per_call():
    """ALBERT applies one layer at every depth: each application is its own neuron layer (tied
    weight edges), and a lesion removes the neurons of that application only. The fast engine, the
    plain oracle (a mask on that call's input: zeroing the shared weights would lesion every call)
    and a forward pre-hook on the shared module's n-th call agree in float64."""
    torch.manual_seed(1)
    cfg = transformers.AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    max_position_embeddings=16)
    model = transformers.AlbertForSequenceClassification(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # larger weights: lesions flip predictions
    x = torch.randint(3, 64, (64, 8))
    a = NetworkAdapter(model, x, input_name="input_ids")
    assert len(a.layer_names) == 3 and a.layer_sizes == [32, 32, 32]
    with torch.no_grad():
        y = model(input_ids=x).logits.argmax(-1)
    shared = model.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn_output

    def direct(call, neurons):
        seen = {"n": 0}

        def pre(module, args):
            seen["n"] += 1
            if seen["n"] == call + 1:
                h = args[0].clone()
                h[..., neurons] = 0
                return (h,)
        handle = shared.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                return int((model(input_ids=x).logits.argmax(-1) == y).sum())
        finally:
            handle.remove()

    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer in range(3):
        sets = [rng.choice(32, size=k, replace=False) for k in (16, 28, 31)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y))
        assert fast.sum(1).tolist() == [direct(layer, s) for s in sets]
        changed += int((fast.sum(1) != len(y)).any())
    assert changed >= 2


def test_bart_classifier_reading_end_tokens_runs_without_data_and_at_any_batch():
    """BART's head reads the state at each sequence's end token (``hidden[input_ids == eos]``): the
    example modlens makes without data ends its sequences with that token; per-sample shapes are
    taken at two samples (the exported graph asserts, on the count of end tokens, that the batch has
    at least two); and the decoder's input, written in place (``shifted[:, 1:] = ids[:, :-1]``,
    ``copy_`` into a slice), is kept in every cut of the graph. Weights without data, activations,
    and lesions equal to the oracle in float64."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                  decoder_ffn_dim=24, max_position_embeddings=32, num_labels=3)
    model = transformers.BartForSequenceClassification(cfg).double().eval()
    part = modlens.partition(model, "weights/global", n_clusters=2, input_name="input_ids", random_state=0)
    assert [len(l) for l in part.labels] == [24, 24]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, 64, (33, 10), generator=g)
    x[:, -1] = cfg.eos_token_id
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)   # larger weights: lesions flip predictions
        head = model.classification_head.out_proj
        head.bias -= model(input_ids=x).logits.mean(0)
        y = model(input_ids=x).logits.argmax(-1)
    assert len(y.unique()) > 1
    a = NetworkAdapter(model, x[:2], input_name="input_ids")
    assert a.layer_sizes == [24, 24]
    acts = modlens.partition(a, "activations/global", n_clusters=2, data=x, random_state=0)
    assert [len(l) for l in acts.labels] == [24, 24]
    ev = IncrementalLesions(a, x, y)
    rng = np.random.default_rng(0)
    changed = 0
    for layer in range(2):
        sets = [rng.choice(24, size=k, replace=False) for k in (1, 12, 20)]
        fast = ev.correct_counts(layer, sets)
        np.testing.assert_array_equal(fast, correct_counts_plain(a, layer, sets, x, y), err_msg=a.layer_names[layer])
        changed += int((fast != ev.baseline).any())
    assert changed >= 1


def test_longformer_refusal_names_the_export_failure_first():
    """Longformer's self-attention branches on whether any token has global attention
    (``is_index_global_attn.flatten().any().item()``, which the classifier always switches on for
    the first token): torch.export cannot guard on that value, and torch.fx, the fallback, fails
    earlier (``global_attention_mask[:, 0] = 1`` on a proxy). The one-line refusal leads with the
    export failure, its submodule and source line, then the fx one."""
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, attention_window=4, max_position_embeddings=32,
                                        num_labels=3)
    model = transformers.LongformerForSequenceClassification(cfg).eval()
    x = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for run in (lambda: NetworkAdapter(model, x, input_name="input_ids"),
                lambda: modlens.partition(model, "weights/global", n_clusters=2, input_name="input_ids")):
        with pytest.raises(modlens.nn.adapter.ModelTraceError) as info:
            run()
        msg = str(info.value)
        assert "\n" not in msg
        export, fx = msg.split("; the torch.fx fallback failed too: ")
        assert export.startswith("modlens could not capture LongformerForSequenceClassification: torch.export "
                                 "failed inside submodule 'longformer.encoder.layer.0.attention.self' "
                                 "(LongformerSelfAttention), at modeling_longformer.py:")
        assert "data-dependent" in export and "with torch.fx" in fx
