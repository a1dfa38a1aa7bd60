"""Zoo coverage census (issue 20): which timm, torchvision and Hugging Face classifiers modlens runs.

    PYTHONPATH=src python benchmarks/zoo.py                          # all three zoos (long: run it in the background)
    PYTHONPATH=src python benchmarks/zoo.py --zoo timm --limit 5     # the first five timm families
    PYTHONPATH=src python benchmarks/zoo.py --only resnet18 --only ViTForImageClassification
    PYTHONPATH=src python benchmarks/zoo.py --list --zoo hf          # what would run, nothing run
    PYTHONPATH=src python benchmarks/zoo.py --report-only            # rewrite docs/coverage.md from the results
    PYTHONPATH=src python benchmarks/zoo.py --merge a.json --merge b.json  # join runs of several sittings

Needs ``timm``, ``torchvision`` and ``transformers`` (torch 2.14.1 with torchvision 0.29.1: torch
2.13.0's CPU build cannot load torchvision 0.28's operators). Nothing is downloaded: every model has
random weights (timm ``pretrained=False``, torchvision ``weights=None``, Hugging Face models built
from a reduced config).

Which models:

* **timm**: one model per family, a family being the timm module that registers the model
  (``timm.list_modules()``); the representative is the family's model with the fewest parameters,
  counted on the meta device (cached in ``benchmarks/results/zoo_timm_params.json``).
* **torchvision**: every classification model (``torchvision.models.list_models(module=torchvision.models)``).
* **Hugging Face**: every ``*ForImageClassification*`` and ``*ForSequenceClassification`` class
  of ``transformers``, built from its config class with reduced sizes (2 layers, 4 heads of
  width 8, stage widths divided by 16, 256-token vocabulary, ...; see :func:`shrink_config`).

Normalization scales that a model initialises to exactly zero (zero-initialised residual branches)
are set to one before the stages, as training would move them off zero; otherwise the weight graph
of an untrained EfficientViT-M or SHViT has no edge at all. Each record counts them
(``zero_scales``).

Every model gets 10 classes (``num_classes``/``num_labels``) and the smallest input it accepts
among a few candidate sizes (32 x 32 first; ``img_size=``/``image_size=`` where the model takes
it, so ViT-like models keep their architecture with fewer patches). Data: 8 random test inputs
(labels: the model's own predictions) and 8 held-out inputs, Gaussian images, random token ids
(no special tokens except an end-of-sequence token where an encoder-decoder classifier needs
one) or random audio.

Stages, each timed and recorded with its one-line outcome (exception type and first line):

1. ``nodata``: ``modlens.partition(model, "weights/global", n_clusters=4)`` without data (the
   README's first call);
2. ``capture``: ``NetworkAdapter(model, held_out)`` (``torch.export`` at the data's shape): neuron
   layers and neurons;
3. ``weights``, ``activations``: ``weights/global`` and ``activations/global`` partitions of that
   adapter (k = 4);
4. ``lesions``: ``modlens.analyze(adapter, (x, y), activation_data=held_out, partition=...,
   n_random=2)`` with a random partition of every neuron layer into 2 halves, so that a lesion of
   every layer is evaluated.

Verdict: ``unbuildable`` (the model cannot be built or run on its own), ``analyze-fails`` (any of
stages 2-4 fails), ``partition-fails`` (2-4 run, 1 fails), ``ok``. Each model runs in a worker
process with a time limit (``--timeout``); a worker that hangs or dies is replaced and the model
recorded as failed in the stage it was in (each stage has ``--timeout`` seconds and each model
``--budget``; a stage that later stages do not need is skipped in a second try). Results are written after every model to
``benchmarks/results/zoo.json`` (``--resume`` skips the models already there), and
``docs/coverage.md`` is generated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "zoo.json"
TIMM_PARAMS = ROOT / "benchmarks" / "results" / "zoo_timm_params.json"
DOC = ROOT / "docs" / "coverage.md"
ZOOS = ("timm", "torchvision", "hf")
ZOO_TITLES = {"timm": "timm", "torchvision": "torchvision", "hf": "Hugging Face transformers"}
SIZES = (32, 28, 64, 56, 96, 112, 128, 160, 192, 224, 256, 299, 384)
N_CLASSES = 10
N_SAMPLES = 8
#: The limits of the census runs (``--timeout``, ``--budget``, ``--memory-gb``); rows run with more are listed
#: as such in the report.
CENSUS_LIMITS = {"timeout": 480.0, "budget": 1440.0, "memory_gb": 10.0}
K = 4
STAGES = ("build", "nodata", "capture", "weights", "activations", "lesions")
DATA_STAGES = ("capture", "weights", "activations", "lesions")


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line``, at most ``limit`` characters; when capture fell back to torch.fx, the
    reason torch.export failed first (the end of the message) is kept."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(line) <= limit:
        return line
    m = re.search(r" \(torch\.export failed first: .*$", line)
    if m:
        tail = m.group(0)[:limit // 2]
        return line[: limit - len(tail) - 3] + "..." + tail
    return line[: limit - 3] + "..."


def _where(exc: BaseException) -> str:
    """The innermost frame of the traceback (file:line function), for errors that are not refusals."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    path = f.filename
    for marker in ("site-packages/", "src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{f.lineno} {f.name}"


# =============================================================================================
# enumeration (parent process)
# =============================================================================================
def timm_params(families: list[str], refresh: bool = False) -> dict:
    """{model: parameter count or "error ..."} for every model of ``families``, counted on the
    meta device (no memory, no initialization), cached in TIMM_PARAMS."""
    import timm
    import torch

    cache = {} if refresh or not TIMM_PARAMS.exists() else json.loads(TIMM_PARAMS.read_text())
    changed = False
    for fam in families:
        for name in timm.list_models(module=fam):
            if name in cache:
                continue
            try:
                with torch.device("meta"):
                    m = timm.create_model(name, pretrained=False)
                cache[name] = int(sum(p.numel() for p in m.parameters()))
            except Exception as exc:  # noqa: BLE001 - recorded, the model is not chosen
                cache[name] = "error " + one_line(exc, 200)
            changed = True
    if changed:
        TIMM_PARAMS.parent.mkdir(parents=True, exist_ok=True)
        TIMM_PARAMS.write_text(json.dumps(dict(sorted(cache.items())), indent=0) + "\n")
    return cache


def timm_jobs(only_family=None) -> list[dict]:
    import timm

    families = sorted(timm.list_modules())
    if only_family is not None:
        families = [f for f in families if only_family(f)]
    params = timm_params(families)
    jobs = []
    for fam in families:
        counted = [(params[n], n) for n in timm.list_models(module=fam) if isinstance(params.get(n), int)]
        if counted:
            n_params, name = min(counted)
            jobs.append({"zoo": "timm", "family": fam, "name": name, "params": n_params})
        else:
            names = timm.list_models(module=fam)
            jobs.append({"zoo": "timm", "family": fam, "name": names[0] if names else fam, "params": None,
                         "build_error": params.get(names[0], "no model") if names else "no model"})
    return jobs


def timm_jobs_for(only: list[str]) -> list[dict]:
    """Every family's representative, or with ``only``: the families named and the models named
    (a model named explicitly runs instead of its family's smallest)."""
    import timm

    if not only:
        return timm_jobs()
    families = set(timm.list_modules())
    wanted = {o.lower() for o in only}
    jobs = timm_jobs(lambda f: f.lower() in wanted)
    for name in only:
        if name in timm.list_models():
            fam = next(f for f in families if name in timm.list_models(module=f))
            jobs.append({"zoo": "timm", "family": fam, "name": name})
    return jobs


def torchvision_jobs() -> list[dict]:
    import torchvision.models as tvm

    jobs = []
    for name in tvm.list_models(module=tvm):
        module = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        jobs.append({"zoo": "torchvision", "family": module, "name": name})
    return jobs


def hf_class_names() -> list[str]:
    import transformers

    names = []
    for n in dir(transformers):
        if n.startswith(("TF", "Flax", "Auto")):
            continue
        if "ForImageClassification" in n or n.endswith("ForSequenceClassification"):
            names.append(n)
    return sorted(names)


def hf_jobs() -> list[dict]:
    import transformers

    jobs = []
    for n in hf_class_names():
        try:
            cls = getattr(transformers, n)
            family = getattr(cls.config_class, "model_type", "") or n
        except Exception as exc:  # noqa: BLE001 - an import error of an optional dependency
            jobs.append({"zoo": "hf", "family": n, "name": n, "build_error": one_line(exc)})
            continue
        kind = "image" if "ImageClassification" in n else "sequence"
        jobs.append({"zoo": "hf", "family": family, "name": n, "kind": kind})
    return jobs


def all_jobs(zoos, only: list[str], limit: int | None) -> list[dict]:
    def match(*fields):
        return not only or any(o == f or o.lower() == f.lower() for o in only for f in fields if f)

    jobs = []
    for zoo in zoos:
        if zoo == "timm":
            zj = timm_jobs_for(only)
        elif zoo == "torchvision":
            zj = torchvision_jobs()
        else:
            zj = hf_jobs()
        if only and zoo != "timm":
            zj = [j for j in zj if match(j["name"], j["family"])]
        if limit is not None:
            zj = zj[:limit]
        jobs.extend(zj)
    return jobs


# =============================================================================================
# building models (worker process)
# =============================================================================================
class Unbuildable(Exception):
    """The model cannot be built or run by itself (nothing to do with modlens)."""


def _forward_ok(model, x, input_name=None) -> None:
    import torch

    from modlens.nn._capture import CaptureWrapper

    with torch.no_grad():
        out = CaptureWrapper(model, input_name)(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise Unbuildable(f"the forward does not return (batch, classes) logits: {type(out).__name__} "
                          f"{tuple(getattr(out, 'shape', ()))}")


def _smallest(build, sizes, make_input, input_name=None):
    """(model, size, input) for the first size in ``sizes`` at which ``build(size)`` builds and runs."""
    errors = []
    model = None
    for size in sizes:
        try:
            model = build(size)
            model.eval()
            x = make_input(size)
            _forward_ok(model, x, input_name)
            return model, size, x
        except Exception as exc:  # noqa: BLE001 - try the next size
            errors.append(f"{size}: {one_line(exc, 200)}")
    raise Unbuildable("no candidate input size runs; " + " | ".join(errors[:1] + errors[-1:]))


def _image(channels=3):
    import torch

    def make(size):
        g = torch.Generator().manual_seed(size)
        return torch.randn(2, channels, size, size, generator=g)
    return make


def build_timm(job):
    import timm
    import torch

    name = job["name"]
    cfg = timm.get_pretrained_cfg(name)
    default = int((getattr(cfg, "input_size", None) or (3, 224, 224))[-1]) if cfg is not None else 224
    channels = int((getattr(cfg, "input_size", None) or (3, 224, 224))[0]) if cfg is not None else 3
    sizes = [s for s in SIZES if s < default] + [default]

    takes_img_size = True

    def build(size):
        nonlocal takes_img_size
        torch.manual_seed(0)
        if takes_img_size:
            try:
                return timm.create_model(name, pretrained=False, num_classes=N_CLASSES, img_size=size)
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
                takes_img_size = False
        return timm.create_model(name, pretrained=False, num_classes=N_CLASSES)

    model, size, _ = _smallest(build, sizes, _image(channels))
    extra = {"img_size": size} if takes_img_size else {}
    return model, None, (channels, size, size), "float", extra


def build_torchvision(job):
    import torch
    import torchvision.models as tvm

    name = job["name"]
    kw = {}
    if name.startswith("vit_"):
        kw = {"image_size": None}
    elif name.startswith("maxvit"):
        kw = {"input_size": None}

    def build(size):
        torch.manual_seed(0)
        extra = {k: (size if k == "image_size" else (size, size)) for k in kw}
        return tvm.get_model(name, weights=None, num_classes=N_CLASSES, **extra)

    model, size, _ = _smallest(build, list(SIZES[:-1]), _image(3))
    return model, None, (3, size, size), "float", {k: size for k in kw}


# ----- Hugging Face ----------------------------------------------------------------------------
LAYER_KEYS = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_encoder_layers", "num_decoder_layers",
              "encoder_layers", "decoder_layers", "num_self_attends_per_block", "num_hidden_groups_layers",
              "num_local_layers", "num_global_layers", "n_layers_per_block", "num_blocks_per_stage"}
HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
             "decoder_attention_heads", "num_self_attention_heads", "num_cross_attention_heads"}
