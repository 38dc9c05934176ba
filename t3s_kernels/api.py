"""Public functional API: `linear_cross_entropy` and `target_logprobs`.

Both pick a backend themselves from the registry (`t3s_kernels.backends`:
Triton on CUDA, the C++ kernels on CPU, the PyTorch reference elsewhere) and
accept ``backend=`` with a registered name (`available_backends()`) to force
one. A small CPU problem (N x V x H up to `dense.DENSE_MACS`) with the backend
left automatic runs on materialised logits instead (`t3s_kernels.dense`), where
the streaming path's fixed cost per call would make it slower than torch eager. ``backend="triton"``
also runs on CPU tensors when TRITON_INTERPRET=1 was set before this package
was imported (that is how CI tests the real kernels).

Both are `torch.compile`-friendly: the static checks below are traced, and the
work runs in the custom ops of `t3s_kernels.ops` (static output shapes; the
compaction of kept rows and its host sync happen inside them).

For reduction 'mean' or 'sum' with a gradient wanted, the loss op computes the
gradients in its forward (`ops.linear_ce_forward_backward`); the backward then
only scales them by grad_output. 'none' keeps the deferred backward. Token
scaling (DFT) rides along on both: the one-pass op scales each token's gradient
coefficient by its p inside the pass; the deferred path multiplies the per-token
losses by the stop-gradient p the forward op returns.

Semantics are specified in `t3s_kernels.reference`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from . import dense, ops, reference
from .backends import available_backends, resolve_backend
from .debug import OVERRIDES
from .lse_output import differentiable_lse
from .prepare import (
    DEFAULT_BUFFER_BYTES,
    check_linear_inputs,
    check_class_weight,
    check_loss_mask,
    check_options,
    check_scale,
    check_softcap,
    resolve_filter_eps,
    shift_labels,
    token_weights,
)

__all__ = ["TokenStats", "TargetLogprobs", "available_backends", "linear_cross_entropy",
           "target_logprobs"]


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like `targets`.

    Computed in the loss pass for the tokens that enter the loss; tokens that
    are ignored or dropped hold NaN (argmax_correct: False).
    """

    target_logprob: torch.Tensor  # float32, log p(y_t) = z_y - lse
    entropy: torch.Tensor  # float32, -sum_j p_j log p_j
    argmax_correct: torch.Tensor  # bool, argmax_j z_j == y_t
    lse: torch.Tensor  # float32, log sum_j exp z_j


