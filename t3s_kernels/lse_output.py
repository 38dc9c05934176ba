"""The differentiable log-sum-exp output of `linear_cross_entropy` (``return_lse=True``).

The forward costs nothing extra: the lse of every kept row comes out of the loss's own
pass (its statistics), and `differentiable_lse` only wraps it. Its gradient,

    d lse_t / d r_tj = p_tj * dz_tj / dr_tj,   z = softcap(logit_scale * r) / temperature,
    dz/dr = (logit_scale / temperature) * (1 - tanh(logit_scale * r / softcap)**2)
            (logit_scale / temperature without a softcap),

is computed only when the backward hands the lse a gradient that is non-zero on some
kept row (an lse that feeds nothing, or a zero gradient, costs nothing or one check): a
second, chunked pass over the rows with a non-zero gradient recomputes their logits
(bounded by ``buffer_bytes``) and adds p-weighted GEMMs into hidden, weight and bias.
The loss's own gradient (possibly computed in the forward) is untouched; autograd sums
the two. The pass is built from differentiable ops, so under ``create_graph=True`` it is
itself differentiated exactly (second derivatives through the lse output).

Legend: N tokens, H hidden, V vocabulary, K rows with a non-zero lse gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference

__all__ = ["differentiable_lse", "lse_input_grads"]


def lse_input_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    grad_lse: torch.Tensor, softcap: Optional[float], logit_scale: float,
                    temperature: float, buffer_bytes: int, need=(True, True, True)):
    """Gradients of sum_t grad_lse_t * lse_t with respect to (hidden [N, H], weight [V, H],
    bias [V]), in their dtypes (None where not needed). grad_lse: [N], 0 on the rows to
    skip (dropped tokens, unused rows); only its non-zero rows are recomputed. Exact
    (no tile filtering), in the inputs' compute dtype; differentiable ops only."""
    cd = reference.compute_dtype_for(hidden.dtype)
    rows = torch.nonzero(grad_lse != 0).squeeze(1)  # the one host sync, in the backward
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=cd, device=bias.device) if need_b else None
    step = reference.rows_per_chunk(weight.shape[0], buffer_bytes)
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        h = hidden.index_select(0, idx).to(cd)
        z = reference.logits_ref(h, w, b, softcap, logit_scale, temperature)  # [K, V]
        g = torch.softmax(z, dim=1) * grad_lse.index_select(0, idx).to(cd)[:, None]  # d / d z
        # through the logit map to d / d r, as `reference.logit_grad` does
        if softcap is not None:
            g = g * (1.0 - (z / (softcap / temperature)) ** 2)
        if logit_scale != temperature:
            g = g * (logit_scale / temperature)
        # out-of-place accumulation: under create_graph these sums are themselves
        # differentiated
        if need_h:
            grad_h = grad_h.index_add(0, idx, g @ w)
        if need_w:
            grad_w = grad_w + g.T @ h
        if need_b:
            grad_b = grad_b + g.sum(0)
    return (None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


class _Lse(torch.autograd.Function):
    """lse [N] (0 on dropped rows) as a function of hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lse, kept, softcap, logit_scale, temperature,
                buffer_bytes):
        ctx.save_for_backward(hidden, weight, bias, kept)
        ctx.opts = (softcap, logit_scale, temperature, buffer_bytes)
        return torch.where(kept, lse, torch.zeros((), dtype=lse.dtype, device=lse.device))

    @staticmethod
    def backward(ctx, grad_lse):
        hidden, weight, bias, kept = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if grad_lse is None or not any(need):
            return (None,) * 9
        g = torch.where(kept, grad_lse, torch.zeros((), dtype=grad_lse.dtype,
                                                    device=grad_lse.device))
        grads = lse_input_grads(hidden, weight, bias, g, *ctx.opts, need=need)
        return (*grads, None, None, None, None, None, None)


def differentiable_lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       lse: torch.Tensor, kept: torch.Tensor, softcap: Optional[float],
                       logit_scale: float, temperature: float,
                       buffer_bytes: int) -> torch.Tensor:
    """lse [N] float32 (float64 for float64 inputs) with a gradient into hidden [N, H],
    weight [V, H] and bias [V]. lse: the loss pass's per-row lse [N] (any value on dropped
    rows); kept: [N] bool, the rows that count (others are 0, with no gradient)."""
    out_dtype = reference.compute_dtype_for(hidden.dtype)
    return _Lse.apply(hidden, weight, bias, lse.detach().to(out_dtype), kept, softcap,
                      float(logit_scale), float(temperature), buffer_bytes)
