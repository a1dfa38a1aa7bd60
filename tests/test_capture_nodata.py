"""Issue 20: capture without data. ``partition(model, "weights/global")`` and ``NetworkAdapter(model)``
export the model at an example input from ``input_shape=``/``example=`` or from what the model says
about itself (a Hugging Face config, its first layer), and that capture equals the capture at data
of the same shape; a model that gives no shape gets one line asking for ``input_shape=``."""

import numpy as np
import pytest
import torch
from torch import nn

import modlens
from modlens.nn import ModelTraceError, NetworkAdapter, UnsupportedModelError

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 5 * 5, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


def _gap_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()


def _same_capture(a: NetworkAdapter, b: NetworkAdapter) -> None:
    assert a.layer_names == b.layer_names and a.layer_sizes == b.layer_sizes
    assert a.node_layer_sizes() == b.node_layer_sizes()
    if a.is_transformer:
        ra, rb = a.residual_parts(), b.residual_parts()
        assert ra.keys() == rb.keys()
    else:
        ba, bb = a.weight_blocks(), b.weight_blocks()
        assert [(i, j) for i, j, _ in ba] == [(i, j) for i, j, _ in bb]
        for (_, _, x), (_, _, y) in zip(ba, bb):
            np.testing.assert_array_equal(x, y)


def test_plain_cnn_is_exported_at_its_first_layers_shape_without_data():
    model = _cnn()
    a = NetworkAdapter(model)
    assert a.capture_method == "export" and a.input_shape == (1, 28, 28)
    assert "first layer '0'" in a.capture_input
    x = torch.randn(6, 1, 28, 28)
    _same_capture(a, NetworkAdapter(model, x))
    p0 = modlens.partition(model, "weights/global", n_clusters=3, random_state=0)
    p1 = modlens.partition(model, "weights/global", n_clusters=3, random_state=0, example=x)
    for l0, l1 in zip(p0.labels, p1.labels):
        np.testing.assert_array_equal(l0, l1)
    # the activations recorded through the no-data capture are the model's own
    torch.testing.assert_close(a.values([0])(x), model[1](model[0](x)))


def test_input_shape_and_example_are_used_when_given():
    model = _gap_cnn()
    a = NetworkAdapter(model, input_shape=(3, 20, 20))
    assert a.capture_method == "export" and a.input_shape == (3, 20, 20) and a.capture_input == "input_shape=(3, 20, 20)"
    p = modlens.partition(model, "weights/global", n_clusters=2, input_shape=(3, 20, 20))
    assert [len(l) for l in p.labels] == [6, 5]
    with pytest.raises(ValueError, match="input_shape must be a tuple of positive ints"):
        NetworkAdapter(model, input_shape=(3, -1, 20))
    with pytest.raises(ValueError, match="not both"):
        modlens.partition(model, "weights/global", n_clusters=2, data=torch.randn(4, 3, 8, 8), example=torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(2, 2, 20, 20\)"):
        NetworkAdapter(model, input_shape=(2, 20, 20))


def test_guessed_shape_accepts_other_data_only_where_the_graph_computes_the_model():
    model = _gap_cnn()
    a = NetworkAdapter(model)
    assert a.input_shape == (3, 32, 32)
    x = torch.randn(5, 3, 20, 20)
    z, = a.record(iter([x]), layers=[1], reduce=None, as_numpy=False)
    torch.testing.assert_close(z, model[2](model[1](model[0](x))))

    class ShapeScaled(nn.Module):  # export bakes x.shape[-1] into the graph as a constant
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x) * x.shape[-1]).mean((2, 3)))

    a = NetworkAdapter(ShapeScaled())
    a.check_input(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"captured without data at \(batch, 3, 32, 32\).*input_shape=\(3, 20, 20\)"):
        a.check_input(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="do not match the shape the model was captured for"):
        NetworkAdapter(_gap_cnn(), torch.randn(4, 3, 32, 32)).check_input(torch.randn(2, 3, 20, 20))


