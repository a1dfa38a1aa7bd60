"""The feature-visualization test (paper, section 4.2 and appendix A.5).

For every true subcluster and each of its random controls (same layer and size), an input is
optimized to maximize the L1 norm of the set's pre-activations; for conv channels the L1 norm
of the per-channel L1 norms over space. Two coherence measures per optimized input:

* ``vis_score`` - the objective on the final image, without transforms (high = coherent);
* ``softmax_entropy`` - entropy in nats of the softmax of the model's logits on it
  (low = coherent).

All objectives of a partitioning are optimized together, as one batch of images. Each image
has its own seed, derived from ``random_state`` and its table row, from which its initial
noise and its transform parameters are drawn, and Adam is elementwise: so the batched result
equals a one-image-at-a-time optimization with the same seed (``batched=False``) up to float
summation order.

Defaults follow the paper (A.5): pixel parameterization kept in ``value_range`` by clamping
after each step, Adam, 100 steps, random jitter and scaling (``"jitter-scale"``: an integer
shift of up to 2 px and a zoom in [0.9, 1.1] per image and step, reflecting at the border).
``"lucid"`` approximates Lucid's defaults for ImageNet-sized inputs (pad 12 with the mid
value, jitter 8, scale, rotate, jitter 4) as one affine resampling that keeps the size.
``**ORIGINAL`` reproduces the original code (notes rows 7, 15, 16): Lucid's Fourier-space,
colour-decorrelated (3 channels only) parameterization through a sigmoid, 65 Adam steps at
lr 0.05, the |spatial mean| objective, subclusters of at least 3 neurons and at most 0.99 of
the layer; for ImageNet models the original used no transforms (add ``transforms="none"``).
Not reproduced: the ReLU gradient redirection of its first 16 steps (row 15).

Inputs that are not images (the paper visualizes images only; this extends it): a vector
(D,) - tabular features, an MLP's flat input - or a sequence (T, D) of continuous vectors is
optimized directly, coordinate by coordinate, with the same clamped parameterization, Adam
and value range (by default the data's range, as for images). Image transforms do not apply;
their analogue is small additive noise (2 % of the value range, fresh at every step) and, for
sequences, a random circular shift along T of up to T // 16 positions (details in
:mod:`modlens.experiments._vis_transforms`). The Fourier parameterization is for images only.
Discrete inputs (token ids) cannot be optimized by gradient: :func:`continuous_input_problem`
says why, and :func:`feature_vis_test` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from modlens.core.partition import Partition
from modlens.core.seeds import as_generator, image_seed, int_seed
from modlens.experiments.lesion_test import COLUMNS as _LESION_COLUMNS
from modlens.experiments.lesion_test import random_sets
from modlens.experiments._vis_transforms import (
    N_UNIFORMS, NEEDS_NOISE, TRANSFORMS, apply_transform, check_transforms, default_transforms, input_kind,
)
from modlens.experiments._vis_transforms import reflect_resample as _reflect_resample  # noqa: F401 (tests)
from modlens.nn import conv_weights_channels_last, device_dtype, eval_mode, prefer_channels_last, to_channels_last

PARAMETERIZATIONS = ("pixel", "fourier")
OBJECTIVES = ("l1", "spatial_mean_abs")

#: Columns of :attr:`VisResult.table`, in order: the lesion table's keys, then the metrics.
COLUMNS = _LESION_COLUMNS[:8] + ["vis_score", "softmax_entropy"]

#: Argument values reproducing the original code: ``feature_vis_test(..., **ORIGINAL)``.
#: Rows 15-16 of the notes (Fourier + decorrelated + sigmoid, 65 steps, lr 0.05,
#: sum of |spatial mean|) and row 7 (visualized subclusters: size >= 3, < 0.99 of the layer).
ORIGINAL = {
    "parameterization": "fourier", "steps": 65, "lr": 0.05, "objective": "spatial_mean_abs",
    "min_size": 3, "max_fraction": 0.99,
}

_INIT_SD = 0.01  # Lucid's initial noise (pixels: as a fraction of the value range)
# Lucid's colour decorrelation (square root of the ImageNet colour covariance), normalized.
_COLOR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0))


@dataclass
class VisResult:
    """What :func:`feature_vis_test` found.

    table:  one row per (subcluster, draw), columns :data:`COLUMNS`.
    images: the optimized inputs, shape (n_rows, *input_shape), aligned with the table rows.
    config: the arguments that produced them (JSON-able, for the run's manifest).
    """

    table: pd.DataFrame
    images: np.ndarray
    config: dict = field(default_factory=dict)

    @property
    def value_range(self) -> tuple[float, float]:
        return tuple(self.config.get("value_range", (0.0, 1.0)))


@dataclass
class _Plan:
    """Everything one optimization needs, per table row."""

    input_shape: tuple[int, ...]
    layers: np.ndarray  # (n_rows,) layer index of each objective
    neurons: list[np.ndarray]
    seeds: list[int]
    parameterization: str
    transforms: str
    objective: str
    steps: int
    lr: float
    value_range: tuple[float, float]
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None
    channels_last: bool = False


def unit_values(z: torch.Tensor, objective: str = "l1") -> torch.Tensor:
    """(B, C) per-unit objective terms of a pre-activation tensor (B, C) or (B, C, *spatial).

    ``"l1"``: |z| summed over space (the paper's L1 norm; for a Linear layer just |z|).
    ``"spatial_mean_abs"``: |mean over space of z| (the original code, notes row 16).
    """
    if z.ndim == 2:
        return z.abs()
    flat = z.flatten(2)
    return flat.abs().sum(-1) if objective == "l1" else flat.mean(-1).abs()


def subcluster_objective(z: torch.Tensor, mask: torch.Tensor, objective: str = "l1") -> torch.Tensor:
    """(B,) objective per image: the sum over the units selected by ``mask`` (B, C) of
    :func:`unit_values`. A subcluster's objective is the sum of its units' objectives."""
    return (unit_values(z, objective) * mask).sum(1)


def _fourier_scale(h: int, w: int) -> np.ndarray:
    """Lucid's 1/frequency spectrum scale (decay power 1)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + 1][None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    return 1.0 / np.maximum(freqs, 1.0 / max(w, h))


def _to_image(param: torch.Tensor, plan: _Plan, scale: torch.Tensor | None) -> torch.Tensor:
    lo, hi = plan.value_range
    if plan.parameterization == "pixel":
        return param
    _, c, h, w = (param.shape[0],) + plan.input_shape
    spectrum = torch.view_as_complex((param * scale[..., None]).contiguous())
    img = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho") / 4.0
    if c == 3:  # colour decorrelation is defined for RGB inputs only
        img = torch.einsum("bchw,dc->bdhw", img, torch.as_tensor(_COLOR, dtype=img.dtype, device=img.device))
    return lo + (hi - lo) * torch.sigmoid(img)


def _objectives(adapter, img: torch.Tensor, groups, plan: _Plan, modules: dict) -> torch.Tensor:
    x = plan.preprocess(img) if plan.preprocess is not None else img
    x = to_channels_last(x) if plan.channels_last else x
    parts = []
    for layer, sel, mask in groups:
        if layer not in modules:
            modules[layer] = adapter.values([layer])
        parts.append(subcluster_objective(modules[layer](x[sel]), mask, plan.objective))
    if all(isinstance(sel, slice) for _, sel, _ in groups):  # rows in layer order: no scatter
        return torch.cat(parts)
    obj = torch.zeros(img.shape[0], dtype=img.dtype, device=img.device)
    for (_, sel, _), part in zip(groups, parts):
        obj = obj.index_copy(0, sel, part)
    return obj


def _entropy(adapter, img: torch.Tensor, plan: _Plan, modules: dict) -> torch.Tensor:
    """Entropy (nats) of the softmax of the logits: the output layer's output, so a model that
    ends in a softmax is not normalized twice."""
    x = plan.preprocess(img) if plan.preprocess is not None else img
    x = to_channels_last(x) if plan.channels_last else x
    if "logits" not in modules:
        modules["logits"] = adapter.values([], logits=True)
    logits = modules["logits"](x)
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def _optimize(adapter, plan: _Plan, batch_indices: Sequence[int], *, history: bool = False,
              modules: dict | None = None):
    """Optimize the images of rows ``batch_indices`` together.

    Returns ``(images, scores, entropies, trace)``: images (b, C, H, W), final objective and
    softmax entropy per image, and (with ``history``) the transformed objective per step
    (steps, b). Each image's noise and transforms come from its own generator, so any batch
    gives every image the same result. ``modules`` caches the layers' pre-activation modules
    between calls.
    """
    idx = [int(i) for i in batch_indices]
    device, dtype = adapter.device, adapter.dtype
    lo, hi = plan.value_range
    gens = [torch.Generator().manual_seed(plan.seeds[i]) for i in idx]
    shape = plan.input_shape
    pshape = shape if plan.parameterization == "pixel" else shape[:2] + (shape[2] // 2 + 1, 2)  # rfft2 spectrum
    noise = torch.stack([torch.randn(pshape, generator=g, dtype=torch.float64) for g in gens])
    k = N_UNIFORMS[plan.transforms]
    u_all = torch.stack([torch.rand(plan.steps, k, generator=g, dtype=torch.float64) for g in gens])
    if plan.parameterization == "pixel":
        init = 0.5 * (lo + hi) + _INIT_SD * (hi - lo) * noise
        scale = None
    else:
        init = _INIT_SD * noise
        scale = torch.as_tensor(_fourier_scale(*plan.input_shape[-2:]), dtype=dtype, device=device)
    param = init.to(device=device, dtype=dtype).requires_grad_(True)
    layers = plan.layers[idx]
    groups = []
    for layer in np.unique(layers):
        pos = np.flatnonzero(layers == layer)
        mask = torch.zeros(pos.size, adapter.layers[layer].n_neurons, dtype=dtype, device=device)
        for r, p in enumerate(pos):
            mask[r, torch.as_tensor(plan.neurons[idx[p]])] = 1.0
        start = 0 if not groups else groups[-1][1].stop if isinstance(groups[-1][1], slice) else -1
        contiguous = pos[0] == start and pos[-1] - pos[0] + 1 == pos.size  # slices tile the batch
        sel = slice(int(pos[0]), int(pos[-1]) + 1) if contiguous else torch.as_tensor(pos, device=device)
        groups.append((int(layer), sel, mask))
    modules = {} if modules is None else modules
    trace = []
    opt = torch.optim.Adam([param], lr=plan.lr)
    with eval_mode(adapter.model), conv_weights_channels_last(adapter.model, plan.channels_last):
        for step in range(plan.steps):
            eps = None
            if plan.transforms in NEEDS_NOISE:  # drawn after the uniforms, one input at a time
                # float32: noise needs no more precision, and CPU float64 normals cost 4x as much
                eps = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
                eps = eps.to(device=device, dtype=dtype)
            img = apply_transform(_to_image(param, plan, scale), u_all[:, step].to(device), plan.transforms,
                                  plan.value_range, eps)
            obj = _objectives(adapter, img, groups, plan, modules)
            (grad,) = torch.autograd.grad(-obj.sum(), param)
            param.grad = grad
            opt.step()
            if plan.parameterization == "pixel":
                with torch.no_grad():
                    param.clamp_(lo, hi)
            if history:
                trace.append(obj.detach())
        param.grad = None
        with torch.no_grad():
            images = _to_image(param.detach(), plan, scale)
            scores = _objectives(adapter, images, groups, plan, modules)
            entropies = _entropy(adapter, images, plan, modules)
    trace_t = torch.stack(trace) if trace else torch.empty(0, len(idx), dtype=dtype)
    return images, scores, entropies, trace_t


def continuous_input_problem(adapter, example: torch.Tensor, preprocess=None, *, _modules: dict | None = None) -> str | None:
    """Why inputs like ``example`` (a batch) cannot be optimized by gradient, or ``None``.

    Feature visualization needs continuous inputs. Integer or boolean inputs (token ids) are
    refused outright; for float inputs every analysed layer's pre-activations must depend
    differentiably on the input (a model that casts its input to integers, e.g. to look up
    token ids, cuts that path). Checked on two inputs of ``example``, in eval mode.
    ``_modules`` caches the layers' pre-activation modules (shared with the optimization).
    """
    modules = {} if _modules is None else _modules
    shape = tuple(example.shape[1:])
    lead = "feature visualization needs continuous inputs"
    if not example.is_floating_point():
        return (f"{lead}: the model's inputs (shape {shape}) are {str(example.dtype).replace('torch.', '')} "
                "(token ids or other discrete values), which cannot be optimized by gradient")
    device, dtype = adapter.device, adapter.dtype
    x0 = example[:2].detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    with torch.enable_grad(), eval_mode(adapter.model):
        for layer in range(len(adapter.layers)):
            if layer not in modules:
                modules[layer] = adapter.values([layer])
            z = modules[layer](preprocess(x0) if preprocess is not None else x0)
            grad = torch.autograd.grad(z.abs().sum(), x0, allow_unused=True)[0] if z.requires_grad else None
            if grad is None:
                return (f"{lead}: layer {layer} ('{adapter.layer_names[layer]}') does not depend differentiably on "
                        f"the model's input of shape {shape} (the model turns it into integers, e.g. token ids), "
                        "so it cannot be optimized by gradient")
    return None


def _build_plan(adapter, partition: Partition, input_shape: Sequence[int], *, n_random: int = 19,
                steps: int = 100, lr: float = 0.05, random_state=0, parameterization: str = "pixel",
                transforms: str | None = None, objective: str = "l1", value_range=(0.0, 1.0),
                preprocess=None, min_size: int = 2, max_fraction: float | None = None,
                name: str | None = None) -> tuple[_Plan, list[tuple], int]:
    """Validate the arguments; draw the random sets and the per-image seeds.
    Returns ``(plan, table rows, image seed base)``."""
    for arg, value, choices in [("parameterization", parameterization, PARAMETERIZATIONS),
                                ("objective", objective, OBJECTIVES)]:
        if value not in choices:
            raise ValueError(f"{arg} must be one of {choices}, got {value!r}")
    input_shape = tuple(int(s) for s in input_shape)
    kind = input_kind(input_shape)
    transforms = default_transforms(input_shape) if transforms is None else transforms
    check_transforms(transforms, input_shape)
    if parameterization == "fourier" and kind != "image":
        raise ValueError(
            f"parameterization='fourier' applies to images (C, H, W) only; {kind} inputs of shape {input_shape} "
            "are optimized directly: use parameterization='pixel'"
        )
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if list(partition.layer_sizes) != list(adapter.layer_sizes):
        raise ValueError(
            f"the partition has layers of sizes {list(partition.layer_sizes)} but the model's hidden "
            f"layers ({', '.join(adapter.layer_names)}) have sizes {list(adapter.layer_sizes)}"
        )
    rng = as_generator(random_state)
    name = name or partition.method
    rows, neurons = [], []
    for sc in partition.subclusters(min_size=min_size, max_fraction=max_fraction):  # lesion-test order
        width = adapter.layers[sc.layer].n_neurons
        for draw, members in enumerate([sc.neurons] + random_sets(width, sc.size, n_random, rng)):
            neurons.append(np.asarray(members))
            rows.append((name, sc.layer, sc.layer_name, sc.cluster, sc.size,
                         "true" if draw == 0 else "random", draw, ",".join(map(str, members))))
    base = int_seed(rng)
    plan = _Plan(input_shape, np.array([r[1] for r in rows], dtype=np.int64), neurons,
                 [image_seed(base, i) for i in range(len(rows))], parameterization, transforms,
                 objective, int(steps), float(lr), (lo, hi), preprocess)
    return plan, rows, base


def feature_vis_test(
    adapter,
    partition: Partition,
    input_shape: Sequence[int],
    *,
    n_random: int = 19,
    steps: int = 100,
    lr: float = 0.05,
    random_state=0,
    parameterization: str = "pixel",
    transforms: str | None = None,
    objective: str = "l1",
    value_range: tuple[float, float] = (0.0, 1.0),
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    min_size: int = 2,
    max_fraction: float | None = None,
    batched: bool = True,
    batch_size: int | None = None,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
    channels_last: bool | None = None,
) -> VisResult:
    """Visualize every true subcluster of ``partition`` and ``n_random`` random sets each.

    ``input_shape`` is one input's (C, H, W) for images, (T, D) for sequences or (D,) for
    vectors; ``transforms`` defaults to :func:`default_transforms` of it (jitter and scaling for
    images, additive noise for vectors, noise and a shift along T for sequences). Inputs must
    be continuous (see :func:`continuous_input_problem`): ValueError otherwise.
    ``preprocess`` (the model's own preprocessing, e.g. normalization) is applied to every
    input before the model and must act on each input separately. Random sets are drawn as :func:`~modlens.experiments.lesion_test.lesion_test`
    draws them, so the same ``random_state`` gives the same controls. ``batched=False``
    optimizes one image at a time (the reference path); ``batch_size`` caps the images per
    optimization (results do not depend on it). ``progress`` is called with the number of
    images finished. Row 0 of each subcluster (``draw`` 0) is the true subcluster.
    ``channels_last`` runs the conv layers in the NHWC layout (weights converted for the duration
    of the optimization); ``None``: on the CPU for models with a 2-D conv (faster with oneDNN; the
    same values up to float rounding).
    """
    plan, rows, base = _build_plan(
        adapter, partition, input_shape, n_random=n_random, steps=steps, lr=lr, random_state=random_state,
        parameterization=parameterization, transforms=transforms, objective=objective,
        value_range=value_range, preprocess=preprocess, min_size=min_size, max_fraction=max_fraction, name=name)
    lo, hi = plan.value_range
    device = device_dtype(adapter.model)[0]
    plan.channels_last = bool(prefer_channels_last(adapter.model, device) if channels_last is None else channels_last)
    modules: dict = {}
    problem = continuous_input_problem(adapter, torch.full((1,) + plan.input_shape, 0.5 * (lo + hi)), preprocess,
                                       _modules=modules)
    if problem is not None:
        raise ValueError(problem)
    n = len(rows)
    if not batched:
        chunks = [[i] for i in range(n)]
    else:
        size = max(1, n if batch_size is None else int(batch_size))
        chunks = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    images, scores, entropies = [], [], []
    for chunk in chunks:
        img, sc, ent, _ = _optimize(adapter, plan, chunk, modules=modules)
        images.append(img.cpu().numpy())
        scores.append(sc.cpu().numpy())
        entropies.append(ent.cpu().numpy())
        if progress is not None:
            progress(len(chunk))
    table = pd.DataFrame(rows, columns=COLUMNS[:8])
    table["vis_score"] = np.concatenate(scores) if n else np.zeros(0)
    table["softmax_entropy"] = np.concatenate(entropies) if n else np.zeros(0)
    config = {
        "partitioning": name or partition.method, "input_shape": list(plan.input_shape),
        "n_random": int(n_random), "steps": int(steps), "lr": float(lr),
        "random_state": int(random_state) if isinstance(random_state, (int, np.integer)) else None,
        "image_seed_base": base,
        "parameterization": parameterization, "transforms": plan.transforms, "objective": objective,
        "value_range": list(plan.value_range), "min_size": int(min_size), "max_fraction": max_fraction,
        "preprocess": getattr(preprocess, "__name__", repr(preprocess)) if preprocess else None,
    }
    empty = np.zeros((0,) + plan.input_shape, dtype=np.float32)
    return VisResult(table, np.concatenate(images) if n else empty, config)


__all__ = ["feature_vis_test", "VisResult", "ORIGINAL", "COLUMNS", "TRANSFORMS", "subcluster_objective", "unit_values",
           "continuous_input_problem", "default_transforms"]
