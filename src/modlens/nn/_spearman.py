"""Squared Spearman correlations in torch, for activation graphs built on a GPU.

Same definition as :func:`modlens.core.graph.spearman_squared` (ranks with average ties,
Pearson correlation of the ranks, constant columns correlate 0 with everything), computed in
float64 on the tensors' device.
"""

from __future__ import annotations

import numpy as np
import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of each column of ``x`` (n, m), ties sharing their average rank."""
    n, m = x.shape
    values, order = torch.sort(x, dim=0, stable=True)
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).unsqueeze(1).expand(n, m)
    new_run = torch.ones_like(values, dtype=torch.bool)
    new_run[1:] = values[1:] != values[:-1]
    run_id = torch.cumsum(new_run.to(torch.int64), dim=0) - 1                     # (n, m)
    n_runs = int(run_id.max()) + 1 if n else 0
    flat = run_id + torch.arange(m, device=x.device) * n_runs                      # distinct ids per column
    sums = torch.zeros(m * n_runs, dtype=torch.float64, device=x.device).index_add_(0, flat.reshape(-1), pos.reshape(-1))
    counts = torch.zeros(m * n_runs, dtype=torch.float64, device=x.device).index_add_(
        0, flat.reshape(-1), torch.ones(n * m, dtype=torch.float64, device=x.device))
    avg = (sums / counts.clamp(min=1))[flat]                                        # sorted order
    ranks = torch.empty_like(avg)
    ranks.scatter_(0, order, avg)
    return ranks


def spearman_squared(x: torch.Tensor) -> torch.Tensor:
    """(m, m) squared Spearman correlations between the columns of ``x`` (n, m)."""
    r = average_ranks(x.double())
    r = r - r.mean(0)
    norms = torch.linalg.vector_norm(r, dim=0)
    constant = norms < 1e-8
    r = r / torch.where(constant, torch.ones_like(norms), norms)
    r[:, constant] = 0.0
    corr = r.T @ r
    corr = ((corr + corr.T) / 2).clamp_(-1.0, 1.0)
    return corr * corr


def spearman_graph_torch(layers: list[torch.Tensor]) -> np.ndarray:
    """Dense activation-graph adjacency (zero diagonal) from per-layer (n, units) tensors."""
    x = torch.cat([t.double() for t in layers], dim=1)
    if x.shape[0] < 3:
        raise ValueError(f"Spearman correlations need at least 3 samples, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("activations contain NaN or infinite values")
    adj = spearman_squared(x)
    adj.fill_diagonal_(0.0)
    return adj.cpu().numpy()
