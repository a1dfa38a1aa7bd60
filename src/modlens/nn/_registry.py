"""Operation handlers: one small unit per family of operations modlens follows channels through.

Each :class:`Handler` declares which graph nodes it owns (module types, torch functions,
tensor methods, ATen overloads of an exported graph) and what the op *is* for modlens:

================  ========================================  =========================  ==================
kind              how a layer's channels flow               weight edges               lesion
================  ========================================  =========================  ==================
``layer``         end here (Linear, Conv, grouped Conv)      the layer's weights        correction or
                                                                                        recompute
``unary``         unchanged (activation, dropout, pool,      --                         carried through
                  upsampling, scalar/parameter
                  arithmetic)
``pad``           unchanged (spatial padding); padding of    followed                   carried through;
                  the channel dimension: an offset, as                                  recomputed from a
                  ``cat`` with zeros                                                    channel pad on
``bn``            unchanged                                  ``gamma/sqrt(var+eps)``    carried through
``scale``         unchanged (layer scale: ``p * x``)         ``|p_c|``                  carried through
``norm``          mixed per sample (LayerNorm, GroupNorm,    ``|gamma_c|``              recomputed from
                  RMSNorm)                                                              the norm on
``join``          summed with other branches (residual)      followed through           recomputed
``gate``          ``x * g(x)`` (squeeze-excitation),         followed through (a one-   recomputed
                  ``x / s(x)``                               channel value broadcast
                                                             over all channels: no
                                                             edge)
``stat``          a per-sample norm ``||x||`` over some      not followed: a statistic  recomputed from
                  dimensions (GRN, ``x / x.norm(dim=1)``)    that rescales, no edge     the norm on
``cat``           offset along the channel dimension         followed                   carried through
``split``         a part of the channel dimension (split,    followed: each part        recomputed from the
                  chunk, narrow, slice; the inverse of       carries the channels in    split on
                  ``cat``); along other dimensions (a        its window, at their
                  spatial crop) unchanged                    offsets
``flatten``       channel-major features                     followed                   carried through
``permute``       channel dimension moves                    followed                   carried through
``mean``, ``sum`` spatial dims (or the groups in front of    followed                   carried through
                  the channels) averaged or summed
``reshape``       other dims reshaped, or a size-1 dim       followed (shuffle: new     carried through;
                  inserted (``unsqueeze``): unchanged; a     places; groups: place      recomputed from a
                  channel shuffle (groups, transpose,        ``p % C``)                 shuffle or group
                  back): a permutation; (B, G * C, ...)                                 view on
                  viewed as (B, G, C, ...): groups (radix
                  attention)
``stack``         branches stacked in front of the           followed                   recomputed
                  channels (selective kernels)
``unfold``,       patches with kernel == stride, no padding  followed: channel ``c``    carried through;
``fold``          and dilation 1 (``F.unfold``/``F.fold``,   owns rows ``c * K ...``    recomputed from a
                  im2col/col2im): a rearrangement of         of the ``(B, C * K, L)``   fold of a layer's
                  positions within each channel; a reshape   patches (a channel-major   own rows
                  ``(B, C * K, L)`` <-> ``(B, C, K, L)``     flatten); other settings
                  splits or merges the channel blocks;       refused
                  pixel (un)shuffle alike (``K = r * r``)
``expand``        other dims broadcast or repeated           followed; across the       carried through
                  (``expand``, ``expand_as``, ``repeat``)    channels: refused
``final``         softmax after the output layer; across     -- (across groups: a       -- (recomputed)
                  groups in front of the channels, a gate;   gate, followed; over
                  over the positions after the channels,     positions: followed)
                  per channel (MobileViT-V2's context
                  scores)
``sum``,          several output layers (heads) combined:    --                         --
``stack``         ``torch.stack(heads).sum(0)`` (and
                  ``head(x) + head_dist(x)``, a ``join``)
``attention``     mixed across tokens (a product of two      not a neuron layer;        recomputed
                  activations: the model is a transformer)   residual paths only
``token_mix``     mixed across tokens: a Linear over the     not a neuron layer;        recomputed
                  token dimension (Mixer's token MLPs; the   residual paths only
                  model is a transformer)
``merge``         ``x.flatten(2)``: dimensions after the     followed                   carried through
                  channels merged (patch maps into tokens)
``take_tokens``   one position per sequence read after the   --                         recomputed
                  output layer (last-token heads)
================  ========================================  =========================  ==================

Decoder language models write some operations out; capture replaces those patterns by one node
each (:mod:`modlens.nn._decoder_capture`): an element-wise closure (``gelu_new``) is ``unary``, a
written-out RMS normalization is a ``norm`` and a last-token read is ``take_tokens``.

Capture also turns a functional ``conv1d``/``conv2d``/``linear`` or an ``x @ W`` whose weight is a
parameter or computed from parameters only (weight standardization) into a ``layer`` module with
that effective weight (:mod:`modlens.nn._computed`), and a Linear whose output is cut into two
halves that gMLP's spatial gating unit joins into one Linear per half (:mod:`modlens.nn._split_linear`).

Adding an operation means adding (or extending) one handler here and a test. A model with
attention is analysed through its blocks' MLP neurons (:mod:`modlens.nn._transformer`). An
``attention`` product of one activation with a weight is part of attention when it is a position
term of the scores or a projection written as an einsum (:mod:`modlens.nn._scores`), else refused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from modlens.nn._decoder_ops import Elementwise, WrittenNorm, take_tokens

aten = torch.ops.aten

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, WrittenNorm)
OTHER_WEIGHT_LAYERS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                       nn.LazyLinear, nn.LSTM, nn.GRU, nn.RNN, nn.Embedding)
ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class Handler:
    kind: str
    modules: tuple = ()
    functions: set = field(default_factory=set)
    methods: set = field(default_factory=set)


def _ops(*names: str) -> set:
    out = set()
    for name in names:
        base, _, overload = name.partition(".")
        packet = getattr(aten, base, None)
        if packet is not None:
            out.add(getattr(packet, overload or "default"))
    return out


ACTIVATIONS = Handler(
    "unary",
    modules=(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
             nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.PReLU),
    functions={torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.tanh,
               torch.sigmoid, F.tanh, F.sigmoid, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign,
               torch.clamp, torch.clip}
    | _ops("relu", "gelu", "silu", "mish", "tanh", "sigmoid", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu",
           "elu", "selu", "celu", "softplus", "clamp", "clamp.Tensor", "prelu", "_prelu_kernel", "relu6"),
    methods={"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "clamp", "clamp_", "clip"},
)
PASSING = Handler(  # identity in eval: dropout, stochastic depth, copies and casts
    "unary",
    modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity),
    functions={F.dropout, F.dropout1d, F.dropout2d, torch.dropout}
    | _ops("dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias", "detach", "_to_copy",
           "to.dtype", "lift_fresh_copy"),
    methods={"contiguous", "float", "double", "clone", "to"},
)
POOLING = Handler(  # per channel over space (and spatial padding)
    "unary",
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d),
    functions={F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d}
    | _ops("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d"),
)
UPSAMPLING = Handler(  # per channel over space: F.interpolate, nn.Upsample (FPN- and U-Net-style paths)
    "unary",
    modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    functions={F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
    | _ops(*(f"{op}.{overload}" for op in ("upsample_nearest1d", "upsample_nearest2d", "_upsample_nearest_exact1d",
                                          "_upsample_nearest_exact2d", "upsample_linear1d", "upsample_bilinear2d",
                                          "_upsample_bilinear2d_aa", "upsample_bicubic2d", "_upsample_bicubic2d_aa")
             for overload in ("default", "vec"))),
)
PAD = Handler(  # spatial padding is per channel; padding of the channel dimension moves channels (an offset)
    "pad",
    modules=(nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
             nn.ReplicationPad1d, nn.ReplicationPad2d, nn.CircularPad1d, nn.CircularPad2d),
    functions={F.pad, torch.constant_pad_nd}
    | _ops("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
           "replication_pad2d", "_pad_circular"),
)
BATCH_NORM = Handler("bn", modules=BATCH_NORMS)
NORMALIZATION = Handler("norm", modules=NORMS, functions={F.normalize})
STATISTIC = Handler(  # a per-sample norm of a value (GRN's ||x|| over space, x / x.norm(dim=1)): its users rescale
    "stat",
    functions={torch.norm, torch.linalg.vector_norm}
    | _ops("linalg_vector_norm", "norm.ScalarOpt_dim", "norm.Scalar", "norm.ScalarOpt_dim_dtype"),
    methods={"norm"},
)
ARITHMETIC = Handler(  # refined in classify: scalar/parameter -> unary or scale; two activations -> join/gate
    "arith",
    functions={operator.mul, operator.truediv, operator.add, operator.sub, operator.iadd, operator.isub,
               operator.imul, operator.neg, operator.pow, torch.mul, torch.add, torch.sub, torch.div, torch.addcmul,
               torch.pow, torch.square}
    | _ops("add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor", "mul.Scalar", "div.Tensor",
           "div.Scalar", "neg", "addcmul", "pow.Tensor_Scalar", "pow.Scalar", "square"),
    methods={"add", "add_", "sub", "sub_", "mul", "div", "mul_", "div_", "addcmul", "pow", "square"},
)
CONCAT = Handler("cat", functions={torch.cat, torch.concat, torch.concatenate} | _ops("cat"))
SPLIT = Handler(  # the inverse of cat: channel windows (x[:, a:b] is getitem in an fx graph)
    "split",
    functions={torch.split, torch.chunk, torch.narrow, operator.getitem}
    | _ops("split.Tensor", "split_with_sizes", "chunk", "narrow", "slice.Tensor"),
    methods={"split", "chunk", "narrow", "split_with_sizes"},
)
FLATTEN = Handler("flatten", modules=(nn.Flatten,), functions={torch.flatten, torch.reshape}
                  | _ops("flatten.using_ints", "view", "reshape", "_unsafe_view", "reshape_as", "view_as"),
                  methods={"flatten", "view", "reshape", "reshape_as", "view_as"})
UNSQUEEZE = Handler("reshape", functions={torch.unsqueeze} | _ops("unsqueeze"), methods={"unsqueeze"})  # size-1 dim
PERMUTE = Handler("permute", functions={torch.permute, torch.transpose} | _ops("permute", "transpose.int"),
                  methods={"permute", "transpose"})
MEAN = Handler("mean", functions={torch.mean} | _ops("mean.dim"), methods={"mean"})
SUM = Handler("sum", functions={torch.sum} | _ops("sum.dim_IntList"), methods={"sum"})  # of stacked heads only
STACK = Handler("stack", functions={torch.stack} | _ops("stack"))  # of the output heads only
FINAL = Handler("final", modules=(nn.Softmax, nn.LogSoftmax),
                functions={F.softmax, F.log_softmax, torch.softmax, torch.log_softmax} | _ops("softmax.int", "_softmax",
                                                                                               "log_softmax.int"),
                methods={"softmax", "log_softmax"})
ATTENTION = Handler("attention", modules=ATTENTION_MODULES,
                    functions={F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm, torch.einsum}
                    | _ops("scaled_dot_product_attention", "matmul", "bmm", "baddbmm", "einsum"),
                    methods={"matmul", "bmm"})

EXPAND = Handler("expand", functions=_ops("expand_as", "expand", "repeat"),  # other dims broadcast or repeated
                 methods={"expand_as", "expand", "repeat"})
UNFOLD = Handler("unfold", modules=(nn.Unfold, nn.PixelUnshuffle),  # nn/_patches.py
                 functions={F.unfold, F.pixel_unshuffle, torch.pixel_unshuffle} | _ops("im2col", "pixel_unshuffle"))
FOLD = Handler("fold", modules=(nn.Fold, nn.PixelShuffle),
               functions={F.fold, F.pixel_shuffle, torch.pixel_shuffle} | _ops("col2im", "pixel_shuffle"))
CLOSURES = Handler("unary", modules=(Elementwise,))   # written-out channel-wise functions (gelu_new)
TAKE_TOKENS = Handler("take_tokens", functions={take_tokens})  # last-token heads, after the output layer

HANDLERS = [ACTIVATIONS, PASSING, POOLING, UPSAMPLING, PAD, BATCH_NORM, NORMALIZATION, STATISTIC, ARITHMETIC, CONCAT, SPLIT,
            FLATTEN, UNSQUEEZE, PERMUTE, MEAN, SUM, STACK, FINAL, ATTENTION, EXPAND, UNFOLD, FOLD, CLOSURES,
            TAKE_TOKENS]
SHAPE_METHODS = {"size", "dim"}
# operations that read only the shape of an argument: (target, index of that argument)
SHAPE_ONLY = ({(f, 0) for f in (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like)}
              | {(f, 0) for f in _ops("zeros_like", "ones_like", "empty_like", "full_like")}
              | {(f, 0) for f in _ops("new_zeros", "new_ones", "new_empty", "new_full")}
              | {(f, 1) for f in _ops("expand_as", "reshape_as", "view_as")}
              | {("expand_as", 1), ("reshape_as", 1), ("view_as", 1), ("zeros_like", 0), ("new_zeros", 0),
                                                        ("new_ones", 0), ("new_empty", 0), ("new_full", 0)})
SHAPE_FUNCTIONS = {getattr} | _ops("sym_size.int", "sym_numel")
SIZE_ARITHMETIC = {operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv}

_BY_FUNCTION = {f: h for h in HANDLERS for f in h.functions}
_BY_METHOD = {m: h for h in HANDLERS for m in h.methods}


def handler_kind(node: fx.Node, module: nn.Module | None) -> str:
    """The raw kind of ``node`` (``arith`` still to be refined), or ``"?"``."""
    if node.op == "call_module":
        if isinstance(module, LAYER_TYPES):
            return "layer"
        for h in HANDLERS:
            if h.modules and isinstance(module, h.modules):
                return h.kind
        return "?"
    if node.op == "call_function":
        h = _BY_FUNCTION.get(node.target)
        return h.kind if h is not None else "?"
    if node.op == "call_method":
        h = _BY_METHOD.get(node.target)
        return h.kind if h is not None else "?"
    return "?"


def refine_arith(node: fx.Node, n_tensors: int) -> str:
    """Arithmetic with one activation operand is channel-wise (a parameter operand is a
    learned per-channel scale or shift; ``addcmul(b, w, x)`` is ``w * x + b``; a power with a constant
    exponent, as in StarReLU's ``relu(x) ** 2``, is element-wise); with two, ``+``/``-``
    are residual joins, ``*`` a gate and ``/`` a gate too (a value divided by a per-sample statistic:
    GRN, ``x / x.norm(dim=1)``); a power of one activation by another is refused."""
    if "alpha" in node.kwargs:
        return "?"
    name = _name(node.target)
    if "addcmul" in name:
        return "scale" if n_tensors == 1 and "value" not in node.kwargs else "?"
    if n_tensors <= 1:
        return "scale" if "mul" in name else "unary"
    if n_tensors == 2 and ("add" in name or "sub" in name):
        return "join"
    if n_tensors == 2 and ("mul" in name or "div" in name):
        return "gate"
    return "?"


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_activation_module(m) -> bool:
    """An activation function module: one of :data:`ACTIVATIONS`, or a written-out closure with a
    nonlinear operation in it."""
    return isinstance(m, ACTIVATIONS.modules) or (isinstance(m, Elementwise) and m.nonlinear)


def is_bn(m) -> bool:
    return isinstance(m, BATCH_NORMS) and m.running_var is not None
