"""Exact work-skipping for lesions whose consumer is a single Linear layer.

Two ways to avoid running the tail for a (lesion set, sample) pair, both exact:

* **silent lesions**: when the consumer's inputs ``u[sample, S]`` are all exactly zero, the
  low-rank correction is exactly zero, so the pair's prediction is the baseline prediction
  of the tail (computed once per sample on the cached consumer output);
* **certified pairs** (only when the tail is a chain ``act -> Linear -> act -> ... -> Linear``
  whose activations are ReLU, LeakyReLU with slope in [0, 1], identity or dropout in eval,
  all 1-Lipschitz elementwise): after an exact activation ``h'`` of the chain,
  ``|logits' - logits| <= M |h' - h|`` elementwise with ``M`` the product of the absolute
  weights of the remaining Linear layers. If the baseline class ``c`` beats every other class
  by more than both bounds plus a rounding slack, the lesioned prediction is ``c``.

Every other pair runs the same modules as the tail, on the gathered rows. Gathering costs a
copy of every row, so silent pairs are only gathered out where the tail after the consumer
costs at least :data:`GATHER_MIN_MACS` multiply-adds per entry of the consumer's output (a
consumer followed by nothing but the logits runs every pair instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)
SLACK = 1e-4
# Gather silent pairs out only where the tail costs this many multiply-adds per entry of the
# consumer's output: below it, copying the rows costs about what running them would.
GATHER_MIN_MACS = 32


def _lipschitz_module(m: nn.Module) -> bool:
    if isinstance(m, nn.ReLU) or isinstance(m, _PASS):
        return True
    if isinstance(m, nn.LeakyReLU):
        return 0.0 <= float(m.negative_slope) <= 1.0
    return False


class LinearSkip:
    """The skipping evaluator of one plan, or ``None`` from :meth:`build` where it does not apply."""

    def __init__(self, plan, stages, tail_macs: int | None = None):
        self.plan = plan
        c = plan.corrections[0]
        self.correction = c
        self.stages = stages      # None, or [(acts, linear)], the last linear giving the logits
        # multiply-adds of the tail per sample (None: unknown, assumed worth skipping)
        self.gather = tail_macs is None or tail_macs >= GATHER_MIN_MACS * c.module.out_features
        self.bounds = None
        self._bufs: dict = {}
        self.enabled = None
        if stages is not None:
            # M_i = |W_L| ... |W_i| for the activation before stage i's linear
            bounds = [None] * len(stages)
            m = None
            for i in range(len(stages) - 1, -1, -1):
                w = stages[i][1].weight.detach().abs()
                m = w if m is None else m @ w
                bounds[i] = m
            self.bounds = bounds
            # certify only where at least one more hidden linear would be skipped
            self.enabled = [i < len(stages) - 1 for i in range(len(stages))]
            self.rate = [[0, 0] for _ in stages]
            # multiply-adds per row: skipped by a certificate at stage i, spent on checking it
            self.saved = [sum(l.in_features * l.out_features for _, l in stages[i:]) for i in range(len(stages))]
            self.cost = [stages[-1][1].out_features * l.in_features + 8 * l.in_features for _, l in stages]

    @classmethod
    def build(cls, plan, tail_macs: int | None = None) -> "LinearSkip | None":
        if len(plan.corrections) != 1 or plan.masks or plan.frontier:
            return None
        c = plan.corrections[0]
        if not isinstance(c.module, nn.Linear) or len(c.routes) != 1 or c.routes[0].flat:
            return None
        tail = plan.tail
        nodes = [n for n in tail.graph.nodes]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            return None
        return cls(plan, cls._chain(tail, nodes, placeholders[0]), tail_macs)

    @staticmethod
    def _chain(tail, nodes, start):
        stages, acts = [], []
        prev = start
        for n in nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = n.args[0]
                if out is not prev or acts or not stages:
                    return None
                return stages
            if len(n.all_input_nodes) != 1 or n.all_input_nodes[0] is not prev or len(prev.users) != 1:
                return None
            if n.op == "call_module":
                m = tail.get_submodule(n.target)
                if isinstance(m, nn.Linear):
                    stages.append((acts, m))
                    acts = []
                elif _lipschitz_module(m):
                    acts.append(m)
                else:
                    return None
            elif n.op == "call_function" and n.target in (torch.relu, F.relu, torch.ops.aten.relu.default) and len(n.args) == 1 and not n.kwargs:
                acts.append(torch.relu)
            elif n.op == "call_function" and n.target is torch.ops.aten.leaky_relu.default and not n.kwargs \
                    and 0.0 <= float(n.args[1] if len(n.args) > 1 else 0.01) <= 1.0:
                acts.append(nn.LeakyReLU(float(n.args[1] if len(n.args) > 1 else 0.01)))   # an exported LeakyReLU
            elif n.op == "call_function" and n.target is torch.ops.aten.dropout.default and n.args[2] is False:
                acts.append(nn.Identity())       # dropout of an exported graph in eval
            else:
                return None
            prev = n
        return None

    # ----- per chunk ---------------------------------------------------------------------------------
    def baseline(self, z: torch.Tensor, batch: int) -> dict:
        """Baseline prediction (and, for a chain, activations and logits) of the tail per sample."""
        preds, hs, logits = [], [[] for _ in (self.stages or [])], []
        for s0 in range(0, z.shape[0], batch):
            x = z[s0:s0 + batch].clone()
            if self.stages is None:
                out = self.plan.tail(x)
            else:
                for i, (acts, lin) in enumerate(self.stages):
                    for a in acts:
                        x = a(x)
                    hs[i].append(x)
                    x = lin(x)
                out = x
                logits.append(out)
            preds.append(out.argmax(-1))
        base = {"pred": torch.cat(preds)}
        if self.stages is not None:
            base["h"] = [torch.cat(h) for h in hs]
            base["logits"] = torch.cat(logits)
            lg = base["logits"]
            base["slack"] = SLACK * (1 + lg.abs().amax(-1))
        return base

    def _buf(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A reused working tensor (fresh large allocations cost page faults on the CPU)."""
        numel = math.prod(shape)
        b = self._bufs.get(name)
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            b = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = b
        return b[:numel].view(shape)

    def _linear(self, lin: nn.Linear, x: torch.Tensor, name: str) -> torch.Tensor:
        """``lin(x)`` written into a reused tensor: the same kernel as ``F.linear`` on 2-d inputs."""
        out = self._buf(name, (x.shape[0], lin.out_features), x)
        w = lin.weight.detach().t()
        if lin.bias is None:
            return torch.mm(x, w, out=out)
        return torch.addmm(lin.bias.detach(), x, w, out=out)

    @staticmethod
    def _act_(a, x: torch.Tensor) -> torch.Tensor:
        """The chain's activation ``a`` applied in place (same values as out of place)."""
        if a is torch.relu or isinstance(a, nn.ReLU):
            return x.relu_()
        if isinstance(a, nn.LeakyReLU):
            return F.leaky_relu_(x, a.negative_slope)
        return x  # identity, dropout in eval

    def predictions(self, cached: dict, base: dict, s0: int, s1: int, idx: torch.Tensor, stats: dict) -> torch.Tensor:
        """Predictions (B, n) for the sets ``idx`` (B, k) on samples ``s0:s1`` of the chunk."""
        c = self.correction
        u = cached[c.value][s0:s1]
        z = cached[c.consumer][s0:s1]
        n = z.shape[0]
        n_sets = idx.shape[0]
        w = c.module.weight.detach()
        u_sel = u[:, idx].permute(1, 0, 2)                    # (B, n, k)
        total = n_sets * n
        stats["pairs"] = stats.get("pairs", 0) + total
        base_pred = base["pred"][s0:s1].unsqueeze(0).expand(n_sets, n)
        rows = pred = None            # rows: the pairs that run (None: all of them)
        if self.gather:
            rows = (u_sel != 0).any(-1).reshape(-1).nonzero().squeeze(1)
            stats["silent"] = stats.get("silent", 0) + total - rows.numel()
            if rows.numel() == 0:
                return base_pred.clone()
            if rows.numel() == total:
                rows = None
        # z - u[:, S] @ W[:, S].T, as LesionPlan.tail_inputs computes it, in one pass
        x = torch.baddbmm(z.unsqueeze(0), u_sel, w[:, idx].permute(1, 2, 0), alpha=-1,
                          out=self._buf("delta", (n_sets, n, z.shape[1]), z)).view(total, -1)
        if rows is not None:
            x = torch.index_select(x, 0, rows, out=self._buf("rows", (rows.numel(), x.shape[1]), x))
            pred = base_pred.reshape(-1).clone()
        if self.stages is None:
            return self._place(pred, rows, self.plan.tail(x).argmax(-1), n_sets, n)
        for i, (acts, lin) in enumerate(self.stages):
            for a in acts:
                x = self._act_(a, x)
            if self.enabled[i] and x.shape[0]:
                if rows is None:
                    rows = torch.arange(total, device=x.device)
                    pred = base_pred.reshape(-1).clone()
                x, rows = self._certify(i, x, rows, n, s0, base, stats)
            x = self._linear(lin, x, f"lin{i % 2}")
        return self._place(pred, rows, x.argmax(-1), n_sets, n)

    @staticmethod
    def _place(pred, rows, computed: torch.Tensor, n_sets: int, n: int) -> torch.Tensor:
        """The (B, n) predictions: ``computed`` for the ``rows`` that ran (all when ``rows`` is None)."""
        if rows is None:
            return computed.view(n_sets, n)
        if rows.numel():
            pred.index_copy_(0, rows, computed)
        return pred.view(n_sets, n)

    def _certify(self, i: int, x: torch.Tensor, rows: torch.Tensor, n: int, s0: int, base: dict, stats: dict):
        """Drop the rows whose prediction is provably the baseline one; returns the others."""
        smp = rows % n + s0
        dh = torch.index_select(base["h"][i], 0, smp, out=self._buf("dh", tuple(x.shape), x))
        torch.sub(x, dh, out=dh).abs_()
        bound = dh @ self.bounds[i].T                         # (r, classes) >= |logits' - logits|
        cls = base["pred"].index_select(0, smp).unsqueeze(1)
        lg = base["logits"].index_select(0, smp)
        margin = lg.gather(1, cls) - lg
        need = bound.gather(1, cls) + bound + base["slack"].index_select(0, smp).unsqueeze(1)
        ok = margin > need
        ok.scatter_(1, cls, True)
        keep = (~ok.all(1)).nonzero().squeeze(1)
        r = self.rate[i]
        r[0] += rows.numel()
        r[1] += rows.numel() - keep.numel()
        stats["certified"] = stats.get("certified", 0) + rows.numel() - keep.numel()
        if r[0] >= 4096 and r[1] * self.saved[i] < 2 * r[0] * self.cost[i]:
            self.enabled[i] = False     # too few certificates to pay for the checks
        if keep.numel() == rows.numel():
            return x, rows
        kept = torch.index_select(x, 0, keep, out=self._buf(f"keep{i % 2}", (keep.numel(), x.shape[1]), x))
        return kept, rows.index_select(0, keep)
