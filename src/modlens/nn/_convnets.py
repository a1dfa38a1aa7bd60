"""Convolutional reference networks: the paper's small CNN and CIFAR VGG, and small test networks.

Each builder returns a plain module with no data-dependent control flow (torch.fx traces it),
non-inplace ReLUs, glorot-uniform conv/linear weights and zero biases drawn from an explicit
``torch.Generator``. Inputs are ``(N, C, H, W)``; outputs are logits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from modlens.nn._layers import KERAS_BN, conv1x1, conv3x3, linear
from modlens.nn._layers import activation as _act

#: The paper's small CNN (appendix A.2): conv64-conv64-maxpool-conv64-maxpool, then dense 128.
SMALL_CNN_CONV: tuple[Any, ...] = (64, 64, "M", 64, "M")
SMALL_CNN_DENSE: tuple[int, ...] = (128,)
#: The CIFAR VGG of the paper (13 convolutions, Liu & Deng 2015), then dense 512 -> 512.
CIFAR_VGG_CONV: tuple[Any, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                   512, 512, 512, "M", 512, 512, 512, "M")
CIFAR_VGG_DENSE: tuple[int, ...] = (512, 512)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def check_input_shape(shape: Any, what: str = "input_shape") -> tuple[int, int, int]:
    """``(C, H, W)`` as three positive ints, or a one-line ``ValueError``."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise ValueError(f"{what} must be [channels, height, width] such as [1, 28, 28], got {shape!r}")
    c, h, w = (_positive_int(v, f"{what} entry") for v in shape)
    return c, h, w


def _widths(values: Any, what: str) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of layer widths such as [128], got {values!r}")
    return [_positive_int(v, f"{what} entry") for v in values]


def parse_conv(conv: Any, what: str = "conv") -> list[tuple[int, bool]]:
    """Parse a VGG-style list (widths and ``"M"`` for a 2x2 max-pool) into ``(width, pooled after)``.

    ``"M"`` must follow a convolution; ``[64, 64, "M"]`` gives ``[(64, False), (64, True)]``.
    """
    if not isinstance(conv, (list, tuple)) or not conv:
        raise ValueError(f"{what} must be a non-empty list of widths and 'M' (max-pool), e.g. [64, 64, 'M'], "
                         f"got {conv!r}")
    out: list[tuple[int, bool]] = []
    for i, item in enumerate(conv):
        if item == "M":
            if not out or out[-1][1]:
                raise ValueError(f"{what}[{i}] is 'M' but does not follow a convolution; each 'M' must come "
                                 f"right after a width, got {list(conv)}")
            out[-1] = (out[-1][0], True)
        else:
            out.append((_positive_int(item, f"{what}[{i}]"), False))
    return out


def _pooled_size(h: int, w: int, layers: list[tuple[int, bool]], input_shape) -> tuple[int, int]:
    n_pool = sum(p for _, p in layers)
    ph, pw = h >> n_pool, w >> n_pool
    if ph < 1 or pw < 1:
        raise ValueError(f"input_shape {list(input_shape)} is too small for {n_pool} 2x2 max-pools "
                         f"(the feature map would be {ph}x{pw}); use larger images or fewer 'M'")
    return ph, pw


