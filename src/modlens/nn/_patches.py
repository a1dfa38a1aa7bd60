"""Patch unfolding and folding (``F.unfold``/``F.fold``, ATen ``im2col``/``col2im``; pixel unshuffle and
shuffle) on a layer's path.

With kernel == stride, no padding and dilation 1 the patches do not overlap: unfolding a
``(B, C, H, W)`` map gives ``(B, C * K, L)`` (``K = kh * kw`` pixels per patch, ``L`` patches),
where channel ``c`` owns the ``K`` consecutive rows ``c * K ... (c + 1) * K - 1``, each row one
input position of channel ``c``. That is a channel-major flattening of ``(C, K)``
(:class:`~modlens.nn._ops.Route` with ``flat=True``), and folding is its inverse. The reshapes
that MobileViT-V2 puts around them, ``(B, C * K, L)`` to ``(B, C, K, L)`` and back, split and merge
the channel dimension with the dimension right after it (:func:`reshape_route`). Every value on
the way keeps one input value per position of the same channel, so a lesion carries through
and the weight walk follows the channels unchanged.

``F.pixel_unshuffle(x, r)`` and ``F.pixel_shuffle(x, r)`` are the same rearrangement with ``K = r * r``
and the patches laid out as a ``(H / r, W / r)`` grid (timm's exportable MobileViT-V2 folds this way).

Overlapping patches (kernel > stride), padding or dilation copy a position into several patches
(and folding sums them): refused in one line.
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx, nn

from modlens.nn._ops import Route, UnsupportedModelError


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if v else (0, 0)
    return int(v), int(v)


def patch_settings(node: fx.Node, module: nn.Module | None) -> dict:
    """kernel, dilation, padding and stride (each (h, w)) of an unfold or fold node."""
    if isinstance(module, (nn.Unfold, nn.Fold)):
        raw = {k: getattr(module, k) for k in ("kernel_size", "dilation", "padding", "stride")}
    else:
        args, kw = list(node.args), node.kwargs
        first = 2 if is_fold(node, module) else 1   # fold(input, output_size, kernel_size, ...)
        names = ("kernel_size", "dilation", "padding", "stride")
        defaults = (None, 1, 0, 1)
        raw = {k: kw.get(k, args[first + i] if len(args) > first + i else d)
               for i, (k, d) in enumerate(zip(names, defaults))}
    return {k: _pair(v) for k, v in raw.items()}


def is_fold(node: fx.Node, module) -> bool:
    if isinstance(module, nn.Fold):
        return True
    name = getattr(node.target, "__name__", str(node.target))
    return "col2im" in name or name == "fold"


def _check_disjoint(structure, start: fx.Node, user: fx.Node, module) -> tuple[int, int]:
    s = patch_settings(user, module)
    if s["kernel_size"] == s["stride"] and s["padding"] == (0, 0) and s["dilation"] == (1, 1):
        return s["kernel_size"]
    what = "folds" if is_fold(user, module) else "unfolds"
    raise UnsupportedModelError(
        f"{structure.describe(user)} {what} the channels of layer '{start.target}' with overlapping or spaced "
        f"patches (kernel {s['kernel_size']}, stride {s['stride']}, padding {s['padding']}, dilation "
        f"{s['dilation']}): such patches copy a position into several patches (or sum them when folded); modlens "
        "follows patches with kernel == stride, no padding and dilation 1, a rearrangement of positions")


def is_pixel_shuffle(node: fx.Node, module) -> bool:
    return isinstance(module, (nn.PixelShuffle, nn.PixelUnshuffle)) or "pixel_" in getattr(
        node.target, "__name__", str(node.target))


def _pixels(structure, start: fx.Node, user: fx.Node, module) -> int:
    """``K``, the pixels per patch: ``kh * kw`` of a non-overlapping unfold/fold, ``r * r`` of a pixel
    (un)shuffle (which moves ``r x r`` blocks of one channel into ``r * r`` channels and back)."""
    if is_pixel_shuffle(user, module):
        if module is not None:
            r = getattr(module, "upscale_factor", getattr(module, "downscale_factor", None))
        else:
            r = user.kwargs.get("upscale_factor", user.kwargs.get("downscale_factor",
                                                                   user.args[1] if len(user.args) > 1 else None))
        return int(r) * int(r)
    kh, kw = _check_disjoint(structure, start, user, module)
    return kh * kw


def unfold_route(structure, start: fx.Node, user: fx.Node, route: Route) -> Route:
    """The route after unfolding: channel ``c`` owns the ``K`` rows ``c * K ...`` (a channel-major flatten);
    also after a pixel unshuffle, whose ``(B, C * r * r, H / r, W / r)`` result has the same order."""
    module = structure.module(user) if user.op == "call_module" else None
    _pixels(structure, start, user, module)
    if route.flat or route.dim != 1 or route.ndim != 4:
        raise UnsupportedModelError(
            f"{structure.describe(user)} unfolds a flattened or channels-last value after layer '{start.target}'; "
            "modlens follows patch unfolding of (B, C, H, W) maps with the channels in dimension 1")
    channels = structure.channels(user.args[0])
    if channels is None:
        raise UnsupportedModelError(f"cannot tell how many channels {structure.describe(user)} unfolds after layer "
                                    f"'{start.target}' (capture the model at an example input: pass data)")
    return replace(route, flat=True, channels=channels, ndim=4 if is_pixel_shuffle(user, module) else 3, dim=1)


def fold_route(structure, start: fx.Node, user: fx.Node, route: Route, mode: str) -> Route | None:
    """The route after folding patches back into a map, or None where a lesion has to be recomputed
    from the fold on (rows of one channel that come from different channels of the layer)."""
    module = structure.module(user) if user.op == "call_module" else None
    k = _pixels(structure, start, user, module)
    width = structure.channels(user.args[0])
    if route.dim != 1 or route.ndim != (4 if is_pixel_shuffle(user, module) else 3) or width is None:
        raise UnsupportedModelError(
            f"{structure.describe(user)} folds a value of layer '{start.target}' that is not (B, C * K, L) (or "
            "(B, C * K, H, W) for a pixel shuffle) with the layer's channels in dimension 1")
    if route.flat:
        if not route.channels or route.channels * k != width:
            raise UnsupportedModelError(
                f"{structure.describe(user)} folds patches of {k} pixels from a value of {width} rows in which each "
                f"channel of layer '{start.target}' owns {width // max(route.channels or 1, 1)} rows; modlens follows "
                "folds whose patches hold the pixels of one channel")
        return replace(route, flat=False, ndim=4, dim=1)
    if mode == "lesion":   # row r of the layer becomes some positions of channel r // K: recomputed
        return None
    return replace(route.explicit(structure.layer_route(start).channels).moved(lambda p: p // k), ndim=4, dim=1)


def reshape_route(structure, user: fx.Node, route: Route) -> Route | None:
    """The route after a reshape of a value whose channels are in dimension 1, when every channel
    keeps one contiguous block of that dimension: merged with the dimensions after it, channel-major
    (``(B, C, K, L)`` to ``(B, C * K, L)`` or ``(B, C * K, h, w)``: a flat route, ``C * m`` rows), or a
    flat route's blocks split back out (``(B, C * K, L)`` to ``(B, C, K, L)``: a value's per-sample
    memory is channel-major, so dimension 1 of size ``C`` after any reshape holds channel ``c`` at ``c``).
    None for any other reshape."""
    shape_in, shape_out = structure.shapes.get(user.args[0]), structure.shapes.get(user)
    if shape_in is None or shape_out is None or route.dim != 1 or not shape_in or len(shape_out) < 2:
        return None
    shape_in, shape_out = tuple(int(s) for s in shape_in), tuple(int(s) for s in shape_out)
    if route.ndim != len(shape_in) + 1:
        return None
    if route.flat:
        if route.channels and shape_out[0] == route.channels:
            return replace(route, flat=False, ndim=len(shape_out) + 1)
        return None
    c = shape_in[0]
    if shape_out[0] > c and shape_out[0] % c == 0:
        return replace(route, flat=True, channels=c, ndim=len(shape_out) + 1)
    return None


def expand_route(structure, start: fx.Node, user: fx.Node, route: Route) -> Route:
    """The route after ``expand``/``expand_as``/``repeat`` that broadcasts or repeats other dimensions than
    the channels (MobileViT-V2's context vector over the patches, SwiftFormer's pooled queries over the
    tokens); one that changes the channel dimension is refused."""
    shape_in, shape_out = structure.shapes.get(user.args[0]), structure.shapes.get(user)
    if shape_in is None or shape_out is None or route.flat or len(shape_in) != len(shape_out) or \
            int(shape_in[route.dim - 1]) != int(shape_out[route.dim - 1]):
        raise UnsupportedModelError(
            f"{structure.describe(user)} repeats or moves the channels of layer '{start.target}': it broadcasts the "
            f"channel dimension (shape {shape_in} to {shape_out}), or its shapes were not captured; modlens follows "
            "expand, expand_as and repeat along the other dimensions only")
    return route

