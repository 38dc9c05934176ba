"""The masked-diffusion SFT loss, with T3S's forced set, through the fused linear-CE kernel.

Legend: B sequences, L padded length, H hidden size, V vocabulary size.

LLaDA's SFT objective (Nie et al. 2025, eq. for SFT) for a batch of B
sequences, each with ``L_b`` response tokens and noise level t_b::

    loss = (1/B) Σ_b (1/L_b) Σ_{i masked in b} (1/t_b) · CE(x_i | noisy x_b)

i.e. every masked token carries the float weight ``w_i = 1 / (t_b · L_b · B)``
and the loss is Σ w_i · CE_i. `t3s_kernels.linear_cross_entropy` takes these
weights as its ``loss_mask`` (``reduction="sum"``): unmasked tokens have weight 0
and are removed before any matmul, and no N×V logits exist.

Forced tokens (T3S's S = {Δc < −τ}) are masked with probability 1, not t_b.
``forced_weight`` says how they are weighted *(choice)*:

* ``"inv_t"`` (default): like every other masked token, 1/t_b. The forced set
  adds positions to the reconstruction; the per-sequence scale stays LLaDA's.
* ``"unit"``: weight 1 (``w_i = 1 / (L_b · B)``), the importance weight of a
  token masked with probability 1; a forced token then counts less than a
  randomly masked one at small t (1 ≤ 1/t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from t3s_kernels import linear_cross_entropy

from .masking import DEFAULT_EPS, Corruption, corrupt

__all__ = ["FORCED_WEIGHTS", "diffusion_token_weights", "masked_diffusion_loss", "DiffusionLoss",
           "diffusion_sft_loss"]

#: the weightings of forced tokens (see the module docstring)
FORCED_WEIGHTS = ("inv_t", "unit")


def diffusion_token_weights(corruption: Corruption, *, forced_weight: str = "inv_t") -> torch.Tensor:
    """[B, L] float32 loss weights of LLaDA's SFT objective (0 on unmasked tokens).

    ``w = 1 / (t_b · L_b · B)`` on masked tokens, L_b the response length of
    sequence b; with ``forced_weight="unit"`` forced tokens get ``1 / (L_b · B)``.
    Raises ValueError when the batch has no response token.
    """
    if forced_weight not in FORCED_WEIGHTS:
        raise ValueError(f"forced_weight must be one of {FORCED_WEIGHTS}, got {forced_weight!r}")
    c = corruption
    lengths = c.response.sum(1).to(torch.float32)  # [B]
    if not bool((lengths > 0).any()):
        raise ValueError("the batch has no response token: nothing to reconstruct")
    B = c.masked.shape[0]
    per_seq = 1.0 / (lengths.clamp(min=1.0) * B)                       # [B]
    inv_t = (1.0 / c.t)[:, None] * per_seq[:, None]                    # [B, 1]
    w = c.masked.to(torch.float32) * inv_t
    if forced_weight == "unit":
        w = torch.where(c.forced, per_seq[:, None].expand_as(w), w)
    return w


def masked_diffusion_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          token_weights: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                          softcap: Optional[float] = None, **kernel_options) -> torch.Tensor:
    """Σ_i w_i · CE(softcap(hidden_i @ weight.T + bias), targets_i), fused (no logits kept).

    hidden: [B, L, H] (or [N, H]); weight: [V, H]; targets: [B, L] int64, the
    clean tokens; token_weights: [B, L] float ≥ 0 (`diffusion_token_weights`).
    Further options go to `t3s_kernels.linear_cross_entropy`. Returns a float32
    scalar (0 when every weight is 0).
    """
    if not isinstance(token_weights, torch.Tensor) or not token_weights.is_floating_point():
        raise TypeError("token_weights must be a float tensor")
    if not bool(torch.isfinite(token_weights).all()):
        raise ValueError("token_weights must be finite")
    return linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=token_weights,
                                reduction="sum", softcap=softcap, **kernel_options)


@dataclass
class DiffusionLoss:
    """The loss of one batch and what produced it.

    loss: float32 scalar. corruption: the `Corruption` (noisy ids, masks, t).
    metrics: ``forced_fraction`` (forced / response tokens), ``masked_fraction``
    (random ∪ forced / response tokens), ``mean_t``, ``masked_tokens``,
    ``response_tokens``.
    """

    loss: torch.Tensor
    corruption: Corruption
    metrics: Dict[str, float]


def diffusion_sft_loss(adapter, input_ids: torch.Tensor, response: torch.Tensor, *,
                       attention_mask: Optional[torch.Tensor] = None,
                       forced: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None,
                       eps: float = DEFAULT_EPS, forced_weight: str = "inv_t",
                       generator: Optional[torch.Generator] = None,
                       **kernel_options) -> DiffusionLoss:
    """The masked-diffusion SFT loss of a batch (see the module docstring).

    adapter: a `t3s.dllm.MaskedLMAdapter`. input_ids: [B, L] clean tokens;
    response: [B, L] bool, the tokens that may be masked (response, no padding);
    attention_mask: [B, L] (default: ones); forced: [B, L] bool, always masked
    (response positions only); t: [B] fixed noise levels (default: drawn from
    U(eps, 1)). The random draws use ``generator`` (default: torch's global RNG).
    """
    c = corrupt(input_ids, response, adapter.mask_token_id, forced=forced, t=t, eps=eps,
                generator=generator)
    w = diffusion_token_weights(c, forced_weight=forced_weight)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = adapter.hidden_states(c.noisy_ids, attention_mask)
    head_w, head_b = adapter.head_tensors()
    if hidden.dtype != head_w.dtype:
        hidden = hidden.to(head_w.dtype)
    loss = masked_diffusion_loss(hidden, head_w, input_ids, w, bias=head_b,
                                 softcap=adapter.softcap, **kernel_options)
    n_resp = int(c.response.sum())
    metrics = {"forced_fraction": c.forced_fraction, "masked_fraction": c.masked_fraction,
               "mean_t": float(c.t.mean()), "masked_tokens": float(c.masked.sum()),
               "response_tokens": float(n_resp)}
    return DiffusionLoss(loss=loss, corruption=c, metrics=metrics)
