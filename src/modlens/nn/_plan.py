"""How to evaluate lesions of one neuron layer incrementally (paper section 4.1).

A lesioned channel contributes nothing downstream: its value is zeroed at every sink (see
:mod:`modlens.nn._structure`). Nothing before the sinks changes, so a :class:`LesionPlan`
cuts the model's graph there:

* a *correction* for every consumer layer: its cached output minus the low-rank term of the
  removed input channels, ``conv(u[:, S], W[:, S])`` (or ``u[:, S] @ W[:, S].T``), many sets
  at once through a grouped convolution (or a batched matrix product);
* a *mask* for every value entering an operation that is recomputed (a residual addition, a
  normalization, a gate, a grouped conv, a per-position Linear): the cached value with the
  channels zeroed;
* the *frontier*: cached values the rest of the network needs that the lesion does not
  change (the skip branch of a residual block);
* an *inner mask* for every sink whose value the lesion also changes through another sink (a
  concatenation of ``x`` with ``f(x)``, as in DenseNet, DLA or Inception: ``x`` reaches a later
  layer directly and through ``f``). That value cannot come from the cache, so the tail
  recomputes it and zeroes the lesioned channels on its edges into the sink's users.

The *probe* computes all of these from the input; the *tail* computes the output from them,
re-running only the operations that depend on the lesion. A value whose batch is not its first
dimension (a time-major ``(T, B, C)`` stream: XLNet) is cached batch first and moved back for the tail
(:func:`time_major`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from modlens.nn import _fx
from modlens.nn._layout import channels_last
from modlens.nn._structure import Route, Structure, UnsupportedModelError


def channel_mask(value: torch.Tensor, keep: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``value`` with dimension ``dim`` multiplied by ``keep`` (1 = kept, 0 = lesioned)."""
    shape = [1] * value.dim()
    shape[dim] = -1
    return value * keep.view(shape)


def incremental(module: nn.Module, route: Route) -> bool:
    """Whether a lesion's effect on ``module``'s output can be subtracted as a low-rank term
    (dense Linear, ungrouped conv); otherwise its input is masked and it is recomputed."""
    if isinstance(module, nn.Linear):
        return route.ndim == 2
    return module.groups == 1


def _indices(routes: list[Route], sets: np.ndarray, width: int, where: str) -> np.ndarray:
    """(n_sets, k) dimension-1 indices that the channels of each set occupy in a value of ``width``."""
    return np.stack([np.concatenate([r.indices(s, width, where) for r in routes]) for s in sets])