KV_KEYS = {"num_key_value_heads", "multi_query_group_num", "num_kv_heads"}
HIDDEN_KEYS = {"hidden_size", "d_model", "n_embd", "n_embed", "dim", "d_latents", "embed_dim", "hidden_dim_model",
               "cross_attention_hidden_size"}
FFN_KEYS = {"intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "mlp_dim",
            "inner_hidden_size", "dim_feedforward", "hidden_dim", "ffn_hidden_size", "moe_intermediate_size",
            "shared_expert_intermediate_size", "decoder_hidden_size"}
HEAD_DIM_KEYS = {"head_dim", "attention_head_dim", "kv_channels", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "kv_lora_rank", "q_lora_rank", "attention_head_size", "d_kv"}
WIDTH_LIST_KEYS = {"hidden_sizes", "embed_dims", "embed_dim", "dims", "neck_hidden_sizes", "hidden_dims", "widths",
                   "embedding_dims", "stage_dims", "stem_channels", "stage_in_channels", "stage_out_channels",
                   "stage_mid_channels", "out_channels", "channels", "stage_channels", "hidden_channels"}
DEPTH_LIST_KEYS = {"depths", "block_sizes", "num_blocks", "stage_num_blocks", "layer_depths", "depth",
                   "stage_numbers_of_layers", "num_layers_per_stage"}
HEAD_LIST_KEYS = {"num_heads", "num_attention_heads", "num_heads_per_stage", "heads", "key_dim"}
EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
              "mask_token_id", "decoder_start_token_id", "eot_token_id")
VOCAB = 256
HEADS = 4
HEAD_WIDTH = 8


def _round(v: int, to: int = 16) -> int:
    return max(to, int(round(v / to)) * to)


