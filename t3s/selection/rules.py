"""The selection rules and baselines: Δc, the T3S anchor rule, the baselines a user
compares it with, the trajectory-signal rules and the diffusion-LM forced set.

Each rule takes a `TokenTable` or a plain tensor / array (see
`t3s.selection.inputs`; T = number of tokens, S = an array's shape) and returns
a ``loss_mask`` [T] bool table (True keeps a token in the loss), or the same
mask as a bool [S] of the input's type; `forced_mask` returns ``forced``
instead, and `confidence_change` the Δc values. Ties in the budgeted rules
break by key order (example_id, then position).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import TokenTable
from .inputs import (ARRAY_COLUMN, CONF_NAMES, DELTA_NAMES, LOSS_NAMES, Tokens, as_table, column_of,
                     column_values, fraction_count, key_order, mask_out, mask_table)

__all__ = [
    "confidence_change",
    "anchor_mask",
    "inverse_anchor_mask",
    "full_mask",
    "random_mask",
    "static_confidence_mask",
    "rho1_mask",
    "prob_threshold_mask",
    "SIGNAL_COLUMNS",
    "entropy_change_mask",
    "logit_grad_change_mask",
    "kl_mask",
    "forced_mask",
]


# --------------------------------------------------------------------------------------
# Confidence change
# --------------------------------------------------------------------------------------

def confidence_change(c0: Tokens, cb: Tokens, *, column: Optional[str] = None,
                      column_b: Optional[str] = None) -> Tokens:
    """Δc_t = c_t(θ_b) − c_t(θ_0) per token.

    c0, cb: tables of confidences (log-probs of the target token) at θ_0 and θ_b,
    one value column each (or pass ``column``/``column_b``). They must hold the
    same keys (any row order), else ValueError naming the differing keys.
    Returns a table with c0's keys and row order and float32 columns ``delta``,
    ``c0`` and ``cb``. For tensors / arrays [S] (same type and shape), returns
    Δc [S] of their (promoted) float dtype, float32 for integer inputs.
    """
    t0, s0 = as_table(c0, "c0")
    if s0 is not None:
        tb, _ = as_table(cb, "cb", like=s0)
        a = column_values(t0, column_of(column, s0), (), "c0")
        b = column_values(tb, column_of(column_b, s0), (), "cb")
        if s0.tensor:
            dtype = torch.promote_types(c0.dtype, cb.dtype)
            dtype = dtype if dtype.is_floating_point else torch.float32
            return (cb.detach().to(dtype) - c0.detach().to(cb.device, dtype))
        dtype = np.result_type(c0.dtype, cb.dtype)
        return s0.give_back(b - a, dtype if np.issubdtype(dtype, np.floating) else np.float32)
    a = column_values(c0, column, CONF_NAMES, "c0")
    b_table = c0.align(cb)                                  # raises when keys differ
    b = column_values(b_table, column_b, CONF_NAMES + ("cb",), "cb")
    return TokenTable(c0.example_id, c0.position,
                      {"delta": (b - a).astype(np.float32), "c0": a.astype(np.float32),
                       "cb": b.astype(np.float32)}, _validated=True)


# --------------------------------------------------------------------------------------
# Loss-mask rules
# --------------------------------------------------------------------------------------

def anchor_mask(delta: Tokens, *, threshold: float = 0.0, column: Optional[str] = None) -> Tokens:
    """The T3S AR rule: ``loss_mask = 0`` on anchors (Δc > threshold), 1 elsewhere.

    delta: table with a ``delta`` column [T]. ``threshold=0`` is the paper's rule;
    a token with Δc exactly 0 is kept. Returns ``loss_mask`` [T] bool. A
    tensor / array Δc [S] gives a bool mask [S] of the same type (True keeps).
    """
    delta, shape = as_table(delta, "delta")
    d = column_values(delta, column_of(column, shape), DELTA_NAMES, "delta")
    return mask_out(mask_table(delta, ~(d > threshold)), shape, "loss_mask")


def inverse_anchor_mask(delta: Tokens, *, threshold: float = 0.0,
                        column: Optional[str] = None) -> Tokens:
    """Inverse T3S (a baseline): train on the anchors only, ``loss_mask = (Δc > threshold)``."""
    delta, shape = as_table(delta, "delta")
    d = column_values(delta, column_of(column, shape), DELTA_NAMES, "delta")
    return mask_out(mask_table(delta, d > threshold), shape, "loss_mask")


def full_mask(keys: Tokens) -> Tokens:
    """Plain SFT: every token kept."""
    keys, shape = as_table(keys, "keys")
    return mask_out(mask_table(keys, np.ones(len(keys), dtype=bool)), shape, "loss_mask")


def random_mask(keys: Tokens, *, keep_fraction: Optional[float] = None, budget: Optional[int] = None,
                like: Optional[Tokens] = None, per_example: bool = False, seed: int = 0) -> Tokens:
    """Random masking with a fixed budget (the same-budget baseline).

    keys: any table; only its keys are used. Give exactly one of
      * ``keep_fraction``: keep round(keep_fraction · T) tokens;
      * ``budget``: keep exactly this many tokens;
      * ``like``: a loss-mask table over the same keys; keep as many tokens as it
        keeps (nonzero ``loss_mask``).
    ``per_example=True`` applies the budget within each example (with ``like``:
    each example keeps as many tokens as it does there; with ``keep_fraction``:
    round(keep_fraction · n_e) per example). The draw uses ``seed`` and is
    independent of row order. Returns ``loss_mask`` [T] bool. For a tensor /
    array [S] (``like`` then a mask of the same type and shape), a bool mask
    [S]; ``per_example`` is per row (index along the first dimension).
    """
    given = sum(x is not None for x in (keep_fraction, budget, like))
    if given != 1:
        raise ValueError("give exactly one of keep_fraction, budget or like")
    keys, shape = as_table(keys, "keys")
    if like is not None:
        like, _ = as_table(like, "like", like=shape)
        if shape is not None:
            like = mask_table(like, np.asarray(like[ARRAY_COLUMN]) != 0)
    rng = np.random.default_rng(seed)
    order = key_order(keys)
    sorted_eid = keys.example_id[order]
    keep_sorted = np.zeros(len(keys), dtype=bool)
    if not per_example:
        if like is not None:
            n_keep = int(np.count_nonzero(keys.align(like)["loss_mask"]))
        elif budget is not None:
            if not 0 <= budget <= len(keys):
                raise ValueError(f"budget must be in [0, {len(keys)}], got {budget}")
            n_keep = int(budget)
        else:
            n_keep = fraction_count(keep_fraction, len(keys), "keep_fraction")
        keep_sorted[rng.permutation(len(keys))[:n_keep]] = True
    else:
        if budget is not None:
            raise ValueError("per_example=True takes keep_fraction or like, not budget")
        like_sorted = None
        if like is not None:
            like_sorted = np.asarray(keys.align(like)["loss_mask"])[order] != 0
        bounds = np.flatnonzero(np.diff(sorted_eid)) + 1
        starts = np.concatenate([[0], bounds]).astype(int)
        ends = np.concatenate([bounds, [len(keys)]]).astype(int)
        for s, e in zip(starts, ends):
            n = e - s
            k = int(like_sorted[s:e].sum()) if like_sorted is not None else fraction_count(keep_fraction, n,
                                                                                   "keep_fraction")
            keep_sorted[s + rng.permutation(n)[:k]] = True
    keep = np.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return mask_out(mask_table(keys, keep), shape, "loss_mask")


def _top_rows(scores: np.ndarray, order: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices (into the table) of the k largest / smallest scores, ties by key order."""
    v = scores[order]
    ranked = np.argsort(-v if largest else v, kind="stable")
    return order[ranked[:k]]