class TargetLogprobs(NamedTuple):
    """Output of `target_logprobs` when entropy or argmax is requested."""

    logprobs: torch.Tensor  # float32, shaped like targets; NaN at ignore_index
    entropy: Optional[torch.Tensor]  # float32 or None; NaN at ignore_index
    argmax: Optional[torch.Tensor]  # int64 or None; -1 at ignore_index


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, int, float, torch.Tensor] = None,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    filter_eps: Union[str, float, None] = "auto",
    accum_dtype: torch.dtype = torch.float32,
    return_stats: bool = False,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    backend: Optional[str] = None,
    token_scaling: bool = False,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    class_weight: Optional[torch.Tensor] = None,
    shift: int = 0,
    return_lse: bool = False,
):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising the logits.

    Args:
        hidden: [..., H] float16 / bfloat16 / float32 (float64 on the torch backend).
        weight: [V, H], same dtype and device as hidden.
        targets: [...] integer labels in [0, V) or ``ignore_index``.
        bias: optional [V].
        loss_mask: optional [...] bool or float. 0 drops a token (removed before
            any matmul), 1 keeps it, other values (>= 0) weight it. No gradient
            flows into it.
        ignore_index: label value that drops a token.
        reduction: 'mean' (sum w l / sum w; 0 if nothing is kept), 'sum', or
            'none' (w * l shaped like targets; a per-token grad_output is honoured).
        normalizer: replaces the 'mean'/'sum' denominator, e.g. num_items_in_batch.
        label_smoothing: as in ``F.cross_entropy``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma-style).
        z_loss: coefficient on lse**2 added to each token's loss.
        filter_eps: 'auto' (= finfo(dtype).eps / 32) lets the kernels skip
            gradient tiles whose every entry is below it; a number sets the
            threshold; None is exact. The reference backend is always exact.
        accum_dtype: dtype in which grad_weight contributions are summed:
            torch.float32 (default) or the weight's own dtype (no fp32 buffer,
            lossier).
        return_stats: also return `TokenStats` computed in the same pass.
        buffer_bytes: bound on any temporary buffer (default 256 MiB).
        backend: None (automatic) or a registered name ('triton', 'torch'; see
            `available_backends`).
        token_scaling: DFT (TRL's ``loss_type="dft"``, Liger's ``use_token_scaling``):
            each kept token's loss l_t is multiplied by its target probability
            p_t = exp(target log-prob) of the (softcapped) logits, with no gradient
            through p_t. It composes with the token weights and every option above
            (label smoothing, z_loss: the multiplier is still the plain p_t); the
            reductions keep their denominators ('mean' = sum w p l / sum w, 'none'
            gives w p l). The returned statistics are unscaled. Computed in the
            same pass: no extra pass over the vocabulary.
        logit_scale: multiplies the raw logits before the softcap (Cohere / Granite heads).
        temperature: divides the logits after the softcap, before the softmax (TRL, GRPO);
            the order is scale, softcap, temperature. Both > 0; 1.0 costs nothing.
        class_weight: optional [V] per-class weights with ``F.cross_entropy``'s
            ``weight=`` semantics: a token's loss is weighted by its target's class
            weight, label smoothing by each class's ('mean' divides by
            sum_t w_t class_weight[y_t]; `t3s_kernels.reference`). The z-loss term is not
            class-weighted. No gradient flows into it.
        shift: 0, or 1 for the causal-LM label shift inside the op (as HF and CCE):
            hidden [..., T, H] with unshifted labels [..., T]; position t is scored
            against label t + 1 (and loss_mask t + 1), the last position of each sequence
            is dropped. Done on the labels, so hidden is not copied; 'none' still returns
            [..., T], 0 at each last position. A [N, H] hidden is one sequence.

        return_lse: also return each token's log-sum-exp of its (transformed) logits,
            differentiable: [...] shaped like targets, float32 (float64 for float64
            inputs), 0 with no gradient on dropped tokens. Free in the forward (the
            loss pass's own statistic); a backward that gives it a non-zero gradient
            adds one chunked pass over those rows (`t3s_kernels.lse_output`). E.g. a
            z-loss of your own: ``loss + 1e-4 * lse.pow(2).sum() / n_kept``.

    Returns:
        The loss (float32; float64 for float64 inputs), then the lse when
        ``return_lse``, then `TokenStats` when ``return_stats``: ``loss``,
        ``(loss, lse)``, ``(loss, stats)`` or ``(loss, lse, stats)``.

    Shapes, dtypes and options are checked here; label range and mask values
    inside the op, with the one host sync that also sizes the list of kept
    tokens (a second one in the backward when it is deferred, i.e. for
    reduction='none'). Both raise before any kernel runs.

    For 'mean' / 'sum' with a gradient wanted, the gradients are computed in
    the forward and held until the backward scales them by grad_output (the
    Triton backend: one logit GEMM plus the kept tiles of the two backward
    GEMMs, when its buffers fit ``buffer_bytes``; see
    `t3s_kernels.triton.forward_backward`).

    Second derivatives are exact: a backward with ``create_graph=True`` computes the
    gradients differentiably on the kept rows' materialised logits
    (`t3s_kernels.second_order`); an ordinary backward is unaffected.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    check_loss_mask(loss_mask, targets)
    check_options(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                  z_loss=z_loss, normalizer=normalizer, filter_eps=filter_eps,
                  accum_dtype=accum_dtype, weight_dtype=weight.dtype, buffer_bytes=buffer_bytes,
                  token_scaling=token_scaling)
    check_scale(logit_scale, temperature)
    check_class_weight(class_weight, weight, hidden)
    targets, loss_mask = shift_labels(targets, loss_mask, ignore_index, shift)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    small = backend is None and dense.preferred(hidden2d, weight)
    if small:
        dense.log_choice(hidden2d, weight)
    else:
        backend = resolve_backend(backend, hidden)
    if weight.dtype == torch.float64:
        accum_dtype = torch.float64  # never sum below the weight's own precision
    lead_shape = targets.shape
    targets1d = targets.reshape(-1).long()
    mask1d = None if loss_mask is None else loss_mask.reshape(-1)
    bias = None if bias is None else bias.contiguous()
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    want_stats = return_stats or return_lse  # the lse is one of the pass's statistics
    options = (float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
               resolve_filter_eps(filter_eps, hidden.dtype), accum_dtype, buffer_bytes,
               want_stats)
    token_weight = token_weights(targets1d, mask1d, ignore_index)
    cw = (None if class_weight is None
          else class_weight.to(reference.compute_dtype_for(hidden.dtype)).contiguous())
    mean_weight = reference.mean_weights(token_weight, targets1d, cw)
    extra = dict(logit_scale=float(logit_scale), temperature=float(temperature),
                 class_weight=cw)
    need = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if small:
        loss, stats = dense.linear_cross_entropy(
            hidden2d, weight, bias, targets1d, mask1d, token_weight, ignore_index, reduction,
            normalizer, *options[:3], want_stats, token_scaling, **extra)
        lse, logprob, entropy, correct = stats if want_stats else (None,) * 4
    elif _gradient_in_forward(reduction, normalizer, need):
        grad_scale = _grad_scale(token_weight, reduction, normalizer,
                                 reference.compute_dtype_for(hidden.dtype), mean_weight)
        loss, lse, logprob, entropy, correct, *_grads = ops.linear_ce_forward_backward(
            hidden2d, weight, bias, targets1d, mask1d, grad_scale, ignore_index, *options,
            *need, backend, token_scaling, **extra)
    else:
        token_loss, lse, logprob, entropy, correct = ops.linear_ce_forward(
            hidden2d, weight, bias, targets1d, mask1d, ignore_index, *options, backend,
            token_scaling, **extra)
        if token_scaling:  # the op returned log p_t [N] for this (NaN on dropped rows)
            token_loss = token_loss * reference.token_scale(logprob, token_weight,
                                                            token_loss.dtype)
        loss = reference.reduce_token_losses(token_loss, token_weight, reduction, normalizer,
                                             mean_weight)
    if reduction == "none":
        loss = loss.view(lead_shape)
    out = (loss,)
    if return_lse:
        out += (differentiable_lse(hidden2d, weight, bias, lse, token_weight != 0,
                                   options[2], logit_scale, temperature,
                                   buffer_bytes).view(lead_shape),)
    if not return_stats:
        return out if return_lse else loss
    token_stats = TokenStats(
        target_logprob=logprob.float().view(lead_shape),
        entropy=entropy.view(lead_shape),
        argmax_correct=correct.view(lead_shape),
        lse=lse.float().view(lead_shape),
    )
    return (*out, token_stats)


def _gradient_in_forward(reduction: str, normalizer, need) -> bool:
    """Whether the loss takes its gradient in the forward pass (`ops.linear_ce_forward_backward`):
    for the scalar reductions, when autograd will want a gradient of hidden, weight or
    bias. 'none' keeps the deferred backward (its per-token grad_output is unknown
    until then), and so does a normalizer that itself requires grad.
    ``OVERRIDES["grad_in_forward"] = False`` forces the deferred backward (tests)."""
    if reduction == "none" or not torch.is_grad_enabled() or not any(need):
        return False
    if isinstance(normalizer, torch.Tensor) and normalizer.requires_grad:
        return False
    return OVERRIDES.get("grad_in_forward", True)


def _grad_scale(token_weight: torch.Tensor, reduction: str, normalizer,
                dtype: torch.dtype, mean_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d loss / d token_loss_t [N] = w_t / denominator, with the denominator of
    `reference.reduce_token_losses` (normalizer; 1 for 'sum'; sum_t w_t for 'mean', or
    sum_t mean_weight_t under class weights; an all-dropped batch giving 0 gradients,
    not 0/0)."""
    w = token_weight.to(dtype)
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=dtype, device=w.device).reshape(())
        return w / denom
    if reduction == "sum":
        return w
    denom = w.sum() if mean_weight is None else mean_weight.to(dtype).sum()
    return w / denom.clamp_min(torch.finfo(dtype).tiny)


@torch.no_grad()
def target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    return_argmax: bool = False,
    ignore_index: int = -100,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    backend: Optional[str] = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    shift: int = 0,
):
    """Forward-only per-token log p(target) of ``hidden @ weight.T (+ bias)``, streamed.

    Args:
        hidden: [..., H]; weight: [V, H]; targets: [...] in [0, V) or ignore_index.
        bias: optional [V]. softcap: as in `linear_cross_entropy`.
        return_entropy / return_argmax: also return the entropy of each row's
            distribution and its argmax token, in the same pass.
        ignore_index: rows with this target are skipped (NaN / -1 in the output).
        logit_scale, temperature: as in `linear_cross_entropy` (scale, softcap,
            temperature; e.g. a sampler's temperature for GRPO's log-probs).
        shift: 0, or 1 for the causal-LM shift, as in `linear_cross_entropy`: position
            t of hidden [..., T, H] is scored on the label at t + 1 of the unshifted
            ``targets`` [..., T]; each sequence's last position is skipped (NaN).

    Returns:
        float32 log-probs shaped like targets, or `TargetLogprobs` when an extra
        output is requested. Extra memory is O(N); nothing is kept for backward.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    check_softcap(softcap)
    check_scale(logit_scale, temperature)
    targets, _ = shift_labels(targets, None, ignore_index, shift)
    hidden2d = hidden.detach().reshape(-1, hidden.shape[-1])
    args = (hidden2d, weight.detach(), None if bias is None else bias.detach().contiguous(),
            targets.reshape(-1).long(), ignore_index, None if softcap is None else float(softcap),
            return_entropy, return_argmax)
    scale = dict(logit_scale=float(logit_scale), temperature=float(temperature))
    if backend is None and dense.preferred(hidden2d, weight):
        dense.log_choice(hidden2d, weight)
        logprob, entropy, argmax = dense.target_logprobs(*args, **scale)
    else:
        backend = resolve_backend(backend, hidden)
        logprob, entropy, argmax = ops.target_logprobs_op(*args, buffer_bytes, backend,
                                                          **scale)
    lead_shape = targets.shape
    logprob = logprob.view(lead_shape)
    if not (return_entropy or return_argmax):
        return logprob
    return TargetLogprobs(
        logprobs=logprob,
        entropy=entropy.view(lead_shape) if return_entropy else None,
        argmax=argmax.view(lead_shape) if return_argmax else None,
    )