def shrink_config(cfg, image_size: int, depth: int = 2, widths: bool = True):
    """Reduce a transformers config in place: ``depth`` layers, 4 experts (2 per token), stage
    depths <= 2, 256-token vocabulary (special token ids moved into it), images of
    ``image_size``; with ``widths`` also 4 heads of width 8 (hidden 32), MLP width 64, stage
    widths / 16 (multiples of 16) and 2 heads per stage. Nested configs alike."""
    import transformers

    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    get = lambda k: getattr(cfg, k, None)  # noqa: E731
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731

    def put(k, v):
        try:
            setattr(cfg, k, v)
        except Exception:  # noqa: BLE001 - read-only properties
            pass

    old_hidden = get("hidden_size")
    heads = None
    if widths:
        for k in HEAD_KEYS:
            v = get(k)
            if is_int(v) and v > 0:
                heads = min(v, HEADS)
                put(k, heads)
        for k in KV_KEYS:
            v = get(k)
            if is_int(v) and v > 0:
                put(k, heads if heads and v >= heads else 1)
            elif v is None and k in d and heads:
                put(k, heads)
        hidden = (heads or HEADS) * HEAD_WIDTH
        for k in HIDDEN_KEYS | {"pooler_hidden_size"}:
            v = get(k)
            if is_int(v) and v > hidden:
                put(k, hidden)
        for k in FFN_KEYS:
            v = get(k)
            if is_int(v) and v > 2 * hidden:
                put(k, 2 * hidden)
        for k in HEAD_DIM_KEYS | {"rotary_dim"}:
            v = get(k)
            if is_int(v) and v > HEAD_WIDTH:
                put(k, HEAD_WIDTH)
        rope = get("rope_parameters")
        if (isinstance(rope, dict) and rope.get("partial_rotary_factor") and is_int(get("qk_nope_head_dim"))
                and is_int(get("qk_rope_head_dim")) and "qk_head_dim" in d):  # MLA whose rotary part is a fraction
            put("qk_head_dim", get("qk_nope_head_dim") + get("qk_rope_head_dim"))
            put("head_dim", get("qk_head_dim"))
        if "head_dim" in d and get("head_dim") is None and heads:
            put("head_dim", hidden // heads)
        v = get("embedding_size")
        if is_int(v) and v > 16:
            put("embedding_size", hidden if v == old_hidden else 16)
        for k in HEAD_LIST_KEYS:
            v = get(k)
            if isinstance(v, (list, tuple)) and v and all(is_int(i) for i in v):
                put(k, [min(i, 2) for i in v])
        for k in WIDTH_LIST_KEYS:
            v = get(k)
            if isinstance(v, (list, tuple)) and v and all(is_int(i) for i in v):
                put(k, [_round(i / 16) for i in v])
            elif is_int(v) and k in ("embed_dim", "stem_channels") and v > 16:
                put(k, _round(v / 16))
        if is_int(get("groups_width")):
            put("groups_width", 8)
        if is_int(get("num_groups")) and get("num_groups") > 8:
            put("num_groups", 8)
        for k in ("depth_multiplier", "width_multiplier", "width_coefficient", "width_factor"):
            v = get(k)
            if isinstance(v, float) and v > 0.25:
                put(k, 0.25)
        if is_int(get("num_latents")) and get("num_latents") > 8:
            put("num_latents", 8)
        for k in ("entity_vocab_size", "entity_emb_size"):
            if is_int(get(k)) and get(k) > 16:
                put(k, 16)
    aliases = getattr(type(cfg), "attribute_map", {}) or {}
    for k in LAYER_KEYS:
        v = get(k)
        if "stage" in aliases.get(k, ""):  # ConvNeXt's num_hidden_layers is its number of stages
            continue
        if is_int(v) and v > depth:
            put(k, depth)
    n_layers = get("num_hidden_layers")
    if is_int(n_layers):
        for k in ("layer_types", "layers_block_type", "mlp_layer_types", "attn_type_list", "layer_type_list"):
            v = get(k)
            if isinstance(v, (list, tuple)) and len(v) > n_layers:
                kinds = list(dict.fromkeys(v))  # every kind of layer at least once
                keep = list(v[:n_layers]) if set(v[:n_layers]) == set(kinds) else kinds
                put(k, keep)
                if len(keep) > n_layers:
                    put("num_hidden_layers", len(keep))
    for k in EXPERT_KEYS:
        v = get(k)
        if is_int(v) and v > 4:
            put(k, 4)
    if is_int(get("num_experts_per_tok")) and get("num_experts_per_tok") > 2:
        put("num_experts_per_tok", 2)
    if "num_experts_per_tok" in d and get("num_experts_per_tok") is None:
        put("num_experts_per_tok", 2)
    for k in ("n_group", "topk_group"):
        if is_int(get(k)) and get(k) > 1:
            put(k, 1)
    if isinstance(get("depth_coefficient"), float) and get("depth_coefficient") > 0.25:
        put("depth_coefficient", 0.25)
    for k in DEPTH_LIST_KEYS:
        v = get(k)
        if isinstance(v, (list, tuple)) and v and all(is_int(i) for i in v):
            put(k, [min(i, 2) for i in v])
    # vocabulary and special tokens
    v = get("vocab_size")
    if (is_int(v) and v > VOCAB) or ("vocab_size" in d and v is None):
        put("vocab_size", VOCAB)
        for i, k in enumerate(TOKEN_KEYS):
            t = get(k)
            if is_int(t) and t >= VOCAB:
                put(k, VOCAB - 1 - i)
            elif isinstance(t, (list, tuple)):
                put(k, [x if x < VOCAB else VOCAB - 1 - i for x in t])
    if "pad_token_id" in d and get("pad_token_id") is None:
        put("pad_token_id", 0)
    if get("is_encoder_decoder") and get("decoder_start_token_id") is None:
        put("decoder_start_token_id", get("pad_token_id") or 0)
    v = get("max_position_embeddings")
    if is_int(v) and v > 4096:
        put("max_position_embeddings", 4096)
    for k in ("image_size", "img_size"):
        v = get(k)
        if is_int(v):
            put(k, image_size)
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            put(k, [image_size, image_size])
    put("num_labels", N_CLASSES)
    for k in list(d):  # nested configs (vision_config, text_config, encoder, decoder, ...)
        sub = get(k)
        if isinstance(sub, transformers.PretrainedConfig) and sub is not cfg:
            shrink_config(sub, image_size, depth, widths)
    return cfg


def _hf_special(name: str, cfg):
    """Per-class adjustments that the generic reduction cannot guess."""
    t = getattr(cfg, "model_type", "")
    if t == "jamba":
        cfg.attn_layer_period, cfg.attn_layer_offset, cfg.expert_layer_period, cfg.expert_layer_offset = 2, 1, 2, 1
    if t == "funnel":
        cfg.block_sizes = [1, 1]
        cfg.block_repeats = [1, 1] if getattr(cfg, "block_repeats", None) else None
    if t == "reformer":
        cfg.axial_pos_shape = (4, 4)
        cfg.axial_pos_embds_dim = (16, 16)
        cfg.attn_layers = ["local", "lsh"]
    if t == "cvt":  # CvT indexes stage i's drop-path rates by i: stage i needs more than i blocks
        cfg.depth = [1, 2, 3]
    if t == "perceiver":  # the cross-attention reads the preprocessed inputs, of a width no head count divides
        cfg.num_cross_attention_heads = 1
    if t == "layoutlmv3" and cfg.hidden_size == 32:
        cfg.coordinate_size, cfg.shape_size = 4, 8
    return cfg


SPECIAL_INPUTS = {  # classes whose forward needs more than one input tensor
    "ShieldGemma2ForImageClassification": "needs images and a text prompt (a policy template) together",
    "Siglip2ForImageClassification": "takes images as flattened patches with pixel_attention_mask and spatial_shapes",
    "LayoutLMv2ForSequenceClassification": "needs the detectron2 visual backbone and page images",
}


def build_hf(job):
    """The class built from its reduced config (widths reduced; if that does not build or run, only
    depths reduced), its input name, per-sample input shape and kind."""
    errors = []
    for widths in (True, False):
        try:
            return _build_hf(job, widths)
        except Exception as exc:  # noqa: BLE001 - try the milder reduction, then give up
            errors.append(exc)
            if isinstance(exc, Unbuildable) and "special inputs" in str(exc):
                break
    raise errors[0]


def _build_hf(job, widths: bool):
    import torch
    import transformers

    name = job["name"]
    if name in SPECIAL_INPUTS:
        raise Unbuildable(f"special inputs: {SPECIAL_INPUTS[name]}")
    cls = getattr(transformers, name)
    config_cls = cls.config_class
    input_name = getattr(cls, "main_input_name", None) or ("pixel_values" if job.get("kind") == "image" else "input_ids")
    image = "ImageClassification" in name and input_name in ("pixel_values", "inputs")
    state = {}

    def build(size):
        try:
            cfg = config_cls()
        except Exception as exc:  # noqa: BLE001
            raise Unbuildable(f"the config class {config_cls.__name__}() cannot be built with defaults: {one_line(exc)}")
        if name.startswith("TimmWrapper"):
            cfg = config_cls(architecture="resnet18", num_labels=N_CLASSES)
        else:
            shrink_config(cfg, size, widths=widths)
            _hf_special(name, cfg)
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(cfg).parameters())
        if n > 50_000_000:
            raise Unbuildable(f"the reduced config still has {n / 1e6:.0f} M parameters")
        torch.manual_seed(0)
        m = cls(cfg)
        if hasattr(m, "set_default_language"):  # X-MOD: one language adapter per forward
            langs = list(getattr(cfg, "languages", None) or [])
            m.set_default_language(langs[0] if langs else "en_XX")
        state["cfg"] = cfg
        return m

    extra = {"reduced": "widths and depths" if widths else "depths only"}
    if image:
        def make_input(size):
            cfg = state["cfg"]
            c = getattr(cfg, "num_channels", None) or getattr(getattr(cfg, "vision_config", None), "num_channels", 3)
            return torch.randn(2, int(c), size, size, generator=torch.Generator().manual_seed(size))

        model, size, x = _smallest(build, [32, 64, 128, 224], make_input, input_name)
        return model, input_name, tuple(x.shape[1:]), "float", {**extra, "config": _cfg_summary(state["cfg"])}
    model = build(32).eval()
    cfg = state["cfg"]
    if input_name == "input_values":  # audio: 4,000 samples
        shape, kind = (4000,), "float"
    elif input_name == "input_features":  # audio features (T, feature dimension)
        feat = getattr(cfg, "feature_projection_input_dim", None) or getattr(cfg, "feature_size", 80)
        shape, kind = (64, int(feat)), "float"
    elif input_name in ("input_ids", "inputs"):
        shape, kind = (16,), "tokens"
    else:
        raise Unbuildable(f"special inputs: {name} takes '{input_name}', not images, token ids or audio")
    x = token_ids(cfg, 2, shape[0], 0) if kind == "tokens" else torch.randn(2, *shape)
    _forward_ok(model, x, input_name)
    return model, input_name, shape, kind, {**extra, "config": _cfg_summary(cfg)}


