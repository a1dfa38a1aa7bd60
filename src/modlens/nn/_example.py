"""An example input for capture when no data is given (a weight partition needs none).

``torch.export`` specializes a model at the shape of one example input, so capture without data
needs a shape. :func:`example_input` takes it, in this order, from

1. ``input_shape=`` (the shape of one input, without the batch dimension) passed by the user;
2. what the model says about itself:

   * a Hugging Face model's config: ``(num_channels, image_size, image_size)`` for an image model
     (``main_input_name == "pixel_values"``), ``(T,)`` token ids below ``config.vocab_size`` for a
     token model (``main_input_name == "input_ids"``, ``T`` = :data:`TOKEN_LENGTH` or the
     position limit; a vision-language model's text config), passed as that keyword; ``(L,)`` raw audio samples for a speech model
     (``main_input_name == "input_values"``), ``L`` the shortest length that its feature
     extractor's convolutions (``conv_kernel``, ``conv_stride``) turn into :data:`AUDIO_FRAMES` frames;
   * the image size the model was built for: an ``image_size`` or ``img_size`` attribute of the
     model or of its patch embedding (torchvision's ViT, timm's ``PatchEmbed``);
   * timm's ``pretrained_cfg["input_size"]`` (or ``default_cfg``);
   * its first layer: ``(in_features,)``, else ``(T, in_features)`` (a sequence of vectors: Wav2Vec2-BERT's
     audio features) for an ``nn.Linear``, ``(in_channels, S, S)`` for an
     ``nn.Conv2d`` and ``(in_channels, L)`` for an ``nn.Conv1d`` at the first of a few sizes it
     accepts (:data:`PROBE_SIZES`), token ids for an ``nn.Embedding``.

Each candidate is checked by running the model on it (eval mode, no gradients) and the first
one the model accepts is used. Values are drawn from a fixed generator: Gaussian images, token
ids that avoid the config's special tokens. The weight graph does not depend on the values, nor,
for the layers modlens analyses, on the spatial size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TOKEN_LENGTH = 16
PROBE_SIZES = (32, 28, 64, 224, 16)
SEQUENCE_LENGTHS = (64, 128, 256, 32, 16)
AUDIO_FRAMES = 16
_BATCH = 2


@dataclass(frozen=True)
class ExampleInput:
    """A batch of :data:`_BATCH` inputs, the keyword to pass it as, and where its shape came from."""

    x: torch.Tensor
    input_name: str | None
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclass(frozen=True)
class _Candidate:
    shape: tuple[int, ...]
    tokens: int | None       # vocabulary size for token ids, None for float inputs
    input_name: str | None
    source: str
    basis: str = ""          # the source without the size tried (for the error listing what was tried)

    def __post_init__(self):
        if not self.basis:
            object.__setattr__(self, "basis", self.source)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _special_ids(model: nn.Module) -> set[int]:
    config = getattr(model, "config", None)
    ids = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                "unk_token_id", "mask_token_id", "decoder_start_token_id"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(i for i in v if isinstance(i, int))
    return ids


def _make(model: nn.Module, c: _Candidate, device, dtype) -> torch.Tensor:
    g = _generator()
    if c.tokens is None:
        return torch.randn((_BATCH, *c.shape), generator=g).to(device=device, dtype=dtype)
    special = sorted(i for i in _special_ids(model) if 0 <= i < c.tokens)
    allowed = torch.tensor([i for i in range(min(c.tokens, 4096)) if i not in special] or [0])
    ids = allowed[torch.randint(len(allowed), (_BATCH, *c.shape), generator=g)]
    config = getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    if getattr(config, "is_encoder_decoder", False) and isinstance(eos, int) and 0 <= eos < c.tokens and ids.dim() == 2:
        ids[:, -1] = eos    # BART/T5-style classifiers read the state at each sequence's (last) end token
    return ids.to(device=device)


def _pair(v) -> tuple[int, int] | None:
    if isinstance(v, int) and v > 0:
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            return name, m
    return None


def _channels(model: nn.Module) -> int:
    first = _first_layer(model)
    if first is not None and isinstance(first[1], nn.Conv2d):
        return first[1].in_channels
    return int(getattr(model, "in_chans", 3) or 3)


def _token_length(config) -> int:
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "max_seq_len")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    return min([TOKEN_LENGTH, *limits])


def _config_candidates(model: nn.Module) -> list[_Candidate]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    main = getattr(model, "main_input_name", None)
    out = []
    # an image model's input is pixel_values, or has another name in an image classifier (Perceiver's inputs)
    if main == "pixel_values" or (main not in ("input_ids", "input_values") and "Image" in type(model).__name__):
        size = _pair(getattr(config, "image_size", None))
        channels = getattr(config, "num_channels", None)
        if size is not None:
            c = int(channels) if isinstance(channels, int) and channels > 0 else 3
            out.append(_Candidate((c, *size), None, main, f"the config's image_size {size[0]}"
                                  f"{'' if size[0] == size[1] else 'x' + str(size[1])} and num_channels {c}"))
    elif main == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if vocab is None and callable(getattr(config, "get_text_config", None)):   # a vision-language model
            config = config.get_text_config()
            vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            n = _token_length(config)
            out.append(_Candidate((n,), vocab, main, f"the config's vocab_size {vocab}, {n} tokens"))
    elif main == "input_values":
        n = _audio_length(getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None))
        if n is not None:
            out.append(_Candidate((n,), None, main, f"the config's conv_kernel and conv_stride, {n} audio samples "
                                  f"({AUDIO_FRAMES} frames)"))
    return out


def _audio_length(kernels, strides, frames: int = AUDIO_FRAMES) -> int | None:
    """The shortest input length that convolutions with these kernels and strides (no padding) turn into
    ``frames`` outputs: each layer's input length is ``(out - 1) * stride + kernel``."""
    if not isinstance(kernels, (list, tuple)) or not isinstance(strides, (list, tuple)) or \
            len(kernels) != len(strides) or not kernels:
        return None
    n = frames
    for k, st in zip(reversed(kernels), reversed(strides)):
        n = (n - 1) * int(st) + int(k)
    return n


