"""The loss-transfer matrix: train on one token group alone, watch every group's loss.

Row a, column b of the matrix is

    M[a, b] = L_b(θ_a^(k)) − L_b(θ),

where θ_a^(k) is θ after ``steps`` = k plain SGD steps of learning rate ``lr`` on
L_a alone (full-batch over the analysed examples, the parameter subset only)
and L_b is group b's mean token loss on the same examples
(`t3s.analysis.gradients.group_losses`). Sign convention: a negative entry
means training on a *lowered* b's loss (transfer), a positive one that it raised
it (interference). To first order, M[a, b] ≈ −lr · <∇L_a, ∇L_b>, so the
diagonal is negative for a small enough step. The parameters are restored
after each row.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from ..hf.heads import lm_head
from .gradients import group_gradients, group_losses
from .groups import GroupBatch

__all__ = ["transfer_matrix"]


def transfer_matrix(model: nn.Module, batches: Sequence[GroupBatch], names: Sequence[str],
                    subset: Sequence[Tuple[str, nn.Parameter]], *, lr: float,
                    steps: int = 1, head=None) -> Dict[str, object]:
    """The loss-transfer matrix between the groups of ``batches`` (`GroupBatch.masks`
    [G, B, T], G = len(names)).

    Returns {"names", "matrix": [G][G] with M[a][b] = L_b after training on a minus
    L_b before, "relative": M[a][b] / L_b before, "loss_before": {g: L_g}, "lr",
    "steps", "optimizer": "sgd"}. ValueError on lr ≤ 0 or steps < 1. head: the model's
    `t3s.LMHead` (default: measured by `t3s.lm_head`'s probe)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps}")
    if not batches or batches[0].masks.shape[0] != len(names):
        raise ValueError(f"batches must carry {len(names)} group masks")
    head = head if head is not None else lm_head(model)
    params = [p for _, p in subset]
    saved = [p.detach().clone() for p in params]
    before = group_losses(model, batches, head=head)
    rows = []
    try:
        for a in range(len(names)):
            for _ in range(int(steps)):
                grad = group_gradients(model, batches, subset, head=head, only=a)[0]
                with torch.no_grad():
                    offset = 0
                    for p in params:
                        n = p.numel()
                        p.sub_(lr * grad[offset:offset + n].view_as(p).to(p.dtype))
                        offset += n
            after = group_losses(model, batches, head=head)
            rows.append((after - before).tolist())
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    b = before.tolist()
    return {"names": list(names), "matrix": rows,
            "relative": [[r[j] / b[j] if b[j] else float("nan") for j in range(len(b))]
                         for r in rows],
            "loss_before": dict(zip(names, b)), "lr": float(lr), "steps": int(steps),
            "optimizer": "sgd"}
