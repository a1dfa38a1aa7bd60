"""Memory budgets: how many samples and lesion sets the engines hold at once.

Sizes come from one traced pass over a single sample (:func:`modlens.nn._fx.node_shapes`),
so every limit is an element count, not a guess. The default budget is 2 GiB on the CPU and
half of the free memory of a CUDA device.
"""

from __future__ import annotations

import math

import torch

CPU_BUDGET = 2 << 30
# On the CPU, blocks beyond this size no longer run faster; they only use more memory.
CPU_BLOCK_BYTES = 64 << 20


def default_budget(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return CPU_BUDGET


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_bytes_per_sample(shapes: dict, dtype: torch.dtype) -> int:
    """A bound on what one sample holds during a forward pass: the three largest values."""
    sizes = sorted((math.prod(s) for s in shapes.values() if s is not None), reverse=True)[:3]
    return max(1, sum(sizes)) * itemsize(dtype)


def block_bytes(device: torch.device, budget: int) -> int:
    """Working memory for one block: ``budget``, and on the CPU at most :data:`CPU_BLOCK_BYTES`."""
    return min(budget, CPU_BLOCK_BYTES) if torch.device(device).type == "cpu" else budget


def batch_for(shapes: dict, dtype: torch.dtype, batch_size: int, budget: int, extra_elements: int = 0) -> int:
    """The largest batch (at most ``batch_size``) whose forward pass fits in ``budget`` bytes."""
    per = forward_bytes_per_sample(shapes, dtype) + extra_elements * itemsize(dtype)
    return int(max(1, min(batch_size, budget // per)))