@dataclass
class Correction:
    """A consumer layer that reads the lesioned channels through ``routes``."""

    consumer: fx.Node
    module: nn.Module
    value: fx.Node
    routes: list[Route]

    @property
    def width(self) -> int:
        m = self.module
        return m.in_features if isinstance(m, nn.Linear) else m.in_channels

    def indices(self, sets: np.ndarray) -> np.ndarray:
        return _indices(self.routes, sets, self.width, f"layer '{self.consumer.target}'")

    def delta(self, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Change of the consumer's output, (B, c, ...), when the input entries ``idx`` (B, k)
        of ``u`` (c, ...) are zeroed: the low-rank term that is subtracted."""
        m = self.module
        w = m.weight.detach()
        n_sets, k = idx.shape
        if isinstance(m, nn.Linear):
            u_sel = u[:, idx].permute(1, 0, 2)                       # (B, c, k)
            w_sel = w[:, idx].permute(1, 2, 0)                       # (B, k, out)
            return torch.bmm(u_sel, w_sel)
        c = u.shape[0]
        u_sel = u[:, idx.reshape(-1)]                                 # (c, B*k, *spatial)
        if channels_last(u):  # indexing gives NCHW; the conv runs in u's layout (oneDNN's fast one)
            u_sel = u_sel.contiguous(memory_format=torch.channels_last)
        w_sel = w[:, idx].transpose(0, 1).reshape(n_sets * w.shape[0], k, *w.shape[2:])
        padding = m.padding
        if m.padding_mode != "zeros":
            u_sel = F.pad(u_sel, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = 0
        conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
        out = conv(u_sel, w_sel, None, m.stride, padding, m.dilation, n_sets)   # (c, B*out, ...)
        return out.reshape(c, n_sets, w.shape[0], *out.shape[2:]).transpose(0, 1)


@dataclass
class Mask:
    """A value carrying the lesioned channels into operations that are recomputed: residual
    additions, normalizations, gates, grouped convs and per-position Linears."""

    value: fx.Node
    routes: list[Route]
    joins: list[fx.Node] = field(default_factory=list)


class LesionPlan:
    """Probe, corrections, masks and tail for lesions of one neuron layer."""

    def __init__(self, gm: fx.GraphModule, structure: Structure, layer: fx.Node):
        self.layer = layer
        self.structure = structure
        corrections: dict[fx.Node, Correction] = {}
        masks: dict[fx.Node, Mask] = {}
        inner: dict[fx.Node, Mask] = {}
        sinks = structure.sinks[layer]
        users = {sink.user for sink in sinks}
        reached_twice = {v: bool(_fx.ancestors([v], set()) & users) for v in {sink.value for sink in sinks}}
        for sink in sinks:
            if reached_twice[sink.value]:   # the lesion changes this value through another sink too
                m = inner.setdefault(sink.value, Mask(sink.value, []))
                if sink.route not in m.routes:
                    m.routes.append(sink.route)
                if sink.user not in m.joins:
                    m.joins.append(sink.user)
            elif sink.kind == "layer" and incremental(structure.module(sink.user), sink.route):
                c = corrections.setdefault(sink.user, Correction(sink.user, structure.module(sink.user), sink.value, []))
                if sink.route not in c.routes:
                    c.routes.append(sink.route)
            else:
                m = masks.setdefault(sink.value, Mask(sink.value, []))
                if sink.route not in m.routes:
                    m.routes.append(sink.route)
                if sink.user not in m.joins:
                    m.joins.append(sink.user)
        self.corrections = list(corrections.values())
        self.masks = list(masks.values())
        self.inner = list(inner.values())
        for m in self.masks + self.inner:
            if len({r.dim for r in m.routes}) != 1:
                raise UnsupportedModelError(f"layer '{layer.target}' reaches '{m.value.name}' along two dimensions")
        self.cuts = [c.consumer for c in self.corrections] + [m.value for m in self.masks]
        output = structure.output
        self.frontier, self.tail_nodes = self._frontier(output)
        probe_outputs = []
        for n in [c.value for c in self.corrections] + self.cuts + self.frontier:
            if n not in probe_outputs:
                probe_outputs.append(n)
        self.probe_outputs = probe_outputs
        self.batch_dims = time_major(structure, layer, probe_outputs, self.corrections, self.inner)
        self.probe = _fx.extract(gm, [structure.input], probe_outputs, clone_outputs=True)
        edges = [(m.value, m.joins, _edge_mask, (m.routes[0].dim,)) for m in self.inner]
        self.tail = _fx.extract(gm, self.cuts + self.frontier, [output], edges=edges)
        pool_before_relu(self.tail)

    def _frontier(self, output: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
        """Unchanged values the tail needs, and the nodes the tail recomputes."""
        stop = set(self.cuts)
        needed = _fx.ancestors([output], stop)
        affected = _fx.descendants(self.cuts, within=needed)
        if output not in affected and output not in stop:
            raise UnsupportedModelError(f"the model output does not depend on layer '{self.layer.target}'")
        pull = set(affected)
        frontier: set[fx.Node] = set()
        todo = list(pull)
        while todo:
            node = todo.pop()
            for a in node.all_input_nodes:
                if a in pull or a in stop or a in frontier:
                    continue
                if (a.op == "get_attr" or self.structure.is_shape(a) or a not in self.structure.dynamic
                        or self._sized_only(a)):
                    pull.add(a)          # parameters and sizes are recomputed by the tail
                    todo.append(a)
                else:
                    frontier.add(a)
        order = {n: i for i, n in enumerate(output.graph.nodes)}
        return sorted(frontier, key=order.__getitem__), pull

    def _sized_only(self, node: fx.Node) -> bool:
        """A value computed from the input's sizes only, not its data, whose first dimension is not the
        batch (Swin's shifted-window attention mask, expanded to batch x windows): the tail recomputes it
        for its stacked batch, as it recomputes sizes, instead of caching it per sample."""
        s = self.structure
        if node in s.data_dependent:
            return False
        val, first = node.meta.get("val"), s.input.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(first, torch.Tensor) or val.dim() == 0:
            return False
        return str(val.shape[0]) != str(first.shape[0])

    # ----- evaluation ----------------------------------------------------------------------------
    def indices(self, sets: np.ndarray, shapes: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per correction and per mask, (n_sets, k) index arrays of the lesioned entries."""
        corr = [c.indices(sets) for c in self.corrections]
        mask = [_indices(m.routes, sets, shapes[m.value][m.routes[0].dim - 1], f"'{m.joins[0].name}'")
                for m in self.masks + self.inner]
        return corr, mask

    def tail_inputs(self, cached: dict, corr_idx: list[torch.Tensor], mask_idx: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs of the tail for B sets at once, each (B * c, ...): sets are stacked in the batch;
        then the (B, k) lesioned indices of each inner mask."""
        n_sets = (corr_idx or mask_idx)[0].shape[0]
        inner_idx = mask_idx[len(self.masks):]
        mask_idx = mask_idx[:len(self.masks)]
        inputs = []
        for c, idx in zip(self.corrections, corr_idx):
            z = cached[c.consumer]
            z_new = torch.sub(z.unsqueeze(0), c.delta(cached[c.value], idx), out=_stacked(z, n_sets))
            inputs.append(z_new.reshape(-1, *z.shape[1:]))
        for m, idx in zip(self.masks, mask_idx):
            v = cached[m.value]
            dim = m.routes[0].dim + int(m.routes[0].dim < self.batch_dims.get(m.value, 0))   # cached batch first
            masked = torch.mul(v.unsqueeze(0), _keep(v, idx, dim), out=_stacked(v, n_sets))
            inputs.append(masked.reshape(-1, *v.shape[1:]))
        for f in self.frontier:  # always a copy: the tail may modify its inputs in place
            v = cached[f]
            inputs.append(_stacked(v, n_sets).copy_(v.unsqueeze(0).expand(n_sets, *v.shape)).reshape(-1, *v.shape[1:]))
        if self.batch_dims:   # time-major values go back to their own layout, the stacked sets in their batch
            inputs = [v.movedim(0, self.batch_dims[n]).contiguous() if n in self.batch_dims else v
                      for n, v in zip(self.cuts + self.frontier, inputs)]
        return inputs + list(inner_idx)

    # ----- sizes and costs (per sample) -------------------------------------------------------------
    def _numel(self, shapes: dict, node: fx.Node) -> int:
        """Elements per sample (``shapes`` drops the first dimension; a time-major value drops its batch)."""
        if self.batch_dims:
            d = batch_dim(self.structure, node)
            shape = node.meta["val"].shape if d else ()
            if d and all(isinstance(x, int) for i, x in enumerate(shape) if i != d):
                return math.prod(x for i, x in enumerate(shape) if i != d)
        return _numel(shapes, node)

    def cache_elements(self, shapes: dict) -> int:
        return sum(self._numel(shapes, n) for n in self.probe_outputs)

    def work_elements(self, shapes: dict) -> int:
        """Elements held per (set, sample) while a block runs: tail inputs, the gathered
        consumer inputs, and the two largest values the tail computes."""
        sizes = sorted((self._numel(shapes, n) for n in self.tail_nodes), reverse=True)[:2]
        gathered = sum(self._numel(shapes, c.value) for c in self.corrections)
        return sum(self._numel(shapes, n) for n in self.cuts + self.frontier) + gathered + sum(sizes)

    def weight_elements(self, set_size: int) -> int:
        """Consumer weights gathered per lesion set (the columns or kernel slices it removes)."""
        total = 0
        for c in self.corrections:
            k = sum(len(r.indices(np.arange(set_size), c.width)) for r in c.routes)
            total += c.module.weight[:, :1].numel() * k
        return total

    def macs(self, shapes: dict, set_size: int) -> dict[str, int]:
        """Multiply-accumulates per sample: ``probe`` (filling the cache), ``lesion`` (one
        lesion of ``set_size`` channels: corrections and tail) and ``forward`` (the whole model)."""
        s = self.structure
        forward = sum(layer_macs(s.module(n), shapes, n) for n in s.all_nodes)
        probe_nodes = _fx.ancestors(self.probe_outputs, set()) | set(self.probe_outputs)
        probe = sum(layer_macs(s.module(n), shapes, n) for n in s.all_nodes if n in probe_nodes)
        tail = sum(layer_macs(s.module(n), shapes, n) for n in s.all_nodes if n in self.tail_nodes)
        corr = 0
        for c in self.corrections:
            k = sum(len(r.indices(np.arange(set_size), c.width)) for r in c.routes)
            per_input = layer_macs(c.module, shapes, c.consumer) / c.width
            corr += int(per_input * k)
        return {"probe": probe, "lesion": corr + tail, "forward": forward}


_RELUS = (torch.relu, F.relu, torch.ops.aten.relu.default)
_MAX_POOLS = (F.max_pool2d, torch.max_pool2d, torch.ops.aten.max_pool2d.default)


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return type(m) is nn.ReLU and not m.inplace
    return n.op == "call_function" and n.target in _RELUS and len(n.args) == 1 and not n.kwargs


def _is_max_pool(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return type(m) is nn.MaxPool2d and not m.return_indices
    return (n.op == "call_function" and n.target in _MAX_POOLS and not n.kwargs.get("return_indices", False)
            and not (n.target is F.max_pool2d and len(n.args) > 6 and n.args[6]))


def pool_before_relu(gm: fx.GraphModule) -> int:
    """Rewrite ``max_pool2d(relu(x))`` as ``relu(max_pool2d(x))`` where the ReLU feeds only the pool:
    the same values exactly (ReLU is monotone, so it commutes with a maximum), with the ReLU on the
    pooled value, a quarter of the size. Returns the number of rewrites."""
    count = 0
    for pool in list(gm.graph.nodes):
        if not _is_max_pool(gm, pool) or not pool.args or not isinstance(pool.args[0], fx.Node):
            continue
        relu = pool.args[0]
        if not _is_relu(gm, relu) or len(relu.users) != 1:
            continue
        with gm.graph.inserting_after(pool):
            after = gm.graph.node_copy(relu, lambda a: pool)
        pool.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)
        pool.replace_input_with(relu, relu.args[0])
        gm.graph.erase_node(relu)
        count += 1
    if count:
        gm.recompile()
    return count


def batch_dim(s, node: fx.Node) -> int | None:
    """The dimension of ``node``'s value that is the batch in the exported graph (its symbolic size is
    the input's first one), when exactly one is; None otherwise (no recorded value, or a batch folded
    with windows or heads)."""
    val, first = node.meta.get("val"), s.input.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(first, torch.Tensor) or first.dim() == 0:
        return None
    dims = [i for i, size in enumerate(val.shape) if str(size) == str(first.shape[0])]
    return dims[0] if len(dims) == 1 else None


def time_major(s, layer: fx.Node, probe_outputs: list, corrections: list, inner: list) -> dict:
    """Probe outputs whose batch is not their first dimension (a time-major ``(T, B, C)`` stream, as
    in XLNet), by node: their batch dimension. The cache holds them batch first and the tail gets them
    back in their own layout; refused where a correction, an inner mask or the output would need it."""
    dims = {n: d for n in probe_outputs if (d := batch_dim(s, n))}
    special = [c.value for c in corrections] + [c.consumer for c in corrections] + [m.value for m in inner]
    bad = next((n for n in special if n in dims), None)
    if dims and (bad is not None or batch_dim(s, s.output) not in (0, None)):
        where = f"'{bad.name}'" if bad is not None else "the model output"
        raise UnsupportedModelError(
            f"lesions of layer '{layer.target}': {where} keeps the batch in another dimension than the first "
            "(a time-major value) where modlens subtracts or masks a lesion incrementally; modlens recomputes "
            "time-major values only through masks of per-position layers and residual additions")
    return dims


def _edge_mask(value: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``value`` (B * N, ...), B lesion sets stacked in the batch, with the entries ``idx[b]``
    (B, k) of dimension ``dim`` zeroed for set ``b``."""
    return (value.unflatten(0, (idx.shape[0], -1)) * _keep(value, idx, dim)).flatten(0, 1)


def _keep(value: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 1, ..., c, ..., 1): per set, ones over dimension ``dim`` of ``value`` (c entries) but zeros
    at that set's ``idx`` row (B, k); broadcasts against ``value`` with the sets in front."""
    n_sets, width = idx.shape[0], value.shape[dim]
    keep = torch.ones(n_sets, width, dtype=value.dtype, device=value.device).scatter_(1, idx, 0.0)
    shape = [n_sets] + [1] * value.dim()
    shape[1 + dim] = width
    return keep.view(shape)


def _stacked(v: torch.Tensor, n_sets: int) -> torch.Tensor:
    """An empty (n_sets, *v.shape) tensor whose (n_sets * N, ...) reshape is a view in ``v``'s layout."""
    if channels_last(v):
        n, c, h, w = v.shape
        return v.new_empty((n_sets, n, h, w, c)).permute(0, 1, 4, 2, 3)
    return v.new_empty((n_sets, *v.shape))


def layer_macs(module: nn.Module, shapes: dict, node: fx.Node) -> int:
    out = _numel(shapes, node)
    if isinstance(module, nn.Linear):
        return out * module.in_features
    return out * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _numel(shapes: dict, node: fx.Node) -> int:
    shape = shapes.get(node)
    return math.prod(shape) if shape is not None else 0
