"""Small CPU problems: the loss and the log-probs with plain PyTorch ops on materialised logits.

Below `DENSE_MACS` multiply-adds (N x V x H) a call is dominated by the fixed cost of the
streaming path (validation and compaction, the custom ops, the kernels' tiling: about
0.3 ms measured on a 2-core CPU): at N=64, H=32, V=512 the C++ kernels took 0.38 ms for
the loss forward + backward, this path 0.18 ms and torch eager 0.12 ms (which checks
nothing and takes no mask). So `t3s_kernels.api` sends such calls
here when the backend is automatic, the tensors are on the CPU and nothing is being
traced, and says so in its debug log.

Same semantics as the streaming path (`reference` is the specification: same checks, loss,
reductions and statistics); the logits [M, V] of the kept rows are materialised in the
compute dtype, which is small by construction. Gradients come from autograd.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import prepare, reference
from .backends.registry import LOG
from .prepare import scatter_rows

# Multiply-adds (N x V x H) up to which the dense path is faster than the streaming
# kernels on the CPU: measured on 2 cores, fp32 and bf16, it wins up to ~1e6 (by 1.3-2.5x)
# and loses from ~8e6 on (log-probs) or ~1.7e7 (the loss).
DENSE_MACS = 2**22


def preferred(hidden2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an automatic-backend call on hidden [N, H], weight [V, H] takes this path."""
    if hidden2d.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return hidden2d.shape[0] * weight.shape[0] * weight.shape[1] <= DENSE_MACS


def log_choice(hidden2d: torch.Tensor, weight: torch.Tensor) -> None:
    """State the choice on the t3s_kernels logger (DEBUG), as automatic dispatch does."""
    if LOG.isEnabledFor(logging.DEBUG):
        n, (v, h) = hidden2d.shape[0], weight.shape
        LOG.debug("t3s_kernels: dense PyTorch path for a small cpu problem (N x V x H = "
                  "%d x %d x %d <= %d: the streaming path's fixed cost would dominate)",
                  n, v, h, DENSE_MACS)


def _logits(hidden2d, weight, bias, rows, softcap, logit_scale=1.0, temperature=1.0):
    # Named in profiler traces (the streaming path shows its custom ops there).
    with torch.profiler.record_function("t3s_kernels::dense_logits"):
        return _dense_logits(hidden2d, weight, bias, rows, softcap, logit_scale, temperature)


def _dense_logits(hidden2d, weight, bias, rows, softcap, logit_scale, temperature):
    """z [M, V] of the kept rows in the compute dtype, differentiable."""
    cd = reference.compute_dtype_for(hidden2d.dtype)
    b = None if bias is None else bias.to(cd)
    return reference.logits_ref(hidden2d.index_select(0, rows).to(cd), weight.to(cd), b, softcap,
                                logit_scale, temperature)


def linear_cross_entropy(hidden2d: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], targets1d: torch.Tensor,
                         mask1d: Optional[torch.Tensor], token_weight: torch.Tensor,
                         ignore_index: int, reduction: str, normalizer, label_smoothing: float,
                         z_loss: float, softcap: Optional[float], want_stats: bool,
                         token_scaling: bool = False, *, logit_scale: float = 1.0,
                         temperature: float = 1.0, class_weight: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, Optional[tuple]]:
    """The loss of `api.linear_cross_entropy` (hidden2d [N, H], targets1d / mask1d /
    token_weight [N]): (loss [] or [N], (lse, target_logprob, entropy, argmax_correct)
    each [N], or None without ``want_stats``).

    The kept rows only enter the matmul (a dropped row may hold anything, NaN included);
    their per-token loss is torch's fused ``F.cross_entropy``, whose label smoothing is
    the specification's: lse - (1 - eps) z_y - eps / V sum_j z_j. ``token_scaling``
    multiplies it by the detached p_y = exp(z_y - lse) of the same logits. class_weight
    ([V] in the compute dtype) is ``F.cross_entropy``'s ``weight=`` as it stands.
    """
    n, vocab = targets1d.shape[0], weight.shape[0]
    rows = prepare.validate_and_compact(targets1d, mask1d, token_weight, vocab, ignore_index)
    t = targets1d.index_select(0, rows)
    z = _logits(hidden2d, weight, bias, rows, softcap, logit_scale, temperature)
    kept_loss = F.cross_entropy(z, t, weight=class_weight, reduction="none",
                                label_smoothing=label_smoothing)
    lse = reference.row_lse(z) if (z_loss or want_stats or token_scaling) else None
    if z_loss:
        kept_loss = kept_loss + z_loss * lse * lse
    if token_scaling:  # DFT: times the stop-gradient target probability
        kept_loss = kept_loss * torch.exp(z.gather(1, t[:, None]).squeeze(1) - lse).detach()
    kept_weight = token_weight.index_select(0, rows)
    if reduction == "none":
        token_loss = kept_loss.new_zeros(n).index_copy(0, rows, kept_loss)
        loss = reference.reduce_token_losses(token_loss, token_weight, reduction, normalizer)
    else:  # the dropped rows add 0 to the sum and their weight 0 to the 'mean' denominator
        loss = reference.reduce_token_losses(kept_loss, kept_weight, reduction, normalizer,
                                             reference.mean_weights(kept_weight, t, class_weight))
    if not want_stats:
        return loss, None
    nan = float("nan")
    with torch.no_grad():
        tz = z.gather(1, t[:, None]).squeeze(1)
        # lse in the compute dtype: return_lse keeps float64 exact (TokenStats casts)
        stats = (scatter_rows(lse.detach(), rows, n, nan),
                 scatter_rows((tz - lse).float(), rows, n, nan),
                 scatter_rows(reference.row_entropy(z).float(), rows, n, nan),
                 scatter_rows(z.argmax(1) == t, rows, n, False))
    return loss, stats


@torch.no_grad()
def target_logprobs(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets1d: torch.Tensor, ignore_index: int, softcap: Optional[float],
                    want_entropy: bool, want_argmax: bool, logit_scale: float = 1.0,
                    temperature: float = 1.0):
    """`api.target_logprobs` on hidden2d [N, H]: (log-probs [N] float32, NaN at
    ignore_index; entropy [N] or None; argmax [N] int64 (-1 at ignore_index) or None)."""
    n = targets1d.shape[0]
    token_weight = prepare.token_weights(targets1d, None, ignore_index)
    rows = prepare.validate_and_compact(targets1d, None, token_weight, weight.shape[0],
                                        ignore_index)
    z = _logits(hidden2d, weight, bias, rows, softcap, logit_scale, temperature)
    nan = float("nan")
    # log_softmax: NaN on a row with a non-finite logit, as the specification's lse
    logprob = torch.log_softmax(z, 1).gather(1, targets1d.index_select(0, rows)[:, None])
    logprob = logprob.squeeze(1)
    entropy = (scatter_rows(reference.row_entropy(z).float(), rows, n, nan)
               if want_entropy else None)
    argmax = scatter_rows(z.argmax(1), rows, n, -1) if want_argmax else None
    return scatter_rows(logprob.float(), rows, n, nan), entropy, argmax