def static_confidence_mask(c0: Tokens, fraction: float = 0.2, which: str = "top", *,
                           column: Optional[str] = None) -> Tokens:
    """Static baseline: mask the tokens with the highest (``which="top"``) or lowest
    (``"bottom"``) initial confidence c_t(θ_0).

    Exactly round(fraction · T) tokens get ``loss_mask = 0`` *(choice: a global
    rank over all tokens, not per example; ~20% by default)*. Returns
    ``loss_mask`` [T] bool.
    """
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    c0, shape = as_table(c0, "c0")
    c = column_values(c0, column_of(column, shape), CONF_NAMES, "c0")
    n_mask = fraction_count(fraction, len(c0), "fraction")
    keep = np.ones(len(c0), dtype=bool)
    keep[_top_rows(c, key_order(c0), n_mask, largest=(which == "top"))] = False
    return mask_out(mask_table(c0, keep), shape, "loss_mask")


def rho1_mask(loss_theta: Tokens, loss_ref: Tokens, keep_fraction: float, *,
              batch: Union[None, str, Sequence[int], np.ndarray, torch.Tensor] = None,
              column: Optional[str] = None, column_ref: Optional[str] = None) -> Tokens:
    """Rho-1 (arXiv 2404.07965): keep the tokens with the largest excess loss
    L_θ − L_ref, the top ``keep_fraction`` of each batch.

    loss_theta, loss_ref: per-token losses (−log p; column ``loss`` or the only
    column) of the training model and the reference model, same keys.
    batch: None ranks all tokens together; a column name of ``loss_theta`` or an
    array [T] (rows of ``loss_theta``) gives a batch id per token, and each batch
    keeps round(keep_fraction · n_batch) tokens. Returns ``loss_mask`` [T] bool
    (keys and row order of ``loss_theta``). Tensors / arrays [S] of one type
    and shape give a bool mask [S]; ``batch`` is then None or ids of shape [S].
    """
    loss_theta, shape = as_table(loss_theta, "loss_theta")
    loss_ref, _ = as_table(loss_ref, "loss_ref", like=shape)
    if shape is not None and batch is not None:
        if isinstance(batch, str) or tuple(np.shape(batch)) != shape.shape:
            raise ValueError(f"batch must be None or ids shaped like loss_theta {shape.shape}")
        batch = np.asarray(batch.cpu() if isinstance(batch, torch.Tensor) else batch).reshape(-1)
    lt = column_values(loss_theta, column_of(column, shape), LOSS_NAMES, "loss_theta")
    lr = column_values(loss_theta.align(loss_ref), column_of(column_ref, shape), LOSS_NAMES, "loss_ref")
    excess = lt - lr
    if batch is None:
        groups = np.zeros(len(loss_theta), dtype=np.int64)
    elif isinstance(batch, str):
        groups = np.asarray(loss_theta[batch])
    else:
        groups = np.asarray(batch)
        if groups.shape != (len(loss_theta),):
            raise ValueError(f"batch has shape {groups.shape}, expected ({len(loss_theta)},)")
    keep = np.zeros(len(loss_theta), dtype=bool)
    order = key_order(loss_theta)
    for g in np.unique(groups):
        rows = order[groups[order] == g]
        k = fraction_count(keep_fraction, rows.size, "keep_fraction")
        keep[_top_rows(excess, rows, k, largest=True)] = True
    return mask_out(mask_table(loss_theta, keep), shape, "loss_mask")