def _size_candidates(model: nn.Module) -> list[_Candidate]:
    out = []
    owners = [("model", model)]
    patch = getattr(model, "patch_embed", None)
    if isinstance(patch, nn.Module):
        owners.append(("patch_embed", patch))
    for owner, m in owners:
        for attr in ("image_size", "img_size"):
            size = _pair(getattr(m, attr, None))
            if size is not None:
                where = attr if owner == "model" else f"{owner}.{attr}"
                out.append(_Candidate((_channels(model), *size), None, None, f"its {where} {size[0]}"))
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        shape = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(shape, (tuple, list)) and len(shape) == 3 and all(isinstance(i, int) and i > 0 for i in shape):
            out.append(_Candidate(tuple(shape), None, None, f"its {attr}['input_size'] {tuple(shape)}"))
    return out


def _layer_candidates(model: nn.Module) -> list[_Candidate]:
    first = _first_layer(model)
    if first is None:
        return []
    name, m = first
    what = f"its first layer '{name}' ({type(m).__name__}"
    if isinstance(m, nn.Linear):   # one vector, or a sequence of them (frames of audio features, tokens)
        basis = f"{what}, {m.in_features} inputs)"
        return [_Candidate((m.in_features,), None, None, basis),
                _Candidate((TOKEN_LENGTH, m.in_features), None, None, f"{basis} at {TOKEN_LENGTH} positions", basis)]
    if isinstance(m, nn.Conv2d):
        basis = f"{what}, {m.in_channels} channels)"
        return [_Candidate((m.in_channels, s, s), None, None, f"{basis} at {s}x{s}", basis) for s in PROBE_SIZES]
    if isinstance(m, nn.Conv1d):
        basis = f"{what}, {m.in_channels} channels)"
        return [_Candidate((m.in_channels, n), None, None, f"{basis} at length {n}", basis) for n in SEQUENCE_LENGTHS]
    basis = f"{what}, {m.num_embeddings} tokens)"
    return [_Candidate((n,), m.num_embeddings, None, f"{basis}, {n} tokens", basis) for n in (TOKEN_LENGTH, 8, 4)]


def _candidates(model: nn.Module) -> list[_Candidate]:
    seen, out = set(), []
    for c in _config_candidates(model) + _size_candidates(model) + _layer_candidates(model):
        key = (c.shape, c.tokens, c.input_name)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def explicit_input(model: nn.Module, input_shape, *, device=None, dtype=None,
                   input_name: str | None = None) -> ExampleInput:
    """An example batch of the user's ``input_shape`` (one input, no batch dimension): token ids
    when the model reads them first (a Hugging Face ``input_ids`` model, or an ``nn.Embedding``
    as its first layer), Gaussian values otherwise."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a tuple of positive ints (one input, no batch dimension), "
                         f"got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints (one input, no batch dimension), got {input_shape!r}")
    vocab = None
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) == "input_ids" and isinstance(getattr(config, "vocab_size", None), int):
        vocab = config.vocab_size
        input_name = input_name or "input_ids"
    else:
        first = _first_layer(model)
        if first is not None and isinstance(first[1], nn.Embedding):
            vocab = first[1].num_embeddings
    c = _Candidate(shape, vocab, input_name, f"input_shape={shape}")
    return ExampleInput(_make(model, c, device, dtype), c.input_name, c.source)


def example_input(model: nn.Module, runs, *, device=None, dtype=None, input_name: str | None = None):
    """``(ExampleInput or None, tried)``: the first candidate shape (module docstring) on which
    ``runs(x, input_name)`` returns True, and the descriptions of the candidates tried."""
    tried = []
    main = getattr(model, "main_input_name", None) if hasattr(getattr(model, "config", None), "to_dict") else None
    for c in _candidates(model):
        # a Hugging Face model takes its main input by name (pixel_values, input_ids) whatever gave the shape
        name = input_name or c.input_name or (main if main in ("pixel_values", "input_ids") else None)
        x = _make(model, c, device, dtype)
        if runs(x, name):
            return ExampleInput(x, name, c.source), tried
        tried.append((c.basis, c.shape))
    return None, _group(tried)


def _group(tried) -> list[str]:
    """'basis at shape, shape' per basis, in order."""
    by: dict[str, list] = {}
    for basis, shape in tried:
        by.setdefault(basis, []).append(str(shape))
    return [f"{basis} at {', '.join(shapes)}" for basis, shapes in by.items()]


__all__ = ["ExampleInput", "example_input", "explicit_input", "TOKEN_LENGTH", "PROBE_SIZES"]
