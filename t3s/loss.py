"""`masked_ce`: the drop-in loss of T3S training."""

from __future__ import annotations

from typing import Optional, Union

import torch

from t3s_kernels import linear_cross_entropy


def masked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    normalizer: Union[None, int, float, torch.Tensor] = None,
    token_scaling: bool = False,
    **kernel_options,
):
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` with a per-token loss mask.

    hidden: [..., H]; weight: [V, H]; labels: [...] int64; loss_mask: [...]
    bool or float (1 keeps, 0 drops, other values weight a token).

    With ``loss_mask=None`` this equals::

        F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2),
                        labels.flatten(), ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    except that a batch with no kept token gives 0 (not NaN) under 'mean'.
    With a mask, 'mean' is sum(w * l) / sum(w) over kept, non-ignored tokens;
    ``normalizer`` (e.g. ``num_items_in_batch``) replaces the denominator.
    ``token_scaling=True`` is DFT (TRL's ``loss_type="dft"``): each kept token's
    loss is multiplied by its target probability exp(log p(y_t)), no gradient
    flowing through that factor; weights and denominators stay as above.
    The logits are never materialised. Further keyword arguments
    (``z_loss``, ``filter_eps``, ``accum_dtype``, ``return_stats``,
    ``buffer_bytes``, ``backend``) go to `t3s_kernels.linear_cross_entropy`.
    """
    return linear_cross_entropy(
        hidden, weight, labels, bias=bias, loss_mask=loss_mask, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, label_smoothing=label_smoothing,
        softcap=softcap, token_scaling=token_scaling, **kernel_options)