def prob_threshold_mask(c: Tokens, threshold: Union[float, Tuple[float, float]],
                        direction: str = "higher", *, column: Optional[str] = None) -> Tokens:
    """ProFit-style selection by token probability p = exp(c).

    * ``"higher"``: keep tokens with p > threshold;
    * ``"lower"``: keep tokens with p <= threshold;
    * ``"middle"``: ``threshold = (low, high)``, keep tokens with low < p <= high
      *(choice: the band between two thresholds; with these inequalities
      lower(low), middle(low, high) and higher(high) split the tokens exactly)*.

    c: confidences (log-probs), e.g. c_t(θ_0). Returns ``loss_mask`` [T] bool.
    """
    c, shape = as_table(c, "c")
    p = np.exp(column_values(c, column_of(column, shape), CONF_NAMES, "c"))
    if direction == "middle":
        try:
            low, high = threshold  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError("direction='middle' takes threshold=(low, high)") from None
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got ({low}, {high})")
        keep = (p > low) & (p <= high)
    elif direction in ("higher", "lower"):
        if not isinstance(threshold, (int, float, np.floating)):
            raise ValueError(f"direction={direction!r} takes one float threshold")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        keep = p > threshold if direction == "higher" else p <= threshold
    else:
        raise ValueError(f"direction must be 'higher', 'lower' or 'middle', got {direction!r}")
    return mask_out(mask_table(c, keep), shape, "loss_mask")


# --------------------------------------------------------------------------------------
# Rules from trajectory signals (`t3s.analysis.trajectory_signals`, θ0 -> θb)
# --------------------------------------------------------------------------------------

#: rule name -> the trajectory-signal column it reads
SIGNAL_COLUMNS = {"entropy": "delta_entropy", "logit_grad": "delta_logit_grad", "kl": "kl"}


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return float(value)


