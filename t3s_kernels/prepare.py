"""Input validation, flattening and compaction shared by every backend.

Every user-facing error is raised here, before any kernel launch, and names
the offending argument. Nothing here writes to the caller's tensors.

Two kinds of check:

- static ones (`check_linear_inputs`, `check_loss_mask`, `check_options`):
  shapes, dtypes, devices, option values. They run in Python before the custom
  ops and are traced by `torch.compile` at no runtime cost;
- value ones (`validate_and_compact`): labels in range, mask weights finite and
  >= 0. They need the tensor values, i.e. one host synchronisation, so they run
  inside the custom ops (`t3s_kernels.ops`), where the same sync also sizes the
  list of kept rows.

Legend: N tokens (after flattening the leading dims), H hidden size,
V vocabulary size, M kept tokens (N minus ignored and dropped ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_BUFFER_BYTES = 256 * 2**20


@dataclass(frozen=True)
class LossOptions:
    """The loss options every backend receives (validated, `filter_eps` resolved).

    filter_eps: None (exact) or the tile-skipping threshold of the kernels;
    the reference is always exact and ignores it.
    logit_scale, temperature: the logit map z = softcap(logit_scale * r) / temperature
    (`kernel_logit_map` folds both into the kernels' softcap and one multiplier).
    class_weight: [V] per-class weights in the loss dtype, or None (`reference`).
    token_scaling: the loss of each kept token is weighted by the stop-gradient
    p_t = exp(target_logprob_t) (DFT; `t3s_kernels.reference`). A backend then fills
    `RowLosses.target_logprob` even without stats (that is how the ops get p), and its
    `loss_forward_backward` takes the gradients of sum_m grad_scale[m] p[m] loss[m];
    `loss_forward` and `loss_backward` are unchanged (the deferred path scales the
    losses, and so their grad_output, outside the backend).
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    filter_eps: Optional[float] = None
    accum_dtype: torch.dtype = torch.float32
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    token_scaling: bool = False
    logit_scale: float = 1.0
    temperature: float = 1.0
    class_weight: Optional[torch.Tensor] = None

    def logit_map(self) -> Tuple[Optional[float], float]:
        """(cap, mul) of `kernel_logit_map` for these options."""
        return kernel_logit_map(self.softcap, self.logit_scale, self.temperature)


class RowLosses(NamedTuple):
    """What a backend's loss forward returns for the M kept rows.

    loss: [M] per-token loss (float32; float64 for float64 inputs), unweighted;
    lse: [M] log-sum-exp (same dtype), saved for the backward;
    target_logprob, entropy: [M] float32 and argmax_correct: [M] bool when
    stats are asked for, else empty tensors. Under `LossOptions.token_scaling`
    target_logprob is [M] whether or not stats are asked for (the token scale is
    its exp); it may be in the loss dtype (the reference: float64 for float64 inputs).
    """

    loss: torch.Tensor
    lse: torch.Tensor
    target_logprob: torch.Tensor
    entropy: torch.Tensor
    argmax_correct: torch.Tensor


Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def _check_tensor(name: str, t, *, floating: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    allowed_dtypes=KERNEL_DTYPES + (torch.float64,),
) -> None:
    """Shape, dtype and device checks for (hidden, weight, targets, bias)."""
    _check_tensor("hidden", hidden, floating=True)
    _check_tensor("weight", weight, floating=True)
    _check_tensor("targets", targets)
    if hidden.dtype not in allowed_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        raise TypeError(f"hidden has dtype {hidden.dtype}; supported: {names}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; cast one of them"
        )
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden has H={hidden.shape[-1]} but weight has shape {tuple(weight.shape)} "
            f"(expected [V, {hidden.shape[-1]}])"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V=0)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden has leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if targets.numel() == 0:
        raise ValueError("empty batch: hidden and targets hold no tokens")
    if bias is not None:
        _check_tensor("bias", bias, floating=True)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape [V]=[{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_loss_mask(loss_mask: Optional[torch.Tensor], targets: torch.Tensor) -> None:
    if loss_mask is None:
        return
    _check_tensor("loss_mask", loss_mask)
    if not (loss_mask.dtype == torch.bool or loss_mask.is_floating_point()):
        raise TypeError(
            f"loss_mask must be bool or floating point (0 drops a token, other values weight "
            f"it), got dtype {loss_mask.dtype}"
        )
    if loss_mask.shape != targets.shape:
        raise ValueError(
            f"loss_mask has shape {tuple(loss_mask.shape)} but targets has shape "
            f"{tuple(targets.shape)}"
        )
    if loss_mask.device != targets.device:
        raise ValueError(f"loss_mask is on {loss_mask.device} but targets is on {targets.device}")


def check_softcap(softcap: Optional[float]) -> None:
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")


def kernel_logit_map(softcap: Optional[float], logit_scale: float = 1.0,
                     temperature: float = 1.0) -> Tuple[Optional[float], float]:
    """(cap, mul) with softcap(logit_scale * r) / temperature = mul * cap * tanh(r / cap)
    (mul * r without a softcap): cap = softcap / logit_scale, mul = logit_scale /
    temperature. This is how every kernel applies the scale and the temperature: its
    softcap unchanged in form, then one multiply, skipped when mul == 1 (the default
    path is untouched). dz/dr = mul * (1 - (z / (cap * mul))**2), the factor mul riding
    on each row's gradient coefficient."""
    mul = float(logit_scale) / float(temperature)
    cap = None if softcap is None else float(softcap) / float(logit_scale)
    return cap, mul


def check_scale(logit_scale, temperature) -> None:
    """logit_scale and temperature: positive finite numbers (not bools)."""
    for name, v in (("logit_scale", logit_scale), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v}")


def shift_labels(targets: torch.Tensor, loss_mask: Optional[torch.Tensor], ignore_index: int,
                 shift) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The causal-LM label shift (``shift=1``), done on the labels so that hidden is never
    copied or sliced: position t of targets [..., T] gets the label of t + 1, and the last
    position of each sequence gets ``ignore_index`` (its mask 0), which is the same loss
    as HF's ``hidden[..., :-1, :]`` against ``labels[..., 1:]``. A [N, H] hidden is one
    sequence of N tokens. shift=0 returns the inputs unchanged. Cost: O(N) integer copies."""
    if isinstance(shift, bool) or shift not in (0, 1):
        raise ValueError(f"shift must be 0 or 1 (the causal-LM label shift), got {shift!r}")
    if not shift:
        return targets, loss_mask
    if targets.dim() < 1:
        raise ValueError("shift=1 needs hidden [..., T, H] with labels [..., T]; got a 1-D "
                         "hidden (a single token has no next label)")
    pad = targets.new_full(targets.shape[:-1] + (1,), ignore_index)
    targets = torch.cat([targets[..., 1:], pad], dim=-1)
    if loss_mask is not None:
        loss_mask = torch.cat([loss_mask[..., 1:],
                               loss_mask.new_zeros(loss_mask.shape[:-1] + (1,))], dim=-1)
    return targets, loss_mask


def check_class_weight(class_weight: Optional[torch.Tensor], weight: torch.Tensor,
                       hidden: torch.Tensor) -> None:
    """class_weight: None or a floating [V] tensor on hidden's device (any float dtype;
    it is used in the loss dtype). Its values are not checked, as in ``F.cross_entropy``."""
    if class_weight is None:
        return
    _check_tensor("class_weight", class_weight, floating=True)
    if class_weight.shape != (weight.shape[0],):
        raise ValueError(f"class_weight must have shape [V]=[{weight.shape[0]}], got "
                         f"{tuple(class_weight.shape)}")
    if class_weight.device != hidden.device:
        raise ValueError(f"class_weight is on {class_weight.device} but hidden is on "
                         f"{hidden.device}")
    if class_weight.requires_grad:
        raise ValueError("class_weight must not require grad (no gradient flows into it)")


def check_options(
    *,
    reduction: str,
    label_smoothing: float,
    softcap: Optional[float],
    z_loss: float,
    normalizer,
    filter_eps,
    accum_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    buffer_bytes: int,
    token_scaling: bool = False,
) -> None:
    if not isinstance(token_scaling, bool):
        raise TypeError(f"token_scaling must be a bool (True scales each token's loss by its "
                        f"target probability), got {token_scaling!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_softcap(softcap)
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite coefficient >= 0, got {z_loss}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer only applies to reduction='mean' or 'sum'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"normalizer must be a scalar, got a tensor of shape {tuple(normalizer.shape)}"
                )
        elif not isinstance(normalizer, (int, float)) or isinstance(normalizer, bool):
            raise TypeError(f"normalizer must be a number or a 1-element tensor, got {normalizer!r}")
        elif normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if not (filter_eps is None or filter_eps == "auto" or
            (isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool)
             and filter_eps >= 0)):
        raise ValueError(f"filter_eps must be 'auto', None or a number >= 0, got {filter_eps!r}")
    if accum_dtype not in (torch.float32, weight_dtype):
        raise ValueError(
            f"accum_dtype must be torch.float32 or the weight's dtype ({weight_dtype}), "
            f"got {accum_dtype}"
        )
    if not isinstance(buffer_bytes, int) or buffer_bytes < 2**16:
        raise ValueError(f"buffer_bytes must be an int >= 65536, got {buffer_bytes!r}")


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> Optional[float]:
    """'auto' -> finfo(dtype).eps / 32.

    A softmax-gradient entry below that is lost in the rounding of the
    input-dtype gradient it would be added to, so skipping a tile whose every
    entry is below it changes the result by about one rounding step.
    """
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    return float(filter_eps)


def token_weights(targets: torch.Tensor, loss_mask: Optional[torch.Tensor],
                  ignore_index: int) -> torch.Tensor:
    """w_t [N] float32: 0 where ``targets == ignore_index``, else the mask value (1 without one).

    targets: [N] integer; loss_mask: [N] bool or float, or None.
    """
    not_ignored = targets != ignore_index
    if loss_mask is None:
        return not_ignored.float()
    return torch.where(not_ignored, loss_mask.float(), torch.zeros((), device=loss_mask.device))


def validate_and_compact(targets: torch.Tensor, loss_mask: Optional[torch.Tensor],
                         token_weight: torch.Tensor, vocab_size: int,
                         ignore_index: int) -> torch.Tensor:
    """Check label range and mask values, and return the kept rows [M] int64.

    targets: [N] int64; loss_mask: [N] bool / float or None; token_weight: [N]
    (`token_weights`). Rows with ``w_t == 0`` are dropped before any matmul.

    This performs one host synchronisation: it validates labels and mask values
    and sizes the compacted row list (the count is known, so the compaction
    itself needs no second sync).
    """
    not_ignored = targets != ignore_index
    kept = token_weight != 0
    bad_label = not_ignored & ((targets < 0) | (targets >= vocab_size))
    counts = [kept.sum(), bad_label.sum()]
    if loss_mask is not None and loss_mask.is_floating_point():
        counts.append((~torch.isfinite(loss_mask) | (loss_mask < 0)).sum())
    num_kept, *counts = torch.stack(counts).tolist()  # the one host sync
    if counts[0]:
        first = targets[bad_label][0].item()
        raise ValueError(
            f"targets has {counts[0]} label(s) outside [0, V={vocab_size}) that are not "
            f"ignore_index={ignore_index} (first: {first})"
        )
    if len(counts) > 1 and counts[1]:
        raise ValueError(
            f"loss_mask has {counts[1]} negative or non-finite value(s); weights must be "
            "finite and >= 0"
        )
    return kept_rows(kept, num_kept)


def kept_rows(kept: torch.Tensor, num_kept: Optional[int] = None) -> torch.Tensor:
    """Indices [M] int64 of the True entries of ``kept`` [N] (a host sync unless
    ``num_kept`` is given)."""
    if num_kept is None:
        return torch.nonzero(kept).squeeze(1)
    try:
        return torch.nonzero_static(kept, size=num_kept).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):  # older torch / backend
        return torch.nonzero(kept).squeeze(1)


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int, fill) -> torch.Tensor:
    """[M] values at ``rows`` of a new [n] tensor filled with ``fill`` (the inverse of
    the compaction: dropped rows hold ``fill``)."""
    out = torch.full((n,), fill, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out
