"""Public functional API: `linear_cross_entropy` and `target_logprobs`.

Both pick a backend themselves (Triton on CUDA, the PyTorch reference
elsewhere) and accept ``backend="triton" | "torch"`` to force one.
``backend="triton"`` also runs on CPU tensors when TRITON_INTERPRET=1 was set
before this package was imported (that is how CI tests the real kernels).

Semantics are specified in `t3s_kernels.reference`.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Union

import torch

from . import reference
from ._checks import (
    DEFAULT_BUFFER_BYTES,
    KERNEL_DTYPES,
    Prepared,
    check_linear_inputs,
    check_loss_mask,
    check_options,
    check_softcap,
    flatten_and_weigh,
    resolve_filter_eps,
)

try:  # Triton is optional: without it everything runs on the reference.
    from . import triton_linear_ce, triton_lse
except ImportError as _triton_import_error:  # pragma: no cover - depends on the install
    triton_linear_ce = triton_lse = None
    _TRITON_ERROR: Optional[BaseException] = _triton_import_error
else:
    _TRITON_ERROR = None

BACKENDS = ("triton", "torch")


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


def available_backends() -> tuple:
    """Backends usable in this process ('torch' always)."""
    return BACKENDS if triton_lse is not None else ("torch",)


def _resolve_backend(backend: Optional[str], hidden: torch.Tensor) -> str:
    if backend is None:
        if not hidden.is_cuda:
            return "torch"
        if triton_lse is None:
            _warn_once(f"t3s_kernels: Triton is unavailable ({_TRITON_ERROR}); "
                       "using the PyTorch reference")
            return "torch"
        if hidden.dtype not in KERNEL_DTYPES:
            _warn_once(f"t3s_kernels: the Triton kernels take fp16/bf16/fp32, not "
                       f"{hidden.dtype}; using the PyTorch reference")
            return "torch"
        return "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if triton_lse is None:
            raise ValueError(f"backend='triton' but Triton failed to import: {_TRITON_ERROR}")
        if hidden.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, "
                            f"got {hidden.dtype}")
        triton_lse.check_triton_device(hidden)
    return backend


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _scatter_rows(values: torch.Tensor, prep: Prepared, fill) -> torch.Tensor:
    out = torch.full((prep.targets.numel(),), fill, dtype=values.dtype, device=values.device)
    out[prep.kept_rows] = values
    return out.view(prep.lead_shape)


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
        backend: None (automatic), 'triton' or 'torch'.

    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, TokenStats)``
        when ``return_stats``.

    Validation performs one host sync (label range and the number of kept
    tokens); everything else stays on the device.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    check_loss_mask(loss_mask, targets)
    check_options(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                  z_loss=z_loss, normalizer=normalizer, filter_eps=filter_eps,
                  accum_dtype=accum_dtype, weight_dtype=weight.dtype, buffer_bytes=buffer_bytes)
    backend = _resolve_backend(backend, hidden)
    if weight.dtype == torch.float64:
        accum_dtype = torch.float64  # never sum below the weight's own precision
    prep = flatten_and_weigh(hidden, weight, targets,
                             bias.contiguous() if bias is not None else None,
                             loss_mask, ignore_index)
    token_losses = (triton_linear_ce.token_losses_triton if backend == "triton"
                    else reference.token_losses_ref)
    loss_kept, stats = token_losses(
        prep, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        filter_eps=resolve_filter_eps(filter_eps, hidden.dtype), accum_dtype=accum_dtype,
        buffer_bytes=buffer_bytes, want_stats=return_stats)
    loss = reference.reduce_token_losses(loss_kept, prep, reduction, normalizer)
    if not return_stats:
        return loss
    nan = float("nan")
    token_stats = TokenStats(
        target_logprob=_scatter_rows(stats["target_logprob"].float(), prep, nan),
        entropy=_scatter_rows(stats["entropy"].float(), prep, nan),
        argmax_correct=_scatter_rows(stats["argmax_correct"], prep, False),
        lse=_scatter_rows(stats["lse"].float(), prep, nan),
    )
    return loss, token_stats


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
):
    """Forward-only per-token log p(target) of ``hidden @ weight.T (+ bias)``, streamed.

    Args:
        hidden: [..., H]; weight: [V, H]; targets: [...] in [0, V) or ignore_index.
        bias: optional [V]. softcap: as in `linear_cross_entropy`.
        return_entropy / return_argmax: also return the entropy of each row's
            distribution and its argmax token, in the same pass.
        ignore_index: rows with this target are skipped (NaN / -1 in the output).

    Returns:
        float32 log-probs shaped like targets, or `TargetLogprobs` when an extra
        output is requested. Extra memory is O(N); nothing is kept for backward.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    check_softcap(softcap)
    backend = _resolve_backend(backend, hidden)
    prep = flatten_and_weigh(hidden.detach(), weight.detach(), targets,
                             bias.detach().contiguous() if bias is not None else None,
                             None, ignore_index)
    rows = prep.kept_rows
    kept_targets = prep.targets[rows].contiguous()
    if backend == "triton":
        part = triton_lse.lse_partials(prep.hidden, prep.weight, prep.bias, rows, kept_targets,
                                       softcap=softcap, want_entropy=return_entropy,
                                       want_argmax=return_argmax)
        st = triton_lse.combine_partials(part)
        logprob, entropy, argmax = st.target_logit - st.lse, st.entropy, st.argmax
    else:
        logprob, entropy, argmax = reference.target_logprobs_ref(
            prep.hidden, prep.weight, prep.bias, rows, kept_targets, softcap=softcap,
            want_entropy=return_entropy, want_argmax=return_argmax, buffer_bytes=buffer_bytes)
    nan = float("nan")
    logprob = _scatter_rows(logprob.float(), prep, nan)
    if not (return_entropy or return_argmax):
        return logprob
    return TargetLogprobs(
        logprobs=logprob,
        entropy=_scatter_rows(entropy.float(), prep, nan) if return_entropy else None,
        argmax=_scatter_rows(argmax, prep, -1) if return_argmax else None,
    )
