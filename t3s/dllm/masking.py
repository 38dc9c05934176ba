"""Corruption of a masked-diffusion LM's training batch: noise levels, random and forced masks.

Legend: B sequences, L padded length.

Per sequence b a noise level t_b ~ U(eps, 1) is drawn, and each *response*
token (``response [B, L]`` True) is replaced by the model's mask token with
probability t_b, independently. Tokens of the forced set (``forced [B, L]``,
e.g. T3S's S = {Δc < −τ} from an autoregressive selector) are masked always,
on top of the random ones; the union is what the model reconstructs. Prompt
and padding positions are never masked, and a forced position outside the
response is refused rather than dropped: it means the forced set belongs to
other data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Corruption", "sample_noise_levels", "corrupt", "DEFAULT_EPS"]

#: lower end of the noise-level interval: t ~ U(eps, 1) keeps 1/t bounded by 1/eps
DEFAULT_EPS = 1e-3


@dataclass
class Corruption:
    """One corrupted batch.

    noisy_ids: [B, L] int64, the input ids with the mask token at ``masked``.
    masked: [B, L] bool, every masked position (random ∪ forced), all in the response.
    forced: [B, L] bool, the forced positions (all False without a forced set).
    random: [B, L] bool, the positions the random draw masked (forced ones included
        when the draw hit them too).
    t: [B] float32, the noise level of each sequence.
    response: [B, L] bool, the response positions (the only maskable ones).
    """

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    forced: torch.Tensor
    random: torch.Tensor
    t: torch.Tensor
    response: torch.Tensor

    @property
    def forced_fraction(self) -> float:
        """Forced tokens / response tokens of the batch (0.0 when there is no response token)."""
        n = int(self.response.sum())
        return float(self.forced.sum()) / n if n else 0.0

    @property
    def masked_fraction(self) -> float:
        """Masked tokens (random ∪ forced) / response tokens of the batch."""
        n = int(self.response.sum())
        return float(self.masked.sum()) / n if n else 0.0


def sample_noise_levels(batch_size: int, *, eps: float = DEFAULT_EPS, device=None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """t [B] float32 ~ U(eps, 1), one noise level per sequence."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
    return eps + (1.0 - eps) * u


def _check_bool(x: torch.Tensor, name: str, shape) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype != torch.bool:
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be bool (or 0/1 integers), got {x.dtype}")
        if bool(((x != 0) & (x != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1")
        x = x.bool()
    return x


def corrupt(input_ids: torch.Tensor, response: torch.Tensor, mask_token_id: int, *,
            forced: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None,
            eps: float = DEFAULT_EPS, generator: Optional[torch.Generator] = None) -> Corruption:
    """Mask response tokens at random (probability t_b per token) and every forced token.

    input_ids: [B, L] int64. response: [B, L] bool (or 0/1), True on the tokens
    that may be masked (the response, without padding). mask_token_id: the
    model's mask token. forced: optional [B, L] bool, positions always masked;
    each must be a response position (ValueError otherwise). t: optional [B]
    noise levels in (0, 1]; drawn from U(eps, 1) when None. ``generator`` makes
    the draws reproducible.

    Returns a `Corruption`. A sequence whose random draw masks nothing and that
    has no forced token contributes no loss this step (its expected weight is
    still right: the 1/t weighting is unbiased over draws).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, L] tensor")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    B, L = input_ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"empty batch: input_ids has shape {(B, L)}")
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    response = _check_bool(response, "response", (B, L)).to(input_ids.device)
    if forced is None:
        forced = torch.zeros_like(response)
    else:
        forced = _check_bool(forced, "forced", (B, L)).to(input_ids.device)
        outside = forced & ~response
        if bool(outside.any()):
            rows = torch.nonzero(outside.any(1)).flatten().tolist()
            raise ValueError(f"forced positions outside the response in rows {rows[:8]} "
                             f"({int(outside.sum())} tokens): the forced set must come from "
                             "the same examples (response tokens only)")
    if t is None:
        t = sample_noise_levels(B, eps=eps, device=input_ids.device, generator=generator)
    else:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,):
            raise ValueError(f"t must be a [B] = [{B}] tensor")
        if not t.is_floating_point():
            raise TypeError(f"t must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()) or bool((t > 1).any()):
            raise ValueError("t must lie in (0, 1]")
        t = t.to(device=input_ids.device, dtype=torch.float32)
    u = torch.rand((B, L), generator=generator, device=input_ids.device, dtype=torch.float32)
    random = (u < t[:, None]) & response
    masked = random | forced
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return Corruption(noisy_ids=noisy, masked=masked, forced=forced, random=random, t=t,
                      response=response)
