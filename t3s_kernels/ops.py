"""The custom ops: what `torch.compile` sees of the kernels.

Four `torch.library.custom_op` ops, each with a fake (meta) implementation so
that `torch.compile` traces them with static output shapes, and the two loss
ops with their autograd formulas:

    t3s_kernels::linear_ce_forward(hidden [N, H], weight [V, H], bias [V]?,
        targets [N], loss_mask [N]?, ...) ->
        (token_loss [N], lse [N], target_logprob [N'], entropy [N'], argmax_correct [N'])
    t3s_kernels::linear_ce_backward(grad_token_loss [N], hidden, weight, bias?,
        targets, loss_mask?, lse [N], ...) -> (grad_hidden, grad_weight, grad_bias)
    t3s_kernels::linear_ce_forward_backward(hidden, weight, bias?, targets, loss_mask?,
        grad_scale [N], ...) -> (loss [], lse [N], target_logprob [N'], entropy [N'],
        argmax_correct [N'], grad_hidden [N, H]', grad_weight [V, H]', grad_bias [V]')
    t3s_kernels::target_logprobs(hidden [N, H], weight [V, H], bias [V]?, targets [N], ...)
        -> (logprob [N], entropy [N'], argmax [N'])

`linear_ce_forward_backward` serves the scalar reductions: loss =
sum_t grad_scale_t * token_loss_t, and its gradients are computed in the
forward (the backend's `loss_forward_backward`); its autograd backward only
scales them by grad_output.

Second derivatives: a backward recorded for another one (``create_graph=True``, i.e.
grad mode on inside the backward) takes the gradients of both loss ops from
`t3s_kernels.second_order` instead, differentiable in the inputs and grad_output, so
that the next backward is exact. An ordinary backward runs the kernels as before;
the one-pass op keeps references to its inputs for that (no copies).

N' is N when the statistic is asked for and 0 otherwise; a gradient that is
not needed comes back as an empty tensor. token_loss and lse are float32
(float64 for float64 inputs); the statistics are float32 (argmax int64),
except linear_ce_forward's target_logprob, in the token_loss dtype.
Rows that leave the loss (``targets == ignore_index`` or weight 0) hold
token_loss 0, lse / log-probs NaN, argmax_correct False, argmax -1.

Token scaling (``token_scaling=True``, the last argument of both loss ops; see
`t3s_kernels.reference`): the backends then return target_logprob for every kept
row (`prepare.LossOptions.token_scaling`), which is how p_t = exp(target_logprob_t)
reaches the ops without another pass. `linear_ce_forward_backward` folds p into its
loss and gradients (the backend scales grad_scale by p inside its pass);
`linear_ce_forward` returns target_logprob [N] even without stats and leaves
token_loss unscaled: its caller multiplies by the stop-gradient p (`api`), so that
autograd hands the deferred backward grad_output * p.

The options logit_scale, temperature (floats) and class_weight ([V] in the loss dtype, or
None; no gradient) come last in the three loss ops (the first two in target_logprobs), with
defaults that leave the default path as it was.

Inside each op: the value checks (label range, mask weights), the compaction
of the kept rows and its one host synchronisation (`prepare.validate_and_compact`),
then the backend's implementation on the M kept rows. Compaction happens
inside, where a data-dependent size is no concern of the tracer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import prepare, second_order
from .backends import get_backend
from .prepare import LossOptions, scatter_rows
from .reference import compute_dtype_for

__all__ = ["linear_ce_forward", "linear_ce_backward", "linear_ce_forward_backward",
           "target_logprobs_op"]


def _options(label_smoothing, z_loss, softcap, filter_eps, accum_dtype, buffer_bytes,
             token_scaling=False, logit_scale=1.0, temperature=1.0, class_weight=None):
    return LossOptions(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                       filter_eps=filter_eps, accum_dtype=accum_dtype,
                       buffer_bytes=buffer_bytes, token_scaling=token_scaling,
                       logit_scale=logit_scale, temperature=temperature,
                       class_weight=class_weight)


def _scale_kwargs(logit_scale: float, temperature: float) -> dict:
    """Keyword arguments for a backend's `target_logprobs`: none at the defaults, so that a
    backend written before these options still serves every call that does not use them."""
    if logit_scale == 1.0 and temperature == 1.0:
        return {}
    return dict(logit_scale=logit_scale, temperature=temperature)


def _target_logprob(out, num_rows: int, backend: str) -> Tensor:
    """The kept rows' target log-prob [M] that a backend returns under token_scaling."""
    if out.target_logprob.numel() != num_rows:
        raise RuntimeError(
            f"backend {backend!r} returned no target_logprob with token_scaling=True (a "
            "backend must fill RowLosses.target_logprob when LossOptions.token_scaling is set)")
    return out.target_logprob


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


