"""The weight graph of a transformer's MLP neurons, joined through the residual stream.

MLP layers of different transformer blocks share no weight matrix: block ``i`` writes its
hidden units into the residual stream with ``W_out_i`` (``d_model x d_mlp``) and a later block
``j`` reads the stream, through its norm, with ``W_in_j`` (``d_mlp x d_model``). The edge from
neuron ``a`` of block ``i`` to neuron ``b`` of block ``j > i`` is the magnitude of the direct
path through the stream,

    ``w(a, b) = |(W_in_j diag(gamma_j) W_out_i)[b, a]|``,

with ``gamma_j`` the affine scale of the norm in front of block ``j``'s MLP (ones when the norm
has none). Left out, and documented as such (``docs/transformers.md``): paths through attention
layers, the norm's centring and division by the running scale (data-dependent), biases, and
every path through more than one MLP.

**GLU / SwiGLU.** A gated MLP computes ``act(W_gate x) * (W_up x)``; gate unit ``b`` and value
unit ``b`` form one neuron. It reads the stream through two rows, so the edge into it is the
L1 norm over its two read paths, ``|(W_gate_j G_j W_out_i)[b, a]| + |(W_up_j G_j W_out_i)[b, a]|``,
as a conv edge is the L1 norm over a kernel slice. It writes through one column of ``W_out``.

**Input and output nodes.** The embedding plays the input layer: ``embedding`` is ``E``
(``d_model x n_inputs``), the map from input features to the stream (a ViT: the patch
projection reshaped to ``d_model x (channels * patch * patch)``, one input node per pixel of a
patch; a token model: the embedding matrix transposed, one node per vocabulary entry). Input
node ``p`` joins neuron ``b`` of block ``j`` with ``|(W_in_j G_j E)[b, p]|``. The classifier head
plays the output layer: ``head`` is ``H`` (``n_classes x d_model``), read through the final
norm (scale ``gamma_f``), and neuron ``a`` of block ``i`` joins class ``c`` with
``|(H G_f W_out_i)[c, a]|``. The stream carries the embedding to every block and every block's
output to the head, so by default every block gets these edges (``input_edges="all"``,
``output_edges="all"``); ``"first"`` / ``"last"`` keep only the first / last block's.

**Stages** (hierarchical transformers: Swin, PVT-v2, SegFormer; docs/transformers.md). Blocks
carry a ``stage`` (0, 1, ...; non-decreasing); stage ``s`` is a residual stream of width ``d_s``
and ``transitions[s]`` (a :class:`StageMap`) is the map from stage ``s``'s stream into stage
``s + 1``'s: a kernel ``K`` of shape ``(d_{s+1}, d_s, kh, kw)`` applied with a stride, like a
convolution over the token grid (a patch merging Linear over 4 concatenated neighbours is a
2x2 kernel of stride 2, its 4 column blocks the 4 taps; a strided conv downsample is its own
kernel), with the norms' scales around it folded in. Maps through several boundaries compose
as convolutions do (tap ``q`` of the later map after tap ``o`` of the earlier one lands at
``q * stride + o``; taps landing on the same offset add). The edge from neuron ``a`` of block
``i`` (stage ``s``) to neuron ``b`` of block ``j`` (stage ``t >= s``) is the L1 norm over the
taps ``o`` of the composed map, ``sum_o |(W_in_j G_j P_o W_out_i)[b, a]|``, as a conv edge is
the L1 norm over its kernel's spatial taps; within one stage ``P`` is the identity, one tap, and
the edge is the single-width edge above. The embedding writes into stage 0 and the head reads the
last stage, through the same composed maps.

Node layers, in order: the inputs (when ``embedding`` is given), one layer per block, the
outputs (when ``head`` is given).

**Token groups** (docs/language-models.md, section 9). A vocabulary of tens of thousands of
tokens makes the input and output layers far larger than the neurons. ``input_groups`` /
``output_groups`` (an int per vocabulary entry, ``-1`` to leave a token out) contract them to one
node per group: the edge between a neuron and a group is the sum of its edges to the group's
tokens (the full token graph with each group merged into one node, so every cut between sets of
neurons is unchanged), computed over chunks of ``VOCAB_CHUNK`` tokens.

This module is layer 0: numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from scipy import sparse

from modlens.core.graph import GraphTooLargeError, memory_available, weight_graph
from modlens.core.knn_graph import DEFAULT_K, DENSE_MAX_NODES, TopK, _check_k, choose_graph_mode


#: Vocabulary entries per chunk when token groups are contracted.
VOCAB_CHUNK = 4096


def _group_sizes(groups, n: int, what: str) -> int:
    """Number of groups of a token-group array over ``n`` entries (checked)."""
    g = np.asarray(groups)
    if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"core.residual_graph: {what} must be an int array of shape ({n},) (one group per "
                         f"vocabulary entry, -1 to leave it out), got shape {g.shape} dtype {g.dtype}")
    if g.size and g.min() < -1:
        raise ValueError(f"core.residual_graph: {what} must be >= -1, found {int(g.min())}")
    return int(g.max()) + 1 if g.size and g.max() >= 0 else 0


def _one_hot(groups: np.ndarray, n_groups: int) -> sparse.csr_array:
    """(len(groups), n_groups) 0/1 matrix; entries of group -1 get an empty row."""
    keep = groups >= 0
    rows = np.flatnonzero(keep)
    return sparse.csr_array((np.ones(rows.size), (rows, groups[keep])), shape=(groups.size, n_groups))


@dataclass(frozen=True)
class MLPBlockWeights:
    """The MLP of one transformer block, as the residual stream sees it.

    ``w_in``: ``(d_mlp, d_model)``, the MLP's first linear map (the value/"up" map of a GLU);
    ``w_out``: ``(d_model, d_mlp)``, its second; ``gamma``: ``(d_model,)``, the affine scale of
    the norm before the MLP, or ``None`` for none; ``w_gate``: ``(d_mlp, d_model)``, the gate map
    of a GLU/SwiGLU MLP, or ``None``.
    """

    w_in: np.ndarray
    w_out: np.ndarray
    gamma: np.ndarray | None = None
    w_gate: np.ndarray | None = None
    stage: int = 0

    @property
    def width(self) -> int:
        return int(np.shape(self.w_in)[0])


@dataclass(frozen=True)
class StageMap:
    """The map from one stage's residual stream into the next (module docstring, Stages).

    ``kernel``: ``(d_next, d_prev, kh, kw)``, the weight of every path from a stream channel of the
    earlier stage at one of ``kh * kw`` neighbouring token positions (the taps) into a stream channel of
    the later stage, norm scales folded in; ``stride``: ``(sh, sw)``, how far the taps move per token of the
    later stage (equal to ``(kh, kw)`` for non-overlapping patch merging); ``token_map``: ``(d_next, d_prev)``,
    the separate map of the class tokens when they do not go through the kernel (PiT's pooling: a conv for
    the grid, a Linear for the class token), else None. Class-token maps compose only with each other, one
    more tap of the composed map when every boundary on the way has one."""

    kernel: np.ndarray
    stride: tuple[int, int] = (1, 1)
    token_map: np.ndarray | None = None


def _stage_widths(blocks: Sequence[MLPBlockWeights], transitions: Sequence[StageMap]) -> list[int]:
    """The stream width of every stage (checked: stages numbered 0, 1, ... in order, one map between
    consecutive stages, shapes agreeing)."""
    stages = [int(b.stage) for b in blocks]
    if stages[0] != 0 or any(b - a not in (0, 1) for a, b in zip(stages, stages[1:])):
        raise ValueError(f"core.residual_graph: block stages must start at 0 and increase by at most 1 from one "
                         f"block to the next, got {stages}")
    n_stages = stages[-1] + 1
    if len(transitions) != n_stages - 1:
        raise ValueError(f"core.residual_graph: {n_stages} stages need {n_stages - 1} transitions (one StageMap "
                         f"between consecutive stages), got {len(transitions)}")
    widths = [0] * n_stages
    for i, b in enumerate(blocks):
        d = int(np.shape(b.w_out)[0])
        if widths[b.stage] and widths[b.stage] != d:
            raise ValueError(f"core.residual_graph: block {i} writes a stream of width {d} but stage {b.stage}'s "
                             f"earlier blocks write width {widths[b.stage]}")
        widths[b.stage] = d
    for s, t in enumerate(transitions):
        k = np.asarray(t.kernel)
        if k.ndim != 4 or k.shape[:2] != (widths[s + 1], widths[s]):
            raise ValueError(f"core.residual_graph: transition {s} has kernel shape {k.shape}; expected "
                             f"({widths[s + 1]}, {widths[s]}, kh, kw) (stage {s + 1} width, stage {s} width, taps)")
        if len(t.stride) != 2 or min(t.stride) < 1:
            raise ValueError(f"core.residual_graph: transition {s} has stride {t.stride}; expected two ints >= 1")
        if not np.all(np.isfinite(k)):
            raise ValueError(f"core.residual_graph: transition {s} contains NaN or infinite values")
        if t.token_map is not None and np.shape(t.token_map) != k.shape[:2]:
            raise ValueError(f"core.residual_graph: transition {s} has a class-token map of shape "
                             f"{np.shape(t.token_map)}; expected {k.shape[:2]}")
    return widths


#: Bytes of composed reads (a reader's rows times the taps of the maps between stages) held at a time; a
#: reader's rows are taken in chunks that fit (module docstring, Stages).
SWEEP_BYTES = 1 << 28


def _offsets(transitions: Sequence[StageMap], s: int, t: int) -> int:
    """How many taps the composed map from stage ``s`` into stage ``t`` has, from the kernels' shapes and
    strides alone."""
    offsets, stride = ({0}, {0}), (1, 1)
    for u in range(s, t):
        shape = np.shape(transitions[u].kernel)
        offsets = tuple({q * stride[d] + o for o in offsets[d] for q in range(shape[2 + d])} for d in range(2))
        stride = (stride[0] * transitions[u].stride[0], stride[1] * transitions[u].stride[1])
    return len(offsets[0]) * len(offsets[1])


class _Stages:
    """The maps between stages, prepared to compose backwards from a reader (module docstring, Stages).

    The composed map from stage ``s`` into stage ``t`` is never built. A reader's rows ``R`` are carried back
    through the maps, one boundary at a time: at stage ``u`` they are ``{o: R P_o}`` over the taps ``o`` of the
    map from ``u`` into ``t``, and going back through map ``K_u`` (stride ``st``), tap ``q`` of ``K_u`` after tap
    ``o`` lands on ``q + st * o`` (the offsets of the forward composition, written in stage ``u``'s tokens).
    Two exact savings: a tap matrix with zero rows multiplies only its other rows, and a map whose taps do not
    overlap (kernel no larger than its stride) and are all equal (an average pool before a 1x1 conv) is a
    *push*: a writer in front of it has the same edges as the writer ``K_u[:, :, 0, 0] W`` one stage later,
    times the number of taps (``n`` equal terms at ``n`` distinct offsets)."""

    def __init__(self, transitions: Sequence[StageMap], widths: list[int], dtype):
        self.transitions = list(transitions)
        self.widths = widths
        self.dtype = dtype
        self.strides = [tuple(int(v) for v in t.stride) for t in transitions]
        self.tokens = [None if t.token_map is None else np.asarray(t.token_map, dtype=dtype) for t in transitions]
        self.taps, self.push = [], []
        for t in transitions:
            k = np.asarray(t.kernel, dtype=dtype)
            kh, kw = k.shape[2:]
            taps = []
            for qy in range(kh):
                for qx in range(kw):
                    m = np.ascontiguousarray(k[:, :, qy, qx])
                    rows = np.flatnonzero(np.any(m != 0, axis=1))
                    if rows.size == 0:
                        continue   # a zero tap: its paths weigh nothing
                    taps.append(((qy, qx), None if 4 * rows.size > 3 * m.shape[0] else rows,
                                 m if 4 * rows.size > 3 * m.shape[0] else np.ascontiguousarray(m[rows])))
            self.taps.append(taps)
            same = (kh <= t.stride[0] and kw <= t.stride[1] and t.token_map is None
                    and all(np.array_equal(k[:, :, 0, 0], k[:, :, a, b]) for a in range(kh) for b in range(kw)))
            self.push.append((np.ascontiguousarray(k[:, :, 0, 0]), kh * kw) if same else None)

    def lift(self, stage: int, write: np.ndarray) -> list:
        """``[(stage, write, multiplicity)]``: the writer at its own stage, then pushed through every map that
        follows it while the maps are pushes."""
        out = [(stage, write, 1)]
        while stage < len(self.push) and self.push[stage] is not None:
            m, n = self.push[stage]
            stage, write = stage + 1, m @ write
            out.append((stage, write, out[-1][2] * n))
        return out

    def row_bytes(self, t: int, stop: int) -> int:
        """Bytes per reader row of the composed reads between stages ``t`` and ``stop`` (two stages at a time)."""
        size = np.dtype(self.dtype).itemsize
        per = [_offsets(self.transitions, u, t) * self.widths[u] for u in range(stop, t + 1)]
        return max(a + b for a, b in zip(per, per[1:])) * size if len(per) > 1 else per[0] * size

    def sweep(self, rows: np.ndarray, t: int, stop: int):
        """Yield ``(u, taps, token)`` for ``u = t - 1`` down to ``stop``: ``taps`` is ``{offset: R P_o}`` over
        the taps of the map from stage ``u`` into stage ``t`` (equal products may be one array at several
        offsets), ``token`` the rows through the class tokens' composed map, None without one."""
        taps, token = {(0, 0): rows}, rows
        for u in range(t - 1, stop - 1, -1):
            sy, sx = self.strides[u]
            token = None if token is None or self.tokens[u] is None else token @ self.tokens[u]
            nxt: dict = {}
            done: dict = {}   # products already made in this step: equal arrays at several offsets
            if self.push[u] is not None:
                m = self.push[u][0]
                for (oy, ox), b in taps.items():
                    p = done.get(id(b))
                    if p is None:
                        p = done[id(b)] = b @ m
                    for (qy, qx), _, _ in self.taps[u]:
                        nxt[(qy + sy * oy, qx + sx * ox)] = p   # non-overlapping taps: no offset twice
            else:
                # a product is kept for reuse only when its array sits at several offsets (after a push): keeping
                # every product of a stride-1 map holds (taps x kernel taps) arrays, 9x the composed taps of a 3x3
                repeats = {}
                for b in taps.values():
                    repeats[id(b)] = repeats.get(id(b), 0) + 1
                owned = set()   # offsets whose array is this step's own (added to in place)
                for (oy, ox), b in taps.items():
                    for (qy, qx), rows_q, m in self.taps[u]:
                        key = (qy + sy * oy, qx + sx * ox)
                        p = done.get((id(b), qy, qx)) if repeats[id(b)] > 1 else None
                        if p is None:
                            p = b @ m if rows_q is None else b[:, rows_q] @ m
                            if repeats[id(b)] > 1:
                                done[(id(b), qy, qx)] = p
                        if key not in nxt:
                            nxt[key] = p
                            if repeats[id(b)] == 1:
                                owned.add(key)
                        elif key in owned:
                            nxt[key] += p
                        else:
                            nxt[key] = nxt[key] + p
                            owned.add(key)
            del done
            taps = nxt
            yield u, taps, token


def _sweep_budget() -> int:
    """Bytes of one chunk of reader rows composed back through the stage maps: SWEEP_BYTES, or a quarter of the
    memory left when that is less."""
    available = memory_available()
    return SWEEP_BYTES if available is None else max(1, min(SWEEP_BYTES, available // 4))


def _edges(stages: _Stages, read_list: list, t: int, writers: list, budget: int | None = None):
    """Yield ``(k, A)`` for every writer ``k`` of ``writers`` (``[(stage, lifted)]``, :meth:`_Stages.lift`):
    the edge block ``sum_o sum_r |(R_r P_o W_k)|`` from the writer (stage ``s <= t``) into a reader at stage
    ``t`` that reads through the matrices ``read_list``. Writers are taken by the stage they are pushed to,
    the latest first; the rows are composed back through the maps in chunks of ``budget`` bytes."""
    width = read_list[0].shape[0]
    groups: dict = {}
    for k, (stage, lifted) in enumerate(writers):
        s, w, mult = [x for x in lifted if x[0] <= t][-1]
        groups.setdefault(s, []).append((k, w, mult, s == stage))
    if t in groups:
        for k, w, mult, _ in groups.pop(t):
            total = np.abs(read_list[0] @ w)
            for r in read_list[1:]:
                total += np.abs(r @ w)
            yield k, total if mult == 1 else total * mult
    if not groups:
        return
    rows = read_list[0] if len(read_list) == 1 else np.concatenate(read_list, axis=0)
    stop = min(groups)
    budget = SWEEP_BYTES if budget is None else budget
    chunk = max(1, budget // max(1, stages.row_bytes(t, stop)))
    starts = list(range(0, rows.shape[0], chunk))
    size = np.dtype(stages.dtype).itemsize
    held = sum(rows.shape[0] * sum(w.shape[1] for _, w, _, _ in g) for g in groups.values()) * size
    # one chunk: each stage's blocks as soon as they are made; several: every block held while the chunks
    # pass, when they fit in the budget, else the chunks composed again for every stage
    passes = [sorted(groups, reverse=True)] if len(starts) == 1 or held <= budget else [[s] for s in
                                                                                        sorted(groups, reverse=True)]
    for stages_in in passes:
        cat = {s: np.concatenate([w for _, w, _, _ in groups[s]], axis=1) for s in stages_in}
        acc = {s: np.zeros((rows.shape[0], cat[s].shape[1]), dtype=stages.dtype) for s in stages_in}
        buf = None   # one product at a time
        for a in starts:
            part = rows[a:a + chunk]
            for u, taps, token in stages.sweep(part, t, min(stages_in)):
                if u not in acc:
                    continue
                out = acc[u][a:a + chunk]
                counts: dict = {}
                for b in taps.values():
                    counts[id(b)] = (b, counts.get(id(b), (b, 0))[1] + 1)
                for b, n in counts.values():
                    if buf is None or buf.shape[0] != b.shape[0] or buf.shape[1] != cat[u].shape[1]:
                        buf = np.empty((b.shape[0], cat[u].shape[1]), dtype=stages.dtype)
                    np.matmul(b, cat[u], out=buf)
                    np.abs(buf, out=buf)
                    if n != 1:
                        buf *= n
                    out += buf
                if token is not None:   # the class tokens' own tap, for writers that were not pushed
                    col = 0
                    for k, w, mult, native in groups[u]:
                        if native:
                            out[:, col:col + w.shape[1]] += np.abs(token @ w)
                        col += w.shape[1]
                if len(starts) == 1:
                    yield from _blocks(acc.pop(u), groups[u], width, len(read_list))
        for u in list(acc):
            yield from _blocks(acc.pop(u), groups[u], width, len(read_list))


def _blocks(acc: np.ndarray, group: list, width: int, n_reads: int):
    """Split a stage's accumulated edges into its writers' blocks: the read matrices' rows summed, times each
    writer's multiplicity."""
    total = acc[:width]
    for r in range(1, n_reads):
        total += acc[r * width:(r + 1) * width]
    col = 0
    for k, w, mult, _ in group:
        block = total[:, col:col + w.shape[1]]
        yield k, np.array(block) if mult == 1 else block * mult
        col += w.shape[1]


def _check_paths_memory(blocks: Sequence[MLPBlockWeights], transitions: Sequence[StageMap], widths: list[int],
                        itemsize: int) -> None:
    """Refuse in one line, before any product, maps between stages that do not fit in the memory left even one
    reader row at a time (:func:`_edges`): the maps themselves, one row's composed reads across the widest
    boundary, and the largest stage's edge blocks into the widest reader."""
    n_stages = len(widths)
    if n_stages < 2:
        return
    taps = max(_offsets(transitions, s, t) for s in range(n_stages) for t in range(s + 1, n_stages))
    kernels = sum(int(np.prod(np.shape(t.kernel))) for t in transitions)
    row = max(_offsets(transitions, u, t) * widths[u] + _offsets(transitions, u + 1, t) * widths[u + 1]
              for t in range(1, n_stages) for u in range(t))
    widest = max(b.width * len(_reads_shapes(b)) for b in blocks)
    per_stage = max(sum(b.width for b in blocks if b.stage == s) for s in range(n_stages))
    need = (kernels + row + widest * per_stage) * itemsize
    available = memory_available()
    if available is None or need <= available:
        return
    gib = 2.0 ** 30
    raise GraphTooLargeError(
        f"core.residual_graph: the maps between the {n_stages} stages of this hierarchical model compose into up "
        f"to {taps:,} taps per pair of stages, which need about {need / gib:.1f} GiB to weigh the paths through "
        f"them even one reader row at a time, but this process has about {available / gib:.1f} GiB left; run it "
        f"with more memory, or partition by activations (a kNN graph on a model this large)"
    )


def _reads_shapes(block: MLPBlockWeights) -> list:
    return [w for w in (block.w_in, block.w_gate) if w is not None]


def _reads(block: MLPBlockWeights, dtype) -> list[np.ndarray]:
    """The matrices through which the block's neurons read the stream, norm scale folded in."""
    gamma = None if block.gamma is None else np.asarray(block.gamma, dtype=dtype)
    out = []
    for w in (block.w_in, block.w_gate):
        if w is None:
            continue
        w = np.asarray(w, dtype=dtype)
        out.append(w if gamma is None else w * gamma[None, :])
    return out


def _check(blocks: Sequence[MLPBlockWeights], embedding, head, final_gamma, transitions=()) -> list[int]:
    """The stream width of every stage, after checking every shape."""
    if not blocks:
        raise ValueError("core.residual_graph: need at least one MLP block")
    widths = _stage_widths(blocks, transitions)
    for i, b in enumerate(blocks):
        d_model = widths[b.stage]
        d_mlp = b.width
        shapes = {"w_in": (d_mlp, d_model), "w_out": (d_model, d_mlp)}
        if b.w_gate is not None:
            shapes["w_gate"] = (d_mlp, d_model)
        for name, expected in shapes.items():
            got = tuple(np.shape(getattr(b, name)))
            if got != expected:
                raise ValueError(
                    f"core.residual_graph: block {i} {name} has shape {got}; expected {expected} "
                    f"(d_mlp={d_mlp}, d_model={d_model}, the stream width of stage {b.stage})"
                )
        if b.gamma is not None and tuple(np.shape(b.gamma)) != (d_model,):
            raise ValueError(f"core.residual_graph: block {i} gamma has shape {np.shape(b.gamma)}; expected ({d_model},)")
        for name in ("w_in", "w_out", "gamma", "w_gate"):
            v = getattr(b, name)
            if v is not None and not np.all(np.isfinite(v)):
                raise ValueError(f"core.residual_graph: block {i} {name} contains NaN or infinite values")
    d_model = widths[0]
    if embedding is not None and (np.ndim(embedding) != 2 or np.shape(embedding)[0] != d_model):
        raise ValueError(
            f"core.residual_graph: embedding has shape {np.shape(embedding)}; expected (d_model={d_model}, n_inputs)"
        )
    d_model = widths[-1]
    if head is not None and (np.ndim(head) != 2 or np.shape(head)[1] != d_model):
        raise ValueError(f"core.residual_graph: head has shape {np.shape(head)}; expected (n_classes, d_model={d_model}, "
                         "the width of the last stage's stream)")
    if final_gamma is not None and tuple(np.shape(final_gamma)) != (d_model,):
        raise ValueError(f"core.residual_graph: final_gamma has shape {np.shape(final_gamma)}; expected ({d_model},)")
    return widths


def residual_edge_blocks(
    blocks: Sequence[MLPBlockWeights],
    *,
    embedding=None,
    head=None,
    final_gamma=None,
    input_edges: str = "all",
    output_edges: str = "all",
    dtype=np.float64,
    input_groups=None,
    output_groups=None,
    neurons_only: bool = False,
    transitions: Sequence[StageMap] = (),
):
    """Yield ``(i, j, A)`` node-layer triples of edge weights (``A[b, a]`` joins node ``a`` of
    layer ``i`` to node ``b`` of layer ``j``), one block pair at a time, in the node-layer
    numbering of :func:`residual_weight_graph`. Each ``A`` is ``(size_j, size_i)``, non-negative.
    ``input_groups`` / ``output_groups`` contract the embedding's inputs / the head's outputs to
    token groups (module docstring); ``neurons_only`` yields the block pairs between neurons only;
    ``transitions`` are the maps between the stages of a hierarchical model (module docstring, Stages)."""
    if input_edges not in ("all", "first") or output_edges not in ("all", "last"):
        raise ValueError(
            f"core.residual_graph: input_edges must be 'all' or 'first' and output_edges 'all' or 'last', "
            f"got {input_edges!r}, {output_edges!r}"
        )
    widths = _check(blocks, embedding, head, final_gamma, transitions)
    first = 1 if embedding is not None else 0
    reads = [_reads(b, dtype) for b in blocks]
    writes = [np.asarray(b.w_out, dtype=dtype) for b in blocks]
    _check_paths_memory(blocks, transitions, widths, np.dtype(dtype).itemsize)
    stages = _Stages(transitions, widths, dtype)
    budget = _sweep_budget()
    lifted = [stages.lift(b.stage, w) for b, w in zip(blocks, writes)]

    def through(read_list, write, src=0, dst=0):
        """The edge block from ``write`` (stage ``src``) to ``read_list`` (stage ``dst``)."""
        return next(_edges(stages, read_list, dst, [(src, stages.lift(src, write))], budget))[1]

    if embedding is not None and not neurons_only:
        emb = np.asarray(embedding, dtype=dtype)
        onehot = None
        if input_groups is not None:
            groups = np.asarray(input_groups, dtype=np.int64)
            onehot = _one_hot(groups, _group_sizes(groups, emb.shape[1], "input_groups"))
        targets = range(len(blocks)) if input_edges == "all" else [0]
        for j in targets:
            if onehot is None:
                yield 0, first + j, through(reads[j], emb, 0, blocks[j].stage)
                continue
            acc = np.zeros((blocks[j].width, onehot.shape[1]))
            for c0 in range(0, emb.shape[1], VOCAB_CHUNK):
                part = through(reads[j], emb[:, c0:c0 + VOCAB_CHUNK], 0, blocks[j].stage)
                acc += (onehot[c0:c0 + VOCAB_CHUNK].T @ part.T).T
            yield 0, first + j, acc
    for j in range(len(blocks)):
        # all earlier blocks at once: the reader's rows go back through the maps once (writers of the latest
        # stage first)
        for i, a in _edges(stages, reads[j], blocks[j].stage, [(blocks[i].stage, lifted[i]) for i in range(j)],
                           budget):
            yield first + i, first + j, a
    if head is not None and not neurons_only:
        h = np.asarray(head, dtype=dtype)
        if final_gamma is not None:
            h = h * np.asarray(final_gamma, dtype=dtype)[None, :]
        onehot = None
        if output_groups is not None:
            groups = np.asarray(output_groups, dtype=np.int64)
            onehot = _one_hot(groups, _group_sizes(groups, h.shape[0], "output_groups"))
        out_layer = first + len(blocks)
        sources = list(range(len(blocks))) if output_edges == "all" else [len(blocks) - 1]
        if onehot is None:
            for k, a in _edges(stages, [h], len(widths) - 1, [(blocks[i].stage, lifted[i]) for i in sources], budget):
                yield first + sources[k], out_layer, a
            return
        for i in sources:
            acc = np.zeros((onehot.shape[1], blocks[i].width))
            for c0 in range(0, h.shape[0], VOCAB_CHUNK):
                acc += onehot[c0:c0 + VOCAB_CHUNK].T @ through([h[c0:c0 + VOCAB_CHUNK]], writes[i], blocks[i].stage,
                                                               len(widths) - 1)
            yield first + i, out_layer, acc


def _sum_sq(a: np.ndarray) -> float:
    """The sum of the squares of ``a``'s entries, products and sum in float64 (without a float64 copy of ``a``:
    7x faster than squaring a converted copy of a 3072 x 3072 float32 block)."""
    a = np.asarray(a)
    return float(np.einsum("ij,ij->", a, a, dtype=np.float64)) if a.ndim == 2 else float(np.square(a, dtype=np.float64).sum())


def residual_inside_sq(blocks: Sequence[MLPBlockWeights], labels, *, dtype=np.float64,
                       transitions: Sequence[StageMap] = ()) -> float:
    """Sum of the squared edge weights between MLP neurons of different blocks that carry the same cluster
    label ``>= 0`` (``labels``: one int array per block), i.e. the ``inside`` of
    :func:`modlens.core.weight_share.weight_share` over the ``neurons_only`` blocks of
    :func:`residual_edge_blocks`, without the edges across clusters: each block pair's products are taken
    for one cluster's rows and columns at a time, so with ``k`` even clusters they cost about ``1/k`` of the
    full blocks. Equal to the sum over the full blocks up to the rounding of the products in ``dtype``."""
    _check(blocks, None, None, None, transitions)
    if len(labels) != len(blocks):
        raise ValueError(f"core.residual_graph: {len(blocks)} blocks but {len(labels)} label arrays")
    labels = [np.asarray(l, dtype=np.int64) for l in labels]
    for n, (b, l) in enumerate(zip(blocks, labels)):
        if l.shape != (b.width,):
            raise ValueError(f"core.residual_graph: block {n} has {b.width} neurons but labels of shape {l.shape}")
    widths = _stage_widths(blocks, transitions)
    stages = _Stages(transitions, widths, dtype)
    budget = _sweep_budget()
    reads = [_reads(b, dtype) for b in blocks]
    writes = [np.asarray(b.w_out, dtype=dtype) for b in blocks]
    members = [{int(c): np.flatnonzero(l == c) for c in np.unique(l[l >= 0])} for l in labels]
    inside = 0.0
    for j in range(1, len(blocks)):
        for c, rows in members[j].items():
            # this cluster's rows of block j read from this cluster's columns of every earlier block: the same
            # paths as the full edge blocks (rows and columns are independent in them), a 1/k share of the work
            sources = [i for i in range(j) if c in members[i]]
            if not sources:
                continue
            writers = [(blocks[i].stage, stages.lift(blocks[i].stage, writes[i][:, members[i][c]])) for i in sources]
            for _, a in _edges(stages, [r[rows] for r in reads[j]], blocks[j].stage, writers, budget):
                inside += _sum_sq(a)
    return inside


def residual_layer_sizes(blocks: Sequence[MLPBlockWeights], *, embedding=None, head=None, input_groups=None,
                         output_groups=None) -> list[int]:
    """Node-layer sizes: inputs (if ``embedding``; token groups if ``input_groups``), each block's
    MLP width, outputs (if ``head``; token groups if ``output_groups``)."""
    sizes = [b.width for b in blocks]
    if embedding is not None:
        n_in = int(np.shape(embedding)[1])
        sizes = [n_in if input_groups is None else _group_sizes(input_groups, n_in, "input_groups")] + sizes
    if head is not None:
        n_out = int(np.shape(head)[0])
        sizes = sizes + [n_out if output_groups is None else _group_sizes(output_groups, n_out, "output_groups")]
    return sizes


def _recording_pair_sq(triples, first: int, n_blocks: int, pair_sq: dict):
    """``triples`` unchanged, each block pair's sum of squares stored in ``pair_sq`` on the way."""
    for i, j, a in triples:
        if first <= i < first + n_blocks and first <= j < first + n_blocks:
            pair_sq[(i - first, j - first)] = _sum_sq(a)
        yield i, j, a


def residual_weight_graph(
    blocks: Sequence[MLPBlockWeights],
    *,
    embedding=None,
    head=None,
    final_gamma=None,
    input_edges: str = "all",
    output_edges: str = "all",
    mode: str = "auto",
    k: int = DEFAULT_K,
    symmetrize: str = "max",
    dense_max_nodes: int = DENSE_MAX_NODES,
    dtype=np.float64,
    input_groups=None,
    output_groups=None,
    transitions: Sequence[StageMap] = (),
    on_block=None,
    pair_sq: dict | None = None,
):
    """Residual-stream weight graph of a transformer's MLP neurons (module docstring).

    Returns ``(adjacency, layer_sizes)``: a symmetric float64 ``scipy.sparse.csr_array`` over the
    node layers (inputs, blocks, outputs) concatenated, and their sizes. ``mode="dense"`` keeps
    every edge (:func:`modlens.core.graph.weight_graph`; ``O(n^2)`` entries for ``n`` neurons);
    ``mode="knn"`` keeps each node's ``k`` heaviest edges (``symmetrize`` as in
    :mod:`modlens.core.knn_graph`), computing one block pair at a time, so memory is
    ``O(n k + d_mlp^2)``; ``"auto"`` chooses by node count (:func:`choose_graph_mode`).
    ``dtype=np.float32`` halves the cost of the matrix products. ``on_block(i, j, A)``, when given, is
    called with every edge block as it is made (a caller that keeps some of them: the weight share).
    A dict ``pair_sq`` receives, for every pair of blocks ``i < j``, the sum of the squared weights of
    its edge block as ``pair_sq[(i, j)]`` (float64; the totals of
    :func:`modlens.core.weight_share.weight_share`, so that it need not compute the blocks again:
    :func:`residual_inside_sq`; the caller that cannot keep the blocks).
    """
    sizes = residual_layer_sizes(blocks, embedding=embedding, head=head, input_groups=input_groups,
                                 output_groups=output_groups)
    triples = residual_edge_blocks(
        blocks, embedding=embedding, head=head, final_gamma=final_gamma,
        input_edges=input_edges, output_edges=output_edges, dtype=dtype,
        input_groups=input_groups, output_groups=output_groups, transitions=transitions,
    )
    if on_block is not None:
        triples = _seen(triples, on_block)
    if pair_sq is not None:
        triples = _recording_pair_sq(triples, 0 if embedding is None else 1, len(blocks), pair_sq)
    if choose_graph_mode(sum(sizes), mode, dense_max_nodes=dense_max_nodes) == "dense":
        return weight_graph(sizes, list(triples)), sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    top = TopK(int(offsets[-1]), _check_k(k, int(offsets[-1])))
    for i, j, a in triples:
        rows_j = np.arange(offsets[j], offsets[j + 1])
        rows_i = np.arange(offsets[i], offsets[i + 1])
        top.update(rows_j, rows_i, a)
        top.update(rows_i, rows_j, a, transposed=True)
    return top.to_graph(symmetrize), sizes


def _seen(triples, on_block):
    for i, j, a in triples:
        on_block(i, j, a)
        yield i, j, a