def token_ids(cfg, n: int, length: int, seed: int):
    """Random ids that avoid the special tokens; an encoder-decoder classifier's sequences end with
    its end-of-sequence token (BART-style heads read the last one)."""
    import torch

    vocab = int(getattr(cfg, "vocab_size", VOCAB) or VOCAB)
    special = set()
    for k in TOKEN_KEYS:
        v = getattr(cfg, k, None)
        special |= set(v) if isinstance(v, (list, tuple)) else {v}
    allowed = torch.tensor([i for i in range(min(vocab, VOCAB)) if i not in special and i >= 5])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (n, length), generator=g)]
    eos = getattr(cfg, "eos_token_id", None)
    if getattr(cfg, "is_encoder_decoder", False) and isinstance(eos, int):
        ids[:, -1] = eos
    return ids


def _cfg_summary(cfg) -> dict:
    out = {}
    for k in sorted(HIDDEN_KEYS | LAYER_KEYS | HEAD_KEYS | {"image_size", "vocab_size", "hidden_sizes", "depths",
                                                             "embed_dim", "intermediate_size"}):
        v = getattr(cfg, k, None)
        if isinstance(v, (int, list, tuple)) and not isinstance(v, bool):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


BUILDERS = {"timm": build_timm, "torchvision": build_torchvision, "hf": build_hf}