@torch.library.custom_op("t3s_kernels::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    loss_mask: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: Optional[float], filter_eps: Optional[float], accum_dtype: torch.dtype,
    buffer_bytes: int, want_stats: bool, backend: str, token_scaling: bool = False,
    logit_scale: float = 1.0, temperature: float = 1.0, class_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token loss of the flattened inputs (module docstring for the contract)."""
    n = targets.shape[0]
    token_weight = prepare.token_weights(targets, loss_mask, ignore_index)
    rows = prepare.validate_and_compact(targets, loss_mask, token_weight, weight.shape[0],
                                        ignore_index)
    opts = _options(label_smoothing, z_loss, softcap, filter_eps, accum_dtype, buffer_bytes,
                    token_scaling, logit_scale, temperature, class_weight)
    out = get_backend(backend).loss_forward(hidden, weight, bias, rows,
                                            targets[rows].contiguous(), opts, want_stats)
    nan = float("nan")
    logprob = (_target_logprob(out, rows.numel(), backend) if token_scaling
               else out.target_logprob)
    stats = (logprob.to(out.loss.dtype), out.entropy.float(), out.argmax_correct)
    if want_stats:
        stats = tuple(scatter_rows(s, rows, n, fill) for s, fill in zip(stats, (nan, nan, False)))
    else:  # fresh empty outputs: a custom op may not return views of its own buffers
        stats = tuple(s.new_empty(0) for s in stats)
        if token_scaling:  # the log-probs, whose exp scales the loss (`api`)
            stats = (scatter_rows(logprob.to(out.loss.dtype), rows, n, nan), *stats[1:])
    return (scatter_rows(out.loss, rows, n, 0.0), scatter_rows(out.lse, rows, n, nan), *stats)


@linear_ce_forward.register_fake
def _(hidden, weight, bias, targets, loss_mask, ignore_index, label_smoothing, z_loss, softcap,
      filter_eps, accum_dtype, buffer_bytes, want_stats, backend, token_scaling=False,
      logit_scale=1.0, temperature=1.0, class_weight=None):
    n = targets.shape[0]
    cd = compute_dtype_for(hidden.dtype)
    stats_n = n if want_stats else 0
    return (hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd),
            hidden.new_empty(n if (want_stats or token_scaling) else 0, dtype=cd),
            hidden.new_empty(stats_n, dtype=torch.float32),
            hidden.new_empty(stats_n, dtype=torch.bool))


@torch.library.custom_op("t3s_kernels::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    grad_token_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, loss_mask: Optional[Tensor], lse: Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: Optional[float],
    filter_eps: Optional[float], accum_dtype: torch.dtype, buffer_bytes: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
    logit_scale: float = 1.0, temperature: float = 1.0, class_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_t grad_token_loss_t * token_loss_t; empty where not needed.

    Re-derives the kept rows from targets and the mask (one host sync; the
    values were validated by the forward).
    """
    token_weight = prepare.token_weights(targets, loss_mask, ignore_index)
    rows = prepare.kept_rows(token_weight != 0)
    opts = _options(label_smoothing, z_loss, softcap, filter_eps, accum_dtype, buffer_bytes,
                    False, logit_scale, temperature, class_weight)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    grads = get_backend(backend).loss_backward(
        hidden, weight, bias, rows, targets[rows].contiguous(), lse[rows].contiguous(),
        grad_token_loss[rows].contiguous(), opts, need)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@linear_ce_backward.register_fake
def _(grad_token_loss, hidden, weight, bias, targets, loss_mask, lse, ignore_index,
      label_smoothing, z_loss, softcap, filter_eps, accum_dtype, buffer_bytes, need_hidden,
      need_weight, need_bias, backend, logit_scale=1.0, temperature=1.0, class_weight=None):
    grad_b = bias.new_empty(bias.shape) if (need_bias and bias is not None) else None
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            grad_b if grad_b is not None else hidden.new_empty(0))


_SAVED_OPTIONS = ("ignore_index", "label_smoothing", "z_loss", "softcap", "filter_eps",
                  "accum_dtype", "buffer_bytes")


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, loss_mask, ignore_index, label_smoothing, z_loss, softcap,
     filter_eps, accum_dtype, buffer_bytes, _want_stats, backend, _token_scaling, logit_scale,
     temperature, class_weight) = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, loss_mask, output[1], class_weight)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, filter_eps, accum_dtype,
                   buffer_bytes)
    ctx.scale = (logit_scale, temperature)
    ctx.backend = backend
    ctx.mark_non_differentiable(*output[1:])  # lse and the statistics carry no gradient