def entropy_change_mask(delta_entropy: Tokens, *, threshold: float = 0.0,
                        column: Optional[str] = None) -> Tokens:
    """Drop the tokens whose predictive entropy fell from θ0 to θb: ``loss_mask = 0``
    where ΔH = H(p_θb) − H(p_θ0) < −threshold, 1 elsewhere.

    The entropy analogue of the anchor rule (confidence up ≈ entropy down): the
    pilot became surer of these positions. delta_entropy: table with a
    ``delta_entropy`` column [T]; a token with ΔH exactly −threshold is kept.
    Returns ``loss_mask`` [T] bool; a tensor / array [S] gives a bool mask [S].
    """
    threshold = _finite(threshold, "threshold")
    delta_entropy, shape = as_table(delta_entropy, "delta_entropy")
    d = column_values(delta_entropy, column_of(column, shape), ("delta_entropy",), "delta_entropy")
    return mask_out(mask_table(delta_entropy, ~(d < -threshold)), shape, "loss_mask")


def logit_grad_change_mask(delta_logit_grad: Tokens, *, threshold: float = 0.0,
                           column: Optional[str] = None) -> Tokens:
    """Drop the tokens whose logit-gradient norm fell from θ0 to θb: ``loss_mask = 0``
    where Δ‖g‖ = ‖p_θb − e_y‖ − ‖p_θ0 − e_y‖ < −threshold (the tokens the pilot was
    fitting), 1 elsewhere.

    delta_logit_grad: table with a ``delta_logit_grad`` column [T]; a token with
    Δ‖g‖ exactly −threshold is kept. Returns ``loss_mask`` [T] bool; a tensor /
    array [S] gives a bool mask [S].
    """
    threshold = _finite(threshold, "threshold")
    delta_logit_grad, shape = as_table(delta_logit_grad, "delta_logit_grad")
    d = column_values(delta_logit_grad, column_of(column, shape), ("delta_logit_grad",),
                "delta_logit_grad")
    return mask_out(mask_table(delta_logit_grad, ~(d < -threshold)), shape, "loss_mask")


def kl_mask(kl: Tokens, fraction: Optional[float] = None, *, budget: Optional[int] = None,
            column: Optional[str] = None) -> Tokens:
    """Drop the tokens whose predictive distribution moved most from θ0 to θb: the
    largest KL(p_θb ‖ p_θ0).

    kl: table with a ``kl`` column [T]. Give exactly one of
      * ``fraction``: drop round(fraction · T) tokens;
      * ``budget``: keep exactly this many tokens (drop T − budget), as
        `random_mask`'s ``budget`` does, so the two can be given the same budget.
    A global rank over all tokens, ties by key order (as `static_confidence_mask`).
    Returns ``loss_mask`` [T] bool; a tensor / array [S] gives a bool mask [S].
    """
    if (fraction is None) == (budget is None):
        raise ValueError("give exactly one of fraction or budget")
    kl, shape = as_table(kl, "kl")
    v = column_values(kl, column_of(column, shape), ("kl",), "kl")
    if budget is not None:
        if not 0 <= budget <= len(kl):
            raise ValueError(f"budget must be in [0, {len(kl)}], got {budget}")
        n_drop = len(kl) - int(budget)
    else:
        n_drop = fraction_count(fraction, len(kl), "fraction")
    keep = np.ones(len(kl), dtype=bool)
    keep[_top_rows(v, key_order(kl), n_drop, largest=True)] = False
    return mask_out(mask_table(kl, keep), shape, "loss_mask")


# --------------------------------------------------------------------------------------
# Diffusion-LM forced set
# --------------------------------------------------------------------------------------

def forced_mask(delta: Tokens, tau: float = 0.2, *, column: Optional[str] = None) -> Tokens:
    """The diffusion-LM forced set S = {t : Δc_t < −τ}.

    NOT a loss mask: returns a bool column ``forced`` [T], True on the tokens that
    must be masked (corrupted) and reconstructed in addition to the usual random
    corruption. τ is on the log-prob scale; τ = 0.2 marks about 5% of tokens in
    the paper's setting. A tensor / array Δc [S] gives a bool [S] of the same
    type (True = forced).
    """
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    delta, shape = as_table(delta, "delta")
    d = column_values(delta, column_of(column, shape), DELTA_NAMES, "delta")
    out = TokenTable(delta.example_id, delta.position, {"forced": d < -tau}, _validated=True)
    return mask_out(out, shape, "forced")
