"""Test and benchmark hooks shared by the backends (not for production use).

`OVERRIDES` lets tests force a block shape, a number of vocab splits or the
backward mode ('fused' or 'dense') of the Triton kernels, the (rows, vocab)
tile of the C++ CPU kernels ('cpu_block'), and
turn on poisoning: every output buffer a kernel must fully write is then
allocated filled with NaN (integers: -7), so an element a kernel forgets to
write shows up in the comparison instead of passing by luck.
"""

from __future__ import annotations

import torch

OVERRIDES: dict = {"block": None, "splits": None, "poison": False, "backward": None,
                   "cpu_block": None, "cpu_pack_weight": None}


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer under OVERRIDES['poison']."""
    if not OVERRIDES["poison"]:
        return torch.empty(*shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else (True if dtype == torch.bool else -7)
    return torch.full(shape, fill, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(*t.shape, dtype=t.dtype, device=t.device)