def _backward(ctx, grad_token_loss, *_stat_grads):
    hidden, weight, bias, targets, loss_mask, lse, class_weight = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    none = (None,) * 15
    if grad_token_loss is None or not (need_h or need_w or need_b):
        return (None, None, None) + none
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (module doc)
        ignore_index, label_smoothing, z_loss, softcap = ctx.options[:4]
        grads = second_order.loss_gradients(
            hidden, weight, bias, targets, loss_mask, grad_token_loss, ignore_index,
            label_smoothing, z_loss, softcap, False, (need_h, need_w, need_b), *ctx.scale,
            class_weight)
        return grads + none
    grad_h, grad_w, grad_b = linear_ce_backward(
        grad_token_loss, hidden, weight, bias, targets, loss_mask, lse, *ctx.options,
        need_h, need_w, need_b, ctx.backend, *ctx.scale, class_weight)
    return (grad_h if need_h else None, grad_w if need_w else None,
            grad_b if need_b else None) + none


linear_ce_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# The scalar-reduced loss with its gradient computed in the forward
# --------------------------------------------------------------------------------------


@torch.library.custom_op("t3s_kernels::linear_ce_forward_backward", mutates_args=())
def linear_ce_forward_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    loss_mask: Optional[Tensor], grad_scale: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], filter_eps: Optional[float],
    accum_dtype: torch.dtype, buffer_bytes: int, want_stats: bool, need_hidden: bool,
    need_weight: bool, need_bias: bool, backend: str, token_scaling: bool = False,
    logit_scale: float = 1.0, temperature: float = 1.0, class_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss = sum_t grad_scale_t * token_loss_t (grad_scale [N] in the loss dtype: token
    weight / denominator, 0 on dropped tokens; with token_scaling, times the stop-gradient
    p_t = exp(target_logprob_t) of this pass), lse, the statistics, and the gradients
    of loss (empty where not needed)."""
    n = targets.shape[0]
    token_weight = prepare.token_weights(targets, loss_mask, ignore_index)
    rows = prepare.validate_and_compact(targets, loss_mask, token_weight, weight.shape[0],
                                        ignore_index)
    opts = _options(label_smoothing, z_loss, softcap, filter_eps, accum_dtype, buffer_bytes,
                    token_scaling, logit_scale, temperature, class_weight)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    scale = grad_scale[rows].contiguous()
    out, grads = get_backend(backend).loss_forward_backward(
        hidden, weight, bias, rows, targets[rows].contiguous(), scale, opts, want_stats, need)
    if token_scaling:  # the backend scaled its gradients by the same p
        scale = scale * torch.exp(_target_logprob(out, rows.numel(), backend).to(scale.dtype))
    loss = (out.loss.to(scale.dtype) * scale).sum()
    nan = float("nan")
    stats = (out.target_logprob.float(), out.entropy.float(), out.argmax_correct)
    if want_stats:
        stats = tuple(scatter_rows(s, rows, n, fill) for s, fill in zip(stats, (nan, nan, False)))
    else:
        stats = tuple(s.new_empty(0) for s in stats)
    # contiguous, as the fake promises (a backend may follow a strided hidden's layout)
    grads = tuple(g.contiguous() if g is not None else hidden.new_empty(0) for g in grads)
    return (loss, scatter_rows(out.lse.to(scale.dtype), rows, n, nan), *stats, *grads)


@linear_ce_forward_backward.register_fake
def _(hidden, weight, bias, targets, loss_mask, grad_scale, ignore_index, label_smoothing,
      z_loss, softcap, filter_eps, accum_dtype, buffer_bytes, want_stats, need_hidden,
      need_weight, need_bias, backend, token_scaling=False, logit_scale=1.0, temperature=1.0,
      class_weight=None):
    n = targets.shape[0]
    cd = compute_dtype_for(hidden.dtype)
    stats_n = n if want_stats else 0
    has_b = need_bias and bias is not None
    return (hidden.new_empty((), dtype=cd), hidden.new_empty(n, dtype=cd),
            hidden.new_empty(stats_n, dtype=torch.float32),
            hidden.new_empty(stats_n, dtype=torch.float32),
            hidden.new_empty(stats_n, dtype=torch.bool),
            hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if has_b else hidden.new_empty(0))


def _setup_fb_context(ctx, inputs, output):
    # No zeros for the outputs that get no gradient (lse, statistics, the saved gradients
    # themselves: [V, H] of zeros otherwise)
    ctx.set_materialize_grads(False)
    (hidden, weight, bias, targets, loss_mask, grad_scale, ignore_index, label_smoothing,
     z_loss, softcap, *_rest) = inputs
    # The inputs too (references, no copies): a backward under create_graph=True recomputes
    # the gradients from them, differentiably (`second_order`). Traced backwards run with
    # grad mode off and never read them, so a compiled graph does not keep them.
    ctx.save_for_backward(*output[5:], hidden, weight, bias, targets, loss_mask, grad_scale,
                          inputs[-1])
    # token_scaling, logit_scale, temperature
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, *inputs[-4:-1])
    ctx.mark_non_differentiable(*output[1:])  # lse, statistics and gradients


def _fb_backward(ctx, grad_loss, *_other_grads):
    """The gradients were computed in the forward: scale them by d out / d loss.

    Out of place, so that a retained graph's next backward (per-group gradients,
    ``retain_graph=True``) scales the same saved gradients again. A unit grad_loss on
    the CPU (``loss.backward()``) hands the saved gradients over as they are: no
    [V, H] copy. Autograd then takes them over as ``.grad`` when nothing else holds
    them, and copies them when a retained graph still does.
    """
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if grad_loss is not None and any(need) and torch.is_grad_enabled():
        # create_graph=True: the saved gradients are constants to autograd; recompute them
        # as a differentiable function of the inputs and grad_loss (`second_order`).
        hidden, weight, bias, targets, loss_mask, grad_scale, class_weight = saved[3:]
        ignore_index, label_smoothing, z_loss, softcap, token_scaling, *scale = ctx.options
        grads = second_order.loss_gradients(
            hidden, weight, bias, targets, loss_mask, grad_scale * grad_loss, ignore_index,
            label_smoothing, z_loss, softcap, token_scaling, need, *scale, class_weight)
        return grads + (None,) * 19
    unit = _is_unit(grad_loss)
    grads = tuple(None if not (n and grad_loss is not None) else (g if unit else g * grad_loss)
                  for g, n in zip(saved[:3], need))
    return grads + (None,) * 19


def _is_unit(grad: Optional[Tensor]) -> bool:
    """Whether grad is a CPU scalar equal to 1 (read without a device sync; never while
    tracing or under a dispatch mode, where its value is unknown)."""
    if grad is None or grad.device.type != "cpu" or grad.numel() != 1:
        return False
    if torch.compiler.is_compiling() or _python_dispatch.is_in_torch_dispatch_mode():
        return False
    return bool(grad.detach().reshape(()) == 1)


linear_ce_forward_backward.register_autograd(_fb_backward, setup_context=_setup_fb_context)


# --------------------------------------------------------------------------------------
# Forward-only log-probs
# --------------------------------------------------------------------------------------


@torch.library.custom_op("t3s_kernels::target_logprobs", mutates_args=())
def target_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
    softcap: Optional[float], want_entropy: bool, want_argmax: bool, buffer_bytes: int,
    backend: str, logit_scale: float = 1.0, temperature: float = 1.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """log p(target) [N] (+ entropy, argmax) of the flattened inputs; no autograd."""
    n = targets.shape[0]
    token_weight = prepare.token_weights(targets, None, ignore_index)
    rows = prepare.validate_and_compact(targets, None, token_weight, weight.shape[0],
                                        ignore_index)
    logprob, entropy, argmax = get_backend(backend).target_logprobs(
        hidden, weight, bias, rows, targets[rows].contiguous(), softcap=softcap,
        want_entropy=want_entropy, want_argmax=want_argmax, buffer_bytes=buffer_bytes,
        **_scale_kwargs(logit_scale, temperature))
    nan = float("nan")
    entropy = (scatter_rows(entropy.float(), rows, n, nan) if want_entropy
               else hidden.new_empty(0, dtype=torch.float32))
    argmax = (scatter_rows(argmax, rows, n, -1) if want_argmax
              else hidden.new_empty(0, dtype=torch.int64))
    return scatter_rows(logprob.float(), rows, n, nan), entropy, argmax


@target_logprobs_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, softcap, want_entropy, want_argmax,
      buffer_bytes, backend, logit_scale=1.0, temperature=1.0):
    n = targets.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n if want_entropy else 0, dtype=torch.float32),
            hidden.new_empty(n if want_argmax else 0, dtype=torch.int64))
