"""Causal-LM label conventions: the shift, and the loss-item count that matches a mask.

Position convention (as in HF's ``ForCausalLMLoss``): the hidden state at
position i predicts ``labels[:, i + 1]``; ``loss_mask`` is aligned with
``labels`` and shifted the same way. Shapes: [B, T].
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["shift_for_causal_lm", "count_loss_items", "check_mask_shape", "check_targets"]


def shift_for_causal_lm(labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None, *,
                        ignore_index: int = -100):
    """HF's causal shift: returns (targets [B, T], mask [B, T] or None).

    ``targets[:, i] = labels[:, i + 1]`` and the last position is ``ignore_index``
    (mask 0), exactly as ``ForCausalLMLoss`` pads and shifts, so the hidden
    states need no slicing.
    """
    targets = _shift_left(labels, ignore_index)
    mask = None if loss_mask is None else _shift_left(loss_mask, 0)
    return targets, mask


def count_loss_items(labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None, *,
                     ignore_index: int = -100, shifted: bool = False) -> torch.Tensor:
    """The ``num_items_in_batch`` that makes accumulated masked losses exact.

    Sums the weight of every token that enters the loss: labels not equal to
    ``ignore_index``, times ``loss_mask`` when given, after the causal shift
    (``shifted=True`` when ``labels`` are already shifted targets). Sum this over
    the micro-batches of one optimizer step (and over ranks under DDP) and pass
    it as ``num_items_in_batch``. HF's Trainer counts ``labels != -100`` and
    knows nothing of ``loss_mask``: t3s's collators fold a 0/1 mask's zeros into
    the labels by default (``fold_mask_into_labels=None``), which makes the
    Trainer's count exact; for weighted masks `t3s.LossMaskCallback` (or the T3S
    trainers) pass this value.
    """
    if loss_mask is not None:
        check_mask_shape(loss_mask, labels, "labels")
    if not shifted:
        labels, loss_mask = shift_for_causal_lm(labels, loss_mask, ignore_index=ignore_index)
    keep = (labels != ignore_index).float()
    if loss_mask is not None:
        keep = keep * loss_mask.to(device=keep.device).float()
    return keep.sum()


def _shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    pad = x.new_full(x.shape[:-1] + (1,), fill)
    return torch.cat([x[..., 1:], pad], dim=-1)


def check_mask_shape(loss_mask, labels: torch.Tensor, name: str) -> None:
    """`TypeError` / `ValueError` unless ``loss_mask`` is a tensor shaped like ``labels``."""
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a tensor, got {type(loss_mask).__name__}")
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)} but {name} has shape "
                         f"{tuple(labels.shape)}; it must be aligned with {name}")


def check_targets(targets: torch.Tensor, hidden: torch.Tensor) -> None:
    """`ValueError` unless the targets [...] match the hidden states [..., H] position for
    position."""
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"labels give targets of shape {tuple(targets.shape)} but the model "
                         f"produced hidden states of shape {tuple(hidden.shape[:-1])}")