def small_cnn(
    input_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    *,
    conv: Sequence[Any] = SMALL_CNN_CONV,
    dense: Sequence[int] = SMALL_CNN_DENSE,
    activation: str = "relu",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """The paper's small CNN: ``conv64-conv64-maxpool-conv64-maxpool-dense128-dense10`` by default.

    3x3 'same' convolutions with biases, each followed by the activation; ``"M"`` is a 2x2 max-pool
    (floor, as Keras' 'valid' pooling). Children are named ``conv1, act1, conv2, act2, pool2, ...,
    flatten, fc1, act_fc1, out``. For MNIST (1x28x28) the flattened size is 64*7*7 = 3136.
    """
    c, h, w = check_input_shape(input_shape)
    layers = parse_conv(conv)
    dense = _widths(dense, "dense")
    n_classes = _positive_int(n_classes, "n_classes")
    _act(activation)  # validate before building
    ph, pw = _pooled_size(h, w, layers, input_shape)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for k, (width, pooled) in enumerate(layers, 1):
        mods[f"conv{k}"] = conv3x3(c, width, generator)
        mods[f"act{k}"] = _act(activation)
        if pooled:
            mods[f"pool{k}"] = nn.MaxPool2d(2)
        c = width
    mods["flatten"] = nn.Flatten()
    n_in = c * ph * pw
    for j, width in enumerate(dense, 1):
        mods[f"fc{j}"] = linear(n_in, width, generator)
        mods[f"act_fc{j}"] = _act(activation)
        n_in = width
    mods["out"] = linear(n_in, n_classes, generator)
    return nn.Sequential(mods)


def vgg_dropout_rates(layers: list[tuple[int, bool]]) -> list[float | None]:
    """Dropout after each convolution of a CIFAR VGG (Liu & Deng's schedule, as in the original code).

    The last convolution gets 0.5; a convolution followed by a max-pool gets none; any other gets 0.3
    if it is the first convolution and 0.4 otherwise. For the 13-layer VGG this is
    ``0.3, -, 0.4, -, 0.4, 0.4, -, 0.4, 0.4, -, 0.4, 0.4, 0.5``.
    """
    rates: list[float | None] = []
    for k, (_, pooled) in enumerate(layers):
        if k == len(layers) - 1:
            rates.append(0.5)
        elif pooled:
            rates.append(None)
        else:
            rates.append(0.3 if k == 0 else 0.4)
    return rates


def cifar_vgg(
    input_shape: Sequence[int] = (3, 32, 32),
    n_classes: int = 10,
    *,
    conv: Sequence[Any] = CIFAR_VGG_CONV,
    dense: Sequence[int] = CIFAR_VGG_DENSE,
    dropout: bool = True,
    activation: str = "relu",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """The paper's CIFAR-10 VGG (13 convolutions), following the original code literally.

    Each convolution (3x3 'same', with bias) is followed by ``activation -> [2x2 max-pool] -> batch
    norm -> [dropout]``: the max-pool comes *before* the batch norm where the list has an ``"M"``,
    and the dropout rates are :func:`vgg_dropout_rates`. Then ``flatten -> fc1 (512) -> activation ->
    batch norm -> dropout 0.5 -> fc2 (512) -> activation -> out (logits)``: only the first dense
    layer has batch norm and dropout. ``dropout=False`` removes every dropout layer (the paper's
    unregularized variant; the L2 penalty is a training option, not part of the model).

    Choices the notes leave open, made here: batch norm uses Keras' defaults (eps 1e-3, momentum
    0.99, i.e. torch momentum 0.01); dropout is elementwise (``nn.Dropout``, as Keras' ``Dropout``);
    the pools floor odd sizes (Keras 'valid'). Children are named ``conv{k}, act{k}, [pool{k}],
    bn{k}, [drop{k}]`` per convolution, then ``flatten, fc1, act_fc1, bn_fc1, drop_fc1, fc2,
    act_fc2, out``.
    """
    c, h, w = check_input_shape(input_shape)
    layers = parse_conv(conv)
    dense = _widths(dense, "dense")
    n_classes = _positive_int(n_classes, "n_classes")
    if not isinstance(dropout, bool):
        raise ValueError(f"dropout must be true or false, got {dropout!r}")
    _act(activation)
    ph, pw = _pooled_size(h, w, layers, input_shape)
    rates = vgg_dropout_rates(layers) if dropout else [None] * len(layers)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for k, ((width, pooled), rate) in enumerate(zip(layers, rates), 1):
        mods[f"conv{k}"] = conv3x3(c, width, generator)
        mods[f"act{k}"] = _act(activation)
        if pooled:
            mods[f"pool{k}"] = nn.MaxPool2d(2)
        mods[f"bn{k}"] = nn.BatchNorm2d(width, **KERAS_BN)
        if rate is not None:
            mods[f"drop{k}"] = nn.Dropout(rate)
        c = width
    mods["flatten"] = nn.Flatten()
    n_in = c * ph * pw
    for j, width in enumerate(dense, 1):
        mods[f"fc{j}"] = linear(n_in, width, generator)
        mods[f"act_fc{j}"] = _act(activation)
        if j == 1:
            mods["bn_fc1"] = nn.BatchNorm1d(width, **KERAS_BN)
            if dropout:
                mods["drop_fc1"] = nn.Dropout(0.5)
        n_in = width
    mods["out"] = linear(n_in, n_classes, generator)
    return nn.Sequential(mods)


def _tv_vgg(input_shape, n_classes, conv, dense, batch_norm, generator) -> nn.Module:
    c, h, w = check_input_shape(input_shape)
    layers = parse_conv(conv)
    dense = _widths(dense, "dense")
    ph, pw = _pooled_size(h, w, layers, input_shape)
    features: list[nn.Module] = []
    for width, pooled in layers:
        features.append(conv3x3(c, width, generator))
        if batch_norm:
            features.append(nn.BatchNorm2d(width))
        features.append(nn.ReLU())
        if pooled:
            features.append(nn.MaxPool2d(2, 2))
        c = width
    classifier: list[nn.Module] = []
    n_in = c * ph * pw
    for width in dense:
        classifier += [linear(n_in, width, generator), nn.ReLU(), nn.Dropout(0.5)]
        n_in = width
    classifier.append(linear(n_in, _positive_int(n_classes, "n_classes"), generator))
    return _TorchvisionStyleVGG(nn.Sequential(*features), nn.AdaptiveAvgPool2d((ph, pw)), nn.Sequential(*classifier))


class _TorchvisionStyleVGG(nn.Module):
    """torchvision's VGG layout: ``features -> avgpool -> flatten -> classifier``."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.features, self.avgpool, self.classifier = features, avgpool, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def small_vgg(
    input_shape: Sequence[int] = (3, 16, 16),
    n_classes: int = 10,
    *,
    conv: Sequence[Any] = (8, 8, "M", 16, 16, "M"),
    dense: Sequence[int] = (32, 32),
    style: str = "cifar",
    batch_norm: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A small VGG for tests, structured like one of the real ones.

    ``style="cifar"``: :func:`cifar_vgg` with these widths (conv -> ReLU -> [pool] -> BN -> [dropout],
    BN and dropout after the first dense layer). ``style="torchvision"``: torchvision's VGG layout
    and module names (``features.0``, ``avgpool``, ``classifier.0``...): conv -> [BN] -> ReLU ->
    [max-pool], adaptive average pool, then Linear -> ReLU -> Dropout(0.5) per dense width and the
    output Linear; ``batch_norm`` switches between the ``vgg16_bn`` and ``vgg16`` patterns. Weights
    are glorot-uniform (not torchvision's init) so they come from ``generator``.
    """
    if style == "cifar":
        if batch_norm is not True:
            raise ValueError("small_vgg(style='cifar') always has batch norm (as the CIFAR VGG); "
                             "use style='torchvision' for a VGG without batch norm")
        return cifar_vgg(input_shape, n_classes, conv=conv, dense=dense, generator=generator)
    if style == "torchvision":
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm must be true or false, got {batch_norm!r}")
        return _tv_vgg(input_shape, n_classes, conv, dense, batch_norm, generator)
    raise ValueError(f"unknown small_vgg style {style!r}; use 'cifar' or 'torchvision'")


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    As in torchvision one ReLU module (``relu``, not in-place here) is applied twice, the
    convolutions have no bias, and ``downsample`` (1x1 conv with stride + BN) is present only
    when the block changes the resolution or the width.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, generator: torch.Generator | None):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, generator, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(c_out, c_out, generator, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv1x1(c_in, c_out, generator, stride=stride), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """torchvision's ResNet layout with BasicBlocks: ``conv1, bn1, relu, [maxpool], layer1.., avgpool, fc``."""

    def __init__(self, in_channels: int, n_classes: int, widths: list[int], blocks: list[int],
                 stem_pool: bool, generator: torch.Generator | None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, widths[0], generator, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2) if stem_pool else nn.Identity()
        c = widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks), 1):
            stage = [BasicBlock(c if b == 0 else width, width, 2 if (b == 0 and i > 1) else 1, generator)
                     for b in range(n_blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            c = width
        self.n_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = linear(c, n_classes, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(
    in_channels: int = 3,
    n_classes: int = 10,
    *,
    widths: Sequence[int] = (8, 16),
    blocks: Sequence[int] | None = None,
    stem_pool: bool = False,
    generator: torch.Generator | None = None,
) -> SmallResNet:
    """A small ResNet for tests, structured like torchvision's ResNet-18 (BasicBlocks, batch norm).

    A 3x3 stem convolution (no bias) -> BN -> ReLU -> [2x2 max-pool], then one stage per entry of
    ``widths`` with ``blocks[i]`` BasicBlocks (default one each); every stage after the first halves
    the resolution in its first block, whose shortcut is then a 1x1 conv (stride 2) + BN. Global
    average pool and a Linear head. Module names match torchvision (``layer2.0.downsample.0``...).
    """
    in_channels = _positive_int(in_channels, "in_channels")
    n_classes = _positive_int(n_classes, "n_classes")
    widths = _widths(widths, "widths")
    if not widths:
        raise ValueError("widths must name at least one stage, e.g. [8, 16]")
    blocks = [1] * len(widths) if blocks is None else _widths(blocks, "blocks")
    if len(blocks) != len(widths):
        raise ValueError(f"blocks {blocks} must have one entry per stage of widths {widths}")
    if not isinstance(stem_pool, bool):
        raise ValueError(f"stem_pool must be true or false, got {stem_pool!r}")
    return SmallResNet(in_channels, n_classes, widths, blocks, stem_pool, generator)


#: Architectures that ``{"type": "torchvision", "name": ...}`` builds.
TORCHVISION_NAMES = ("vgg16", "vgg19", "resnet18", "resnet50")


def torchvision_model(name: str, num_classes: int = 1000, *, generator: torch.Generator | None = None) -> nn.Module:
    """An untrained torchvision model (``weights=None``: nothing is downloaded; load weights yourself).

    torchvision is imported here, so it stays optional. Its in-place ReLUs are switched to
    non-inplace (no parameter changes). torchvision initializes from torch's global generator, so
    that is forked and seeded from ``generator`` for the build; the caller's global state is kept.
    """
    if name not in TORCHVISION_NAMES:
        raise ValueError(f"unknown torchvision architecture {name!r}; supported: {', '.join(TORCHVISION_NAMES)}")
    num_classes = _positive_int(num_classes, "num_classes")
    try:
        from torchvision import models as tv_models
    except ImportError as exc:
        raise ImportError(
            f"architecture {{'type': 'torchvision', 'name': {name!r}}} needs torchvision, which cannot be imported "
            f"({exc}); install it with: pip install 'modlens[torchvision]' (a torchvision build matching torch "
            f"{torch.__version__})"
        ) from None
    factory: Callable[..., nn.Module] = getattr(tv_models, name)
    if generator is None:
        model = factory(weights=None, num_classes=num_classes)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(weights=None, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model