# =============================================================================================
# one model through modlens (worker process)
# =============================================================================================
def make_data(model, input_name, kind, shape, cfg, seed):
    import torch

    from modlens.nn._capture import CaptureWrapper

    if kind == "tokens":
        x = token_ids(cfg, N_SAMPLES, shape[0], seed)
    else:
        x = torch.randn(N_SAMPLES, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = CaptureWrapper(model.eval(), input_name)(x).argmax(-1)
    return x, y


def unzero_norm_scales(model) -> int:
    """Set to one every normalization scale that the model initialises to exactly zero, and return how
    many there were. Zero-initialised residual branches (timm ResNets' last batch norm, EfficientViT-M,
    SHViT) make the weight graph of an untrained model lose those paths, or every edge; training moves
    the scales off zero, and the census asks whether modlens runs the architecture."""
    import torch

    n = 0
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if "Norm" in type(m).__name__ and isinstance(w, torch.nn.Parameter) and w.dim() == 1 \
                    and w.numel() and not torch.any(w):
                w.fill_(1.0)
                n += 1
    return n


def run_model(job: dict, send) -> None:
    """Run the stages of one model, sending ("start", stage) and ("stage", stage, record) messages."""
    import numpy as np
    import torch

    import modlens
    from modlens.nn.adapter import NetworkAdapter

    def stage(name, fn):
        send(("start", name))
        t0 = time.perf_counter()
        try:
            value = fn()
            rec = {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            value = None
            rec = {"ok": False, "seconds": round(time.perf_counter() - t0, 2), "reason": one_line(exc),
                   "type": type(exc).__name__, "where": _where(exc)}
        send(("stage", name, rec))
        return rec, value

    if job.get("build_error"):
        send(("stage", "build", {"ok": False, "seconds": 0.0, "reason": job["build_error"], "type": "Unbuildable"}))
        return
    rec, built = stage("build", lambda: BUILDERS[job["zoo"]](job))
    if not rec["ok"]:
        return
    model, input_name, shape, kind, extra = built
    model.eval()
    zero_scales = unzero_norm_scales(model)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    x, y = make_data(model, input_name, kind, shape, cfg, 1)
    x_val, _ = make_data(model, input_name, kind, shape, cfg, 2)
    send(("info", {"params": int(n_params), "input_shape": list(shape), "input_name": input_name,
                   "build_options": extra, "zero_scales": zero_scales}))
    if job.get("build_only"):
        return

    skip = set(job.get("skip") or ())
    if "nodata" not in skip:
        stage("nodata", lambda: modlens.partition(model, "weights/global", n_clusters=K, input_name=input_name))
    rec, adapter = stage("capture", lambda: NetworkAdapter(model, x_val, input_name=input_name))
    if not rec["ok"]:
        return
    send(("info", {"neurons": int(sum(adapter.layer_sizes)), "layers": len(adapter.layer_sizes),
                   "capture_method": adapter.capture_method, "transformer": bool(adapter.is_transformer),
                   "max_layer": int(max(adapter.layer_sizes))}))
    if "weights" not in skip:
        stage("weights", lambda: modlens.partition(adapter, "weights/global", n_clusters=K, random_state=0))
    if "activations" not in skip:
        stage("activations", lambda: modlens.partition(adapter, "activations/global", n_clusters=K, data=x_val,
                                                       random_state=0))
    rng = np.random.default_rng(0)
    labels = [rng.permutation(np.arange(n) % (2 if n >= 4 else 1)) for n in adapter.layer_sizes]

    def lesions():
        res = modlens.analyze(adapter, (x, y), activation_data=x_val, partition=labels, n_random=2, random_state=0,
                              feature_vis=False)
        tested = res.subclusters
        n_layers = int(tested["layer"].nunique()) if "layer" in tested.columns else None
        send(("info", {"lesioned_layers": n_layers, "lesions": int(len(tested))}))
        return res

    stage("lesions", lesions)


def worker_main(conn, log_path: str) -> None:
    """Worker process: run jobs received on ``conn`` until it is closed."""
    import warnings

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    warnings.simplefilter("ignore")
    gb = float(os.environ.get("ZOO_MEMORY_GB", "10"))
    if gb > 0:  # a MemoryError in this process rather than the machine's OOM killer (the machine is shared)
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(gb * 2**30), int(gb * 2**30)))
    import logging

    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import modlens.experiments.partitioning  # noqa: F401 - imports are not part of the first model's time
    import modlens.analysis.analyze  # noqa: F401

    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        print(f"\n===== {job['zoo']} {job['name']} =====", flush=True)
        try:
            run_model(job, conn.send)
        except Exception as exc:  # noqa: BLE001 - a failure outside the stages (data, bookkeeping)
            conn.send(("stage", "harness", {"ok": False, "reason": one_line(exc), "type": type(exc).__name__,
                                            "where": _where(exc)}))
        conn.send(("done",))