class Picky(nn.Module):
    """Takes 13 x 13 images only and checks it in Python: no candidate shape fits and fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[-1] != 13:
            raise ValueError("13 x 13 only")
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)))


def test_model_with_no_shape_gets_one_line_asking_for_input_shape():
    with pytest.raises(ModelTraceError) as info:
        modlens.partition(Picky(), "weights/global", n_clusters=2)
    msg = str(info.value)
    assert "\n" not in msg and "pass input_shape=" in msg and "Picky" in msg
    assert "first layer 'conv'" in msg          # what was tried
    with pytest.raises(ModelTraceError, match="pass input_shape="):
        NetworkAdapter(Picky(), capture="export")
    p = modlens.partition(Picky(), "weights/global", n_clusters=2, input_shape=(3, 13, 13))
    assert [len(l) for l in p.labels] == [4, 4]


def test_fx_is_an_explicit_choice_and_a_named_last_resort():
    model = _gap_cnn()
    a = NetworkAdapter(model, capture="fx")
    assert a.capture_method == "fx" and a.input_shape is None
    _same_capture(a, NetworkAdapter(model))
    with pytest.raises(ValueError, match="capture must be one of"):
        NetworkAdapter(model, capture="trace")

    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Odd(nn.Module):  # 7 x 7 only (no candidate size) and an op modlens does not follow
        def __init__(self):
            super().__init__()
            self.conv, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4 * 25, 2)

        def forward(self, x):
            h = torch.cumsum(self.conv(x), 1)
            return self.fc(self.conv2(h).flatten(1))

    with pytest.raises(UnsupportedModelError) as info:
        NetworkAdapter(Odd())
    msg = str(info.value)
    assert "cumsum" in msg and "captured with torch.fx, the last resort" in msg and "pass input_shape=" in msg
    assert "\n" not in msg


def test_token_model_with_an_embedding_gets_token_ids():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.out = nn.Embedding(50, 8), nn.Linear(8, 6), nn.Linear(6, 3)

        def forward(self, ids):
            return self.out(torch.relu(self.fc(self.emb(ids).mean(1))))

    a = NetworkAdapter(Tokens())
    assert a.capture_method == "export" and a.input_shape == (16,) and "Embedding" in a.capture_input
    b = NetworkAdapter(Tokens(), input_shape=(5,))
    assert b.input_shape == (5,) and a.layer_names == b.layer_names == ["fc"]



def test_model_reading_a_sequence_of_vectors_gets_one_at_its_first_linear_width():
    """A first Linear over the last dimension of (T, d) inputs (Wav2Vec2-BERT's audio features): after
    (d,) fails, the model is exported at 16 positions of d features."""
    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(10, 6), nn.Linear(6, 3)

        def forward(self, x):
            if x.dim() != 3:
                raise ValueError("frames (B, T, 10) only")
            return self.out(torch.relu(self.fc(x)).mean(1))

    model = Frames().eval()
    a = NetworkAdapter(model)
    assert a.capture_method == "export" and a.input_shape == (16, 10) and "16 positions" in a.capture_input
    assert a.layer_names == ["fc"]
    _same_capture(a, NetworkAdapter(model, torch.randn(4, 7, 10)))


transformers = pytest.importorskip("transformers")


def _hf(family: str):
    t = transformers
    torch.manual_seed(0)
    if family == "vit":
        cfg = t.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=24, num_labels=3)
        return t.ViTForImageClassification(cfg).eval()
    if family == "convnext":
        cfg = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=32)
        return t.ConvNextForImageClassification(cfg).eval()
    if family == "bert":
        cfg = t.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, max_position_embeddings=32, num_labels=3)
        return t.BertForSequenceClassification(cfg).eval()
    if family == "perceiver":   # an image classifier whose input is called 'inputs', not 'pixel_values'
        cfg = t.PerceiverConfig(num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                                num_self_attention_heads=2, num_cross_attention_heads=1, image_size=8, num_labels=3)
        return t.PerceiverForImageClassificationFourier(cfg).eval()
    raise AssertionError(family)


@pytest.mark.parametrize("family, shape, name", [("vit", (3, 16, 16), "pixel_values"),
                                                 ("perceiver", (3, 8, 8), "inputs"),
                                                 ("convnext", (3, 32, 32), "pixel_values"),
                                                 ("bert", (16,), "input_ids")])
def test_hugging_face_models_partition_without_data(family, shape, name):
    model = _hf(family)
    a = NetworkAdapter(model)
    assert a.capture_method == "export" and a.input_shape == shape and a.input_name == name
    assert "config" in a.capture_input
    if family == "bert":  # input_shape of a token model: token ids below the vocabulary, as input_ids
        b = NetworkAdapter(model, input_shape=(8,))
        assert b.input_shape == (8,) and b.input_name == "input_ids" and b.layer_names == a.layer_names
        g = torch.Generator().manual_seed(3)
        x = torch.randint(5, 60, (4, 16), generator=g)
    else:
        x = torch.randn(4, *shape)
    with_data = NetworkAdapter(model, x, input_name=name)
    _same_capture(a, with_data)
    p0 = modlens.partition(model, "weights/global", n_clusters=2, random_state=0)
    p1 = modlens.partition(model, "weights/global", n_clusters=2, random_state=0, example=x, input_name=name)
    assert p0.layer_names == p1.layer_names
    for l0, l1 in zip(p0.labels, p1.labels):
        np.testing.assert_array_equal(l0, l1)


def test_speech_model_gets_raw_audio_of_the_length_its_feature_extractor_needs():
    """A Hugging Face speech model (``input_values``: raw samples) is exported at the shortest length its
    strided convolutions turn into 16 frames: (16 - 1) * 2 + 3 = 33, then (33 - 1) * 5 + 10 = 170."""
    t = pytest.importorskip("transformers")
    cfg = t.Data2VecAudioConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                                num_conv_pos_embedding_groups=2, num_labels=3)
    torch.manual_seed(0)
    model = t.Data2VecAudioForSequenceClassification(cfg).eval()
    a = NetworkAdapter(model)
    assert a.capture_method == "export" and a.input_shape == (170,) and a.input_name == "input_values"
    assert "conv_kernel" in a.capture_input and a.layer_sizes == [32, 32]
    with torch.no_grad():
        frames = model.data2vec_audio.feature_extractor(torch.randn(1, 170))
    assert frames.shape[-1] == 16
    x = torch.randn(4, 170)
    _same_capture(a, NetworkAdapter(model, x, input_name="input_values"))


class _MHABlock(nn.Module):
    def __init__(self, d=16, h=2, f=24):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MHAViT(nn.Module):
    """torchvision's ViT in miniature: a patch conv, nn.MultiheadAttention blocks, an image_size attribute."""

    def __init__(self, d=16):
        super().__init__()
        self.image_size = 16
        self.proj = nn.Conv2d(3, d, 8, 8)
        self.blocks = nn.Sequential(_MHABlock(d), _MHABlock(d))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.head(self.ln(self.blocks(x)).mean(1))


def test_multihead_attention_as_export_decomposes_it():
    from modlens.nn.lesion import IncrementalLesions, correct_counts_plain

    torch.manual_seed(0)
    model = MHAViT().double().eval()
    a = NetworkAdapter(model)
    assert a.capture_method == "export" and a.input_shape == (3, 16, 16) and a.capture_input == "its image_size 16"
    assert a.is_transformer and a.layer_names == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    x = torch.randn(30, 3, 16, 16, dtype=torch.float64)
    _same_capture(a, NetworkAdapter(model, x))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = 0
    ev = IncrementalLesions(a, x, y)
    for layer in range(2):
        sets = [[0], [1, 2, 3], list(range(12))]
        np.testing.assert_array_equal(ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, x, y))


def test_vision_language_model_gets_token_ids_from_its_text_config():
    """Gemma-3's config keeps the vocabulary in ``text_config``; without data the model is exported at token ids."""
    t = pytest.importorskip("transformers")
    tc = t.Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
                            sliding_window=8)
    vc = t.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    cfg = t.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4, num_labels=3)
    torch.manual_seed(0)
    model = t.Gemma3ForSequenceClassification(cfg).eval()
    a = NetworkAdapter(model)
    assert a.capture_method == "export" and a.input_shape == (16,) and a.input_name == "input_ids"
    assert "vocab_size 64" in a.capture_input and a.layer_sizes == [24, 24]
