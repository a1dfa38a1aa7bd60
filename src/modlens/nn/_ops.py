"""Operations modlens follows from a layer's output, and where a channel sits downstream.

Tables of the torch operations that keep each channel separate (so a channel keeps its
identity through them), of joins (residual additions, channel concatenations) and of the
output operations allowed after the last layer; :class:`Route` and :class:`Sink` describe
where a layer's channels end up (see :mod:`modlens.nn._structure`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn


class UnsupportedModelError(ValueError):
    """The model contains a layer or a connection modlens cannot analyse (yet)."""


LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d)
OTHER_WEIGHT_LAYERS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                        nn.LazyLinear, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention, nn.Embedding)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

# Operations that keep every channel separate, so a channel keeps its identity through them.
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.PReLU,
)
PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d)
UNARY_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.hardtanh, F.hardswish, F.hardsigmoid,
    F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d, torch.dropout, torch.clamp, torch.clip,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
}
UNARY_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "clamp", "clamp_", "clip",
                  "contiguous", "float", "double", "clone"}
FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
SCALAR_FUNCTIONS = {operator.mul, operator.truediv, operator.add, operator.sub, operator.iadd, operator.isub,
                     operator.imul, operator.neg, torch.mul, torch.add, torch.sub, torch.div}
JOIN_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
JOIN_METHODS = {"add", "add_", "sub", "sub_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
FINAL_MODULES = (nn.Softmax, nn.LogSoftmax)
FINAL_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
FINAL_METHODS = {"softmax", "log_softmax"}
SCALAR_METHODS = {"mul", "div", "mul_", "div_"}
SHAPE_METHODS = {"size", "dim"}
SIZE_ARITHMETIC = {operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv}


@dataclass(frozen=True)
class Route:
    """Where channel ``c`` of a layer sits in dimension 1 of a value downstream of it.

    Before a flatten, channel ``c`` is index ``offset + c``. After a flatten of a value with
    ``channels`` channels, channel-major (PyTorch's order), it owns the ``P`` consecutive
    features ``(offset + c) * P ... (offset + c + 1) * P - 1`` with ``P = width / channels``.
    """

    offset: int = 0
    channels: int | None = None
    flat: bool = False
    ndim: int = 2  # number of dimensions of the value (4 for conv2d maps, 2 for (batch, features))

    @property
    def spatial(self) -> bool:
        return self.ndim > 2

    def indices(self, neurons: np.ndarray, width: int, where: str = "") -> np.ndarray:
        """Dimension-1 indices, in a value of ``width`` entries there, of the given channels."""
        neurons = np.asarray(neurons, dtype=np.int64)
        if not self.flat:
            return self.offset + neurons
        if not self.channels or width % self.channels:
            raise UnsupportedModelError(
                f"{where} reads a flattened value of {width} features that is not a whole number of "
                f"features per channel ({self.channels} channels were flattened)"
            )
        p = width // self.channels
        return ((self.offset + neurons)[:, None] * p + np.arange(p)).ravel()


@dataclass(frozen=True)
class Sink:
    """A place where a layer's channels stop being followed: ``value`` enters ``user``."""

    kind: str        # "layer" or "join"
    value: fx.Node   # the value carrying the channels into the sink (the consumer's input)
    user: fx.Node    # the consumer layer node, or the addition
    route: Route


def is_bn(m) -> bool:
    return isinstance(m, BATCH_NORMS) and m.running_var is not None