# =============================================================================================
# the parent: workers, time limits, results
# =============================================================================================
class Pool:
    def __init__(self, log_path: str):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.log_path = log_path
        self.proc = None
        self.conn = None
        self.spare = None

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker_main, args=(child, self.log_path), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def _start(self):
        """A fresh worker for each model (a model that ran out of memory can leave oneDNN unable to
        create primitives for every later model in the same process); the next one is spawned
        while this one works, so its imports are not on the clock."""
        self.proc, self.conn = self.spare or self._spawn()
        self.spare = None
        if not (self.conn.poll(300) and self.conn.recv() == ("ready",)):
            raise RuntimeError(f"the worker did not start; see {self.log_path}")
        self.spare = self._spawn()

    @staticmethod
    def _kill(proc):
        if proc.is_alive():
            proc.kill()  # our own worker, by its handle
        proc.join(5)

    def retire(self):
        """End the current worker (the next model gets the spare)."""
        if self.proc is not None:
            self._kill(self.proc)
        self.proc = self.conn = None

    def stop(self):
        self.retire()
        if self.spare is not None:
            self._kill(self.spare[0])
        self.spare = None

    def run(self, job: dict, timeout: float, budget: float) -> dict:
        """Run ``job``, each stage within ``timeout`` seconds and the whole model within ``budget``.
        When a stage that later stages do not need (``nodata``, ``weights``, ``activations``) runs
        out of time or kills the worker, the job runs again without it and without the stages
        already recorded."""
        rec = {k: job.get(k) for k in ("zoo", "family", "name")}
        rec["stages"] = {}
        if job.get("params") is not None:
            rec["params"] = job["params"]
        t0 = time.perf_counter()
        while True:
            skip = [s for s in ("nodata", "weights", "activations") if s in rec["stages"]]
            left = budget - (time.perf_counter() - t0)
            failed = self._attempt({**job, "skip": skip}, timeout, left, rec)
            if failed in ("nodata", "weights", "activations") and budget - (time.perf_counter() - t0) > 30:
                continue
            break
        self.retire()
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        finish(rec)
        return rec

    def _attempt(self, job: dict, timeout: float, budget: float, rec: dict) -> str | None:
        """One try; returns the stage that ran out of time or crashed, if any."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(job)
        current = None
        end = time.monotonic() + budget
        deadline = min(end, time.monotonic() + timeout)
        while True:
            left = deadline - time.monotonic()
            try:
                ready = left > 0 and self.conn.poll(left)
                msg = self.conn.recv() if ready else None
            except (EOFError, OSError):
                self.proc.join(5)
                code = self.proc.exitcode
                rec["stages"][current or "harness"] = {"ok": False, "reason": f"worker died (exit code {code})",
                                                       "type": "Crash"}
                self.retire()
                return current or "harness"
            if msg is None:
                limit = "the model's time budget ran out" if deadline >= end else f"timed out after {timeout:.0f} s"
                rec["stages"][current or "harness"] = {"ok": False, "reason": limit, "type": "Timeout",
                                                       "seconds": round(timeout, 1)}
                self.retire()
                return current or "harness"
            if msg[0] == "start":
                current = msg[1]
                deadline = min(end, time.monotonic() + timeout)  # each stage gets its own limit
            elif msg[0] == "stage":
                if msg[1] not in rec["stages"] or msg[1] == "build":
                    rec["stages"][msg[1]] = msg[2]
                current = None
            elif msg[0] == "info":
                rec.update(msg[1])
            elif msg[0] == "done":
                return None


def finish(rec: dict) -> None:
    """Verdict, reasons and the capture / analyze seconds of one record."""
    st = rec["stages"]
    bad = lambda s: s in st and not st[s]["ok"]  # noqa: E731
    if bad("build") or ("build" not in st and bad("harness")):
        verdict = "unbuildable"
    elif any(bad(s) for s in DATA_STAGES) or bad("harness") or "capture" not in st:
        verdict = "analyze-fails"
    elif bad("nodata"):
        verdict = "partition-fails"
    else:
        verdict = "ok"
    rec["verdict"] = verdict
    failed = [s for s in ("build",) + DATA_STAGES + ("harness",) if bad(s)]
    rec["data_stage"] = failed[0] if failed else None
    rec["reason"] = st[failed[0]]["reason"] if failed else None
    rec["nodata_reason"] = st["nodata"]["reason"] if bad("nodata") else None
    if "capture" in st:
        rec["capture_seconds"] = st["capture"].get("seconds")
    rec["analyze_seconds"] = round(sum(st[s].get("seconds") or 0 for s in ("weights", "activations", "lesions")
                                       if s in st), 2) if "capture" in st and st["capture"]["ok"] else None


# =============================================================================================
# the report
# =============================================================================================
CLEAN = ("UnsupportedModelError", "ModelTraceError")
CATEGORIES = [  # (category, regex on the one-line reason); first match wins
    ("time limit (stage or model budget)", r"timed out after|time budget ran out"),
    ("worker process died", r"^worker died"),
    ("out of memory (worker limited to --memory-gb of address space)",
     r"MemoryError|Unable to allocate|can't allocate memory|not enough memory|std::bad_alloc"),
    ("no input shape known without data (the model gives none it runs on; pass input_shape=)",
     r"no input shape to export it at"),
    ("fx cannot trace the model (data-dependent control flow, no data given)", r"^ModelTraceError: modlens could not trace"),
    ("torch.export fails", r"torch\.export|^ModelTraceError: the exported"),
    ("other capture refusal (ModelTraceError)", r"^ModelTraceError"),
    ("shared layer: one module applied more than once", r"called more than once"),
    ("opaque attention module (nn.MultiheadAttention, nn.TransformerEncoderLayer)", r"attention module .* is opaque"),
    ("mixture of experts (expert MLPs routed per token: not supported yet)", r"routes tokens to experts"),
    ("recurrent layers (LSTM, GRU, RNN: not supported)", r"recurrent layers"),
    ("no weight edge (every map between analysed neurons is zero)", r"weight graph has no edges|graph has no edges"),
    ("parallel or gating residual streams of different widths (TNT, CrossViT, CSATv2's gate transformer)",
     r"runs beside .* parallel residual streams|through no layer.*between streams"),
    ("hierarchical transformer: a stage boundary that is not one downsampling layer",
     r"residual stream of one width|between the MLPs .* (passes through|downsampling|patch merging|the stream passes|the stream reaches)"
     r"|reads a stream of width"),
    ("attention found but no transformer MLP recognised", r"has attention but no transformer MLP"),
    ("functional F.linear (computed bias, or timm's Linear subclass traced by fx)", r"functional layer operation 'linear"),
    ("functional conv (F.conv with a computed or shared weight)", r"functional layer operation 'conv"),
    ("matmul with a weight tensor (relative-position tables, matmul patch embedding)", r"functional layer operation '(matmul|bmm|einsum|baddbmm)"),
    ("layer weight computed in forward (reparametrization, weight standardization)", r"computed in forward, not a parameter"),
    ("model output is not one final layer (mean/sum of heads, pooling after the head)", r"model output is computed by|without passing through the output layer"),
    ("lesion refused: a channel reaches a layer directly and through a function of itself (DenseNet-style cat)", r"through two paths|cannot lesion this layer"),
    ("channel split or slice (split, chunk, slice, narrow, getitem)", r"operation '(split|split_with_sizes|chunk|slice|narrow|getitem|unbind|select|index)[.' ]"),
    ("reshape of channels into groups or heads (channel shuffle, radix, token reshapes)", r"operation '(view|reshape|_unsafe_view|unflatten|expand)[.' ]"),
    ("flatten of spatial dims into tokens", r"operation '(flatten)[.' ]"),
    ("functional norm in the fx graph (F.batch_norm, F.layer_norm, F.group_norm of timm's norm layers)", r"operation '(batch_norm|layer_norm|group_norm|instance_norm|_native_batch_norm_legit_no_training)[.' ]"),
    ("upsampling / interpolation", r"upsample|interpolate|Upsample"),
    ("padding op", r"operation '(pad|constant_pad_nd|reflection_pad2d|replication_pad2d)[.' ]"),
    ("per-sample norm written as ops (GRN, x / x.norm)", r"operation '(linalg_vector_norm|norm|rsqrt|sqrt|pow|var|std)[.' ]"),
    ("softmax or other reduction across channels (gates, split attention)", r"operation '(softmax|_softmax|sum|amax|max|logsumexp|cumsum)[.' ]"),
    ("transpose/permute or mean not followed", r"operation '(permute|transpose|mean)[.' ]|^UnsupportedModelError: mean "),
    ("other elementwise/arith op not followed", r"operation '(add|sub|mul|div|where|exp|log|abs|neg|roll|clone|cat|stack|matmul|bmm|erf|sin|cos)[.' ]"),
    ("unsupported layer type (recurrent, embedding, 3-D or transposed conv)", r"unsupported layer '"),
    ("flattened value mixed or permuted, or channels-last flatten", r"mixes a flattened value|permutes a flattened|flattens a channels-last"),
    ("layer reads another layer along a non-channel dimension", r"reads the spatial maps|reads a flattened, dense or channels-last|along two dimensions|as an argument other than"),
    ("concatenation not along channels", r"concatenation .* is not along the channel"),
    ("n_clusters larger than a layer", r"n_clusters=\d+ is larger"),
    ("other unsupported module or operation", r"^UnsupportedModelError: unsupported"),
    ("other clean refusal", r"^(UnsupportedModelError|ModelTraceError)"),
    ("internal error (an exception that is not a modlens refusal)", r"."),
]


def category(reason: str | None) -> str | None:
    if not reason:
        return None
    for name, pattern in CATEGORIES:
        if re.search(pattern, reason):
            return name
    return "other"


def op_key(reason: str) -> str:
    """What a refusal names, for grouping: the operation (``'split_with_sizes'``), else the
    exception type and its opening words."""
    m = re.search(r"unsupported '[^']+' \((\w+)\)", reason)
    if m:
        return m.group(1)
    m = re.search(r"(?:operation|unsupported) '([^']+)'", reason)
    if m:
        return m.group(1).split(".")[0]
    m = re.search(r"computed by operation '([^']+)'", reason)
    if m:
        return m.group(1).split(".")[0]
    return re.sub(r"'[^']*'", "'…'", reason.split(":", 1)[0])


def is_clean(rec: dict, key: str) -> bool:
    """Whether a failure was a modlens refusal (one line, a refusal type) rather than an internal error."""
    stage = "nodata" if key == "nodata_reason" else rec.get("data_stage")
    st = rec["stages"].get(stage or "", {})
    return st.get("type") in CLEAN + ("Timeout", "Crash", "Unbuildable")


BOILERPLATE = (": modlens follows channels", "; modlens needs", ": use nn.Linear", "; use nn.Linear", "; modlens takes",
               ". Data-dependent Python", "; modlens analyses", "; modlens cannot lesion", ", not by a final")


def short(reason: str | None) -> str | None:
    """A reason without its advice (for the per-model tables; the results file keeps the whole line)."""
    if not reason:
        return reason
    for b in BOILERPLATE:
        if b in reason:
            reason = reason.split(b, 1)[0]
    return reason if len(reason) <= 220 else reason[:217] + "..."


def _esc(s) -> str:
    return "" if s is None else str(s).replace("|", "\\|").replace("\n", " ")


def _num(v, fmt="{:.1f}") -> str:
    return "" if v is None else fmt.format(v)


def write_report(records: list[dict], path: Path, argv: str, runs: list[str] | None = None) -> None:
    """Write the coverage report; ``runs``: the commands of the runs that a merged results file joins."""
    import platform

    versions = {}
    for mod in ("torch", "torchvision", "timm", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = "absent"
    lines = ["# Model zoo coverage", "",
             "Generated by `benchmarks/zoo.py` (do not edit by hand); machine-readable results in "
             "`benchmarks/results/zoo.json`.", "",
             f"Run: `{argv}` on {platform.machine()} CPU, {os.environ.get('ZOO_THREADS', '1')} torch thread(s), "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
             "Each model has random weights and 10 classes and sees 8 random test and 8 held-out inputs at the "
             "smallest input size it accepts (column *input*). Normalization scales that a model initialises to "
             "exactly zero (zero-initialised residual branches) are set to one first, as training would move them "
             "(runs from 3530207 on; `zero_scales` in the results). **Without data**: "
             "`modlens.partition(model, \"weights/global\", n_clusters=4)`. **With data**: capture by "
             "`torch.export` at the data's shape, `weights/global` and `activations/global` partitions (k = 4) and "
             "`modlens.analyze` with a random partition of every neuron layer into halves and 2 random sets per "
             "subcluster (lesions in every layer). Verdicts: **ok** (both run), **partition-fails** (with data it "
             "runs, without data it fails), **analyze-fails** (with data it fails; the stage is named), "
             "**unbuildable** (the model itself cannot be built or run here). Seconds are wall time on a shared "
             "2-core machine.", ""]
    if runs:
        lines += ["Runs joined here, a later run's record of a model replacing an earlier one's:", ""]
        lines += [f"- `{r}`" for r in runs] + [""]
    commits: dict[str, int] = {}
    for r in records:
        c = r.get("commit", "unrecorded")
        commits[c] = commits.get(c, 0) + 1
    lines += ["Code under test (commit: models run there): "
              + ", ".join(f"`{c}`: {n}" for c, n in sorted(commits.items(), key=lambda kv: -kv[1])) + "."
              + (" These results were joined from runs at several commits (`--merge`): each model's verdict is "
                 "that of the code at its own commit (`unrecorded`: runs made before the commit was recorded), "
                 "not of one commit." if len(commits) > 1 else ""), ""]
    lines += ["## Totals", "", "| zoo | models | ok | partition-fails | analyze-fails | unbuildable | runs with data |"
              " runs with and without data |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_zoo = {z: [r for r in records if r["zoo"] == z] for z in ZOOS}
    for z, rs in by_zoo.items():
        if not rs:
            continue
        c = {v: sum(r["verdict"] == v for r in rs) for v in ("ok", "partition-fails", "analyze-fails", "unbuildable")}
        built = len(rs) - c["unbuildable"]
        data_ok = c["ok"] + c["partition-fails"]
        lines.append(f"| {ZOO_TITLES[z]} | {len(rs)} | {c['ok']} | {c['partition-fails']} | {c['analyze-fails']} | "
                     f"{c['unbuildable']} | {data_ok}/{built} ({100 * data_ok / max(built, 1):.0f} %) | "
                     f"{c['ok']}/{built} ({100 * c['ok'] / max(built, 1):.0f} %) |")
    lines.append("")
    caps = sorted((r for r in records if r.get("capture_seconds") is not None), key=lambda r: -r["capture_seconds"])
    if caps:
        lines += ["Slowest captures (`torch.export` and modlens's graph analysis): "
                  + ", ".join(f"{r['name']} ({r['zoo']}) {r['capture_seconds']:.1f} s" for r in caps[:5]) + ".", ""]
    def above(r):   # a limit over the census's (a memory limit of 0 is none)
        lim = r.get("limits") or {}
        return any(lim.get(k, v) > v or (k == "memory_gb" and lim.get(k) == 0) for k, v in CENSUS_LIMITS.items())

    raised = [r for r in records if above(r)]
    if raised:
        lines += ["### Models run under raised limits", "",
                  "The census gives each stage " + f"{CENSUS_LIMITS['timeout']:.0f} s, each model "
                  f"{CENSUS_LIMITS['budget']:.0f} s and each worker {CENSUS_LIMITS['memory_gb']:.0f} GiB of address "
                  "space (the CUDA build of torch maps about 3 GiB of it). These models ran again alone with more, "
                  "and their verdict is that run's; the seconds of every stage are listed.", "",
                  "| model | zoo | params (M) | neurons | stage limit s | model limit s | memory GiB | verdict | "
                  "seconds per stage |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for r in sorted(raised, key=lambda r: (r["zoo"], r["name"])):
            lim = r["limits"]
            secs = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in r["stages"].items() if v.get("seconds") is not None)
            lines.append(f"| {_esc(r['name'])} | {r['zoo']} | {_num(r.get('params') and r['params'] / 1e6, '{:.0f}')} | "
                         f"{_num(r.get('neurons'), '{:d}')} | {lim['timeout']:.0f} | {lim['budget']:.0f} | "
                         f"{lim['memory_gb'] or 'none'} | {r['verdict']} | {secs} |")
        lines.append("")
    # refusal reasons
    lines += ["## Refusal reasons", "",
              "Each failure's one-line reason, sorted into categories by `CATEGORIES` in `benchmarks/zoo.py` (first "
              "matching pattern). *With data*: the first stage that fails (capture, weights, activations, lesions). "
              "*Without data*: `partition` without data, on every model that builds. *Operations*: what the refusals "
              "name, with counts. *Internal errors* are exceptions that are not a modlens refusal "
              "(`UnsupportedModelError`, `ModelTraceError`).", ""]
    for title, key in (("With data", "reason"), ("Without data", "nodata_reason")):
        groups: dict[str, list[dict]] = {}
        for r in records:
            if r["verdict"] == "unbuildable" or not r.get(key):
                continue
            groups.setdefault(category(r[key]), []).append(r)
        if not groups:
            continue
        lines += [f"### {title}", "", "| category | models | timm | torchvision | HF | operations | examples |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for cat, rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            ops: dict[str, int] = {}
            for r in rs:
                k = op_key(r[key])
                ops[k] = ops.get(k, 0) + 1
            op_text = ", ".join(f"`{k}` {n}" for k, n in sorted(ops.items(), key=lambda kv: -kv[1])[:6]
                                if not k.endswith("Error"))
            ex = ", ".join(f"{r['name']}" for r in rs[:4])
            n = {z: sum(r["zoo"] == z for r in rs) for z in ZOOS}
            lines.append(f"| {_esc(cat)} | {len(rs)} | {n['timm']} | {n['torchvision']} | {n['hf']} | {_esc(op_text)} | "
                         f"{_esc(ex)} |")
        lines.append("")
    unclean = [(r, k) for r in records for k in ("reason", "nodata_reason")
               if r["verdict"] != "unbuildable" and r.get(k) and not is_clean(r, k)]
    if unclean:
        lines += ["### Failures that are not a clean refusal", "",
                  "| model | zoo | stage | exception | where |", "|---|---|---|---|---|"]
        for r, k in unclean:
            stage = "nodata" if k == "nodata_reason" else r.get("data_stage")
            where = r["stages"].get(stage or "", {}).get("where", "")
            lines.append(f"| {_esc(r['name'])} | {r['zoo']} | {stage} | {_esc(r[k][:200])} | {_esc(where)} |")
        lines.append("")
    unbuilt = [r for r in records if r["verdict"] == "unbuildable"]
    if unbuilt:
        lines += ["### Not built", "", "| model | zoo | why |", "|---|---|---|"]
        lines += [f"| {_esc(r['name'])} | {r['zoo']} | {_esc(r.get('reason'))} |" for r in unbuilt]
        lines.append("")
    # tables per zoo
    for z, rs in by_zoo.items():
        if not rs:
            continue
        lines += [f"## {ZOO_TITLES[z]}", "",
                  "| model | family | input | params (M) | neurons | layers | capture s | analyze s | verdict | "
                  "reason (with data) | reason (without data) | commit |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (r["family"].lower(), r["name"].lower())):
            shape = "x".join(map(str, r.get("input_shape") or []))
            reason = short(r.get("reason"))
            if reason and r.get("data_stage") not in (None, "build"):
                reason = f"[{r['data_stage']}] {reason}"
            lines.append(
                f"| {_esc(r['name'])} | {_esc(r['family'])} | {shape} | {_num(r.get('params') and r['params'] / 1e6, '{:.2f}')} | "
                f"{_num(r.get('neurons'), '{:d}')} | {_num(r.get('layers'), '{:d}')} | {_num(r.get('capture_seconds'))} | "
                f"{_num(r.get('analyze_seconds'))} | {r['verdict']} | {_esc(reason)} | {_esc(short(r.get('nodata_reason')))} | "
                f"{r.get('commit', '')} |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# =============================================================================================
def source_commit() -> str:
    """The commit of the code under test (``-dirty`` when the work tree has changes), recorded per model."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "src", "benchmarks") else "")


