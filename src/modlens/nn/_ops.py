"""Where a layer's channels sit downstream (:class:`Route`) and where they stop being
followed (:class:`Sink`); see :mod:`modlens.nn._structure` and, for which operations are
followed, :mod:`modlens.nn._registry`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from torch import fx


class UnsupportedModelError(ValueError):
    """The model contains a layer or a connection modlens cannot analyse (yet)."""


@dataclass(frozen=True)
class Route:
    """Where channel ``c`` of a layer sits in dimension ``dim`` of a value downstream of it.

    Before a flatten, channel ``c`` is index ``offset + c`` of dimension ``dim`` (1 for
    channels-first values, the last for channels-last ones). After a flatten of a value with
    ``channels`` channels, channel-major (PyTorch's order), it owns the ``P`` consecutive
    features ``(offset + c) * P ... (offset + c + 1) * P - 1`` with ``P = width / channels``.

    After a channel split, slice or narrow (weight walks only) a value carries some of the
    layer's channels: ``sources = (lo, hi)`` says that channels ``lo <= c < hi`` reach it (the
    others are not in it), ``None`` that all do. After a channel shuffle (weight walks only) the
    channels are no longer consecutive: ``positions[c]`` is the index of channel ``c`` (-1 where
    it is absent), and ``offset`` and ``sources`` are unused.
    """

    offset: int = 0
    channels: int | None = None
    flat: bool = False
    ndim: int = 2  # number of dimensions of the value (4 for conv2d maps, 2 for (batch, features))
    dim: int = 1   # the dimension holding the channels
    sources: tuple | None = None  # (lo, hi): the layer channels this value carries (None: all)
    positions: tuple | None = None  # after a channel shuffle: the index of each layer channel (-1: absent)

    @property
    def spatial(self) -> bool:
        return self.ndim > 2

    @property
    def channels_last(self) -> bool:
        return self.ndim > 2 and self.dim == self.ndim - 1

    def carried(self, neurons: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``neurons`` this value carries (all but those a split cut off)."""
        neurons = np.asarray(neurons, dtype=np.int64)
        if self.positions is not None:
            return np.asarray(self.positions, dtype=np.int64)[neurons] >= 0
        if self.sources is None:
            return np.ones(neurons.shape, dtype=bool)
        return (neurons >= self.sources[0]) & (neurons < self.sources[1])

    def explicit(self, n_source: int) -> "Route":
        """The same route with ``positions`` for the ``n_source`` channels of the layer."""
        if self.positions is not None:
            return self
        c = np.arange(n_source)
        pos = np.where(self.carried(c), self.offset + c, -1)
        return Route(0, self.channels, self.flat, self.ndim, self.dim, None, tuple(int(p) for p in pos))

    def moved(self, fn) -> "Route":
        """The route after channel index ``j`` moved to ``fn(j)`` (needs ``positions``)."""
        return replace(self, positions=tuple(int(fn(p)) if p >= 0 else -1 for p in self.positions))

    def shifted(self, k: int) -> "Route":
        """The route with every channel ``k`` places further (a concatenation)."""
        if self.positions is not None:
            return self.moved(lambda p: p + k)
        return replace(self, offset=self.offset + k)

    def sliced(self, start: int, stop: int, n_source: int | None = None) -> "Route | None":
        """The route in the part ``start:stop`` of the channel dimension (None: no channel of the
        layer, of ``n_source`` channels, is in it)."""
        if self.positions is not None:
            pos = tuple(p - start if start <= p < stop else -1 for p in self.positions)
            return replace(self, positions=pos) if any(p >= 0 for p in pos) else None
        lo, hi = max(start - self.offset, 0), stop - self.offset
        if n_source is not None:
            hi = min(hi, n_source)
        if self.sources is not None:
            lo, hi = max(lo, self.sources[0]), min(hi, self.sources[1])
        if hi <= lo:
            return None
        return Route(self.offset - start, self.channels, self.flat, self.ndim, self.dim, (lo, hi))

    def indices(self, neurons: np.ndarray, width: int, where: str = "") -> np.ndarray:
        """Indices along the channel dimension, in a value of ``width`` entries there, of the given
        channels (those this value carries: see ``sources``)."""
        neurons = np.asarray(neurons, dtype=np.int64)
        if self.positions is not None:
            at = np.asarray(self.positions, dtype=np.int64)[neurons]
            at = at[at >= 0]
        else:
            if self.sources is not None:
                neurons = neurons[self.carried(neurons)]
            at = self.offset + neurons
        if not self.flat:
            return at
        if not self.channels or width % self.channels:
            raise UnsupportedModelError(
                f"{where} reads a flattened value of {width} features that is not a whole number of "
                f"features per channel ({self.channels} channels were flattened)"
            )
        p = width // self.channels
        return (at[:, None] * p + np.arange(p)).ravel()


@dataclass(frozen=True)
class Sink:
    """A place where a layer's channels stop being followed: ``value`` enters ``user``.

    ``kind`` is ``"layer"`` (a weight layer reads the channels) or ``"mask"`` (an operation that
    mixes channels per sample or sums branches: residual addition, normalization, gate). In
    weight walks, ``scales`` lists the per-channel scales passed on the way, as
    ``(node, route at that node)`` pairs (batch norms, normalizations, layer scales)."""

    kind: str
    value: fx.Node
    user: fx.Node
    route: Route
    scales: tuple = ()