def load_meta(path: Path) -> dict:
    return json.loads(path.read_text()).get("meta", {}) if path.exists() else {}


def _run_commands(path: Path) -> list[str]:
    """The command of the run that wrote ``path`` (those of the runs it joins, when it is itself a merge)."""
    meta = load_meta(path)
    if meta.get("runs"):
        return meta["runs"]
    return [meta["command"]] if meta.get("command") else []


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["models"] if path.exists() else []


def save_results(path: Path, records: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "models": records}, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", action="append", choices=ZOOS, help="zoo(s) to run (default: all three)")
    ap.add_argument("--only", action="append", default=[], help="a model name, class name or family (repeatable)")
    ap.add_argument("--limit", type=int, help="at most this many models per zoo")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per stage (default 240)")
    ap.add_argument("--budget", type=float, default=720.0, help="seconds per model, all tries (default 720)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--memory-gb", type=float, default=10.0,
                    help="address-space limit of the worker in GiB (default 10; 0: none)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "modlens-zoo-worker.log"),
                    help="the workers' stdout and stderr (default: in the temporary folder)")
    ap.add_argument("--resume", action="store_true", help="skip models already in the results file")
    ap.add_argument("--list", action="store_true", help="print the models that would run and stop")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the results file")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/coverage.md")
    ap.add_argument("--build-only", action="store_true", help="only build and run each model (checks the zoo side)")
    ap.add_argument("--merge", action="append", type=Path, default=[],
                    help="results files of other runs (repeatable) joined into --results, a later file's record of a "
                         "model replacing an earlier one's; nothing is run")
    args = ap.parse_args(argv)
    os.environ["ZOO_THREADS"] = str(args.threads)
    os.environ["ZOO_MEMORY_GB"] = str(args.memory_gb)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    command = "python benchmarks/zoo.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))

    records = load_results(args.results)
    if args.merge:
        joined = ([args.results] if records else []) + args.merge   # the results file's own records come first
        by = {(r["zoo"], r["name"]): r for r in records}
        for path in args.merge:
            by.update({(r["zoo"], r["name"]): r for r in load_results(path)})
        records = list(by.values())
        meta = {"command": f"python benchmarks/zoo.py --merge ... ({len(args.merge)} results files, listed in the "
                           "meta of the results file)",
                "merged": [str(p) for p in args.merge], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "runs": [c for p in joined for c in _run_commands(p)]}
        save_results(args.results, records, meta)
        print(f"merged {len(args.merge)} file(s) into {args.results} ({len(records)} models)")
        if args.no_doc:
            return
        write_report(records, args.doc, meta["command"], meta["runs"])
        print(f"wrote {args.doc}")
        return
    if args.report_only:
        meta = load_meta(args.results)
        write_report(records, args.doc, meta.get("command", command), meta.get("runs"))
        print(f"wrote {args.doc} ({len(records)} models)")
        return
    import torch

    torch.set_num_threads(args.threads)
    jobs = all_jobs(args.zoo or list(ZOOS), args.only, args.limit)
    if args.list:
        for j in jobs:
            print(f"{j['zoo']:12s} {j['family']:28s} {j['name']}"
                  + (f"  ({j['params'] / 1e6:.2f} M)" if j.get("params") else ""))
        print(f"{len(jobs)} models")
        return
    for j in jobs:
        j["build_only"] = args.build_only
    done = {(r["zoo"], r["name"]) for r in records}
    if args.resume:
        jobs = [j for j in jobs if (j["zoo"], j["name"]) not in done]
    meta = {"command": command, "timeout": args.timeout, "budget": args.budget, "memory_gb": args.memory_gb, "threads": args.threads, "k": K, "n_samples": N_SAMPLES,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    commit = source_commit()
    pool = Pool(args.log)
    t0 = time.perf_counter()
    try:
        for i, job in enumerate(jobs):
            rec = pool.run(job, args.timeout, args.budget)
            rec["commit"] = commit
            rec["limits"] = {"timeout": args.timeout, "budget": args.budget, "memory_gb": args.memory_gb,
                             "threads": args.threads}
            records = [r for r in records if (r["zoo"], r["name"]) != (rec["zoo"], rec["name"])] + [rec]
            meta["seconds"] = round(time.perf_counter() - t0, 1)
            save_results(args.results, records, meta)
            why = rec.get("reason") or rec.get("nodata_reason") or ""
            print(f"[{i + 1}/{len(jobs)}] {rec['zoo']:11s} {rec['name'][:40]:40s} {rec['verdict']:15s} "
                  f"{rec['wall_seconds']:6.1f} s  {why[:110]}", flush=True)
    finally:
        pool.stop()
    if not args.no_doc:
        write_report(records, args.doc, command)
        print(f"wrote {args.doc} and {args.results} ({len(records)} models, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
