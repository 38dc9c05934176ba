"""TRL's fused LM head on t3s's kernels: `trl.SFTTrainer`, `GRPOTrainer`, ... on a patched model.

TRL 1.16's trainers install a fused LM head of their own
(``trl.trainer.utils.add_fused_lm_head``, which replaces ``model.forward``) and
call ``model(..., labels=labels, fused_lm_head=True)``; the call returns a
``FusedCausalLMOutput`` with per-token ``log_probs`` (with gradient), from which
TRL builds its loss (``nll``, ``dft``, GRPO's policy losses) and its metrics.

On a `t3s.patch`-ed model that call runs on t3s's kernels instead, whatever
order TRL and t3s patched in:

* `TRLHeadHook`, a forward pre-hook (with kwargs) on the model, turns
  ``fused_lm_head=True`` into t3s's own keyword before any forward runs. TRL's
  forward, when it is the outer one, then takes its plain path and calls the
  forward below it, t3s's, which computes every field (`fused_outputs`);
  when t3s's forward is the outer one it handles the keyword itself.
* The head's settings are TRL's: the temperature, ``cast_lm_head_to_fp32`` and
  the requested ``outputs``, read from TRL's installed forward (`trl_settings`);
  the logit scale and softcap are those `t3s.patch` measured.
* Where t3s cannot compute what TRL asks for (`unsupported`: a final softcap
  with a temperature other than 1, or with ``mean_logits`` /
  ``log_sum_sq_probs``), t3s says so once and TRL's own head runs.

Field by field (``[B, T']``, T' = T - 1, or T with ``shift_labels``; zero where
the label is -100):

* ``log_probs``: ``-linear_cross_entropy(..., reduction="none")``, whose
  deferred backward honours any per-token upstream gradient (DFT, GRPO);
* ``entropy``, ``is_top1``: the same pass's statistics. The entropy carries a
  gradient on request (GRPO's entropy bonus), computed by the reference path
  (`EntropyGrad`), since t3s's kernels differentiate the loss only;
* ``mean_logits``: ``(h · mean_v W_v + mean_v b_v)`` times the scale over the
  temperature, exact without softcap (the mean of a linear map), O(N H);
* ``log_sum_sq_probs``: ``2 log p_y - log p'_y`` where ``p'`` is the softmax of
  the doubled logits (one forward-only pass of `t3s_kernels.target_logprobs`);
* ``loss``: ``-sum(log_probs) / num_items_in_batch`` (the count of labelled
  tokens when not given), plus the MoE load-balancing loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from t3s_kernels import linear_cross_entropy, target_logprobs

from .guards import PATCH_ATTR, forward_chain, is_trl_code
from .labels import check_targets

__all__ = ["TRLHeadSettings", "TRLHeadHook", "TRL_HEAD_KWARG", "fused_outputs",
           "install_trl_hook", "output_class", "remove_trl_hooks", "resolve", "trl_fields",
           "trl_forward", "trl_settings", "unsupported", "warn_loss_options_unused"]

LOG = logging.getLogger("t3s")

# The keyword `TRLHeadHook` puts in place of ``fused_lm_head=True``; it carries the settings.
TRL_HEAD_KWARG = "t3s_trl_head"
IGNORE_INDEX = -100  # TRL's, fixed
TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Loss options of `t3s.patch` that reach TRL's head (the others change t3s's own loss).
KERNEL_OPTIONS = ("filter_eps", "accum_dtype", "buffer_bytes")
# Rows of the [rows, V] float32 logits that the entropy gradient materialises at once.
ENTROPY_GRAD_BYTES = 64 << 20


@dataclass(frozen=True)
class TRLHeadSettings:
    """What TRL's ``add_fused_lm_head`` was given (its defaults when TRL's forward is absent).

    temperature: the logits are divided by it.
    cast_lm_head_to_fp32: the head runs in float32, outside autocast.
    outputs: the per-token fields to compute, among `TRL_OUTPUTS` (``log_probs`` always).
    """

    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: Tuple[str, ...] = ("log_probs",)


def trl_forward(model: nn.Module):
    """TRL's ``_fused_forward`` function installed on ``model``, or None: looked for along
    the instance forward and t3s's previous forward (`t3s.hf.guards.forward_chain`)."""
    info = model.__dict__.get(PATCH_ATTR)
    for root in (model.__dict__.get("forward"), getattr(info, "previous_forward", None)):
        for fn in forward_chain(root):
            if is_trl_code(fn) and fn.__code__.co_name == "_fused_forward":
                return fn
    return None


def trl_settings(model: nn.Module) -> Tuple[Optional[TRLHeadSettings], Optional[str]]:
    """(settings, problem): TRL's head settings on ``model``, read from its installed forward.

    Without a TRL forward, TRL's defaults. ``problem`` is a sentence when a TRL
    forward is there but its settings cannot be read (another TRL version).
    """
    fn = trl_forward(model)
    if fn is None:
        return TRLHeadSettings(), None
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    missing = [k for k in ("temperature", "cast_lm_head_to_fp32", "outputs") if k not in cells]
    if missing:
        return None, (f"the settings of TRL's fused head ({', '.join(missing)}) could not be "
                      "read from this TRL version")
    outputs = tuple(cells["outputs"])
    unknown = sorted(set(outputs) - set(TRL_OUTPUTS))
    if unknown:
        return None, f"TRL's fused head asks for outputs t3s does not know: {unknown}"
    return TRLHeadSettings(float(cells["temperature"]), bool(cells["cast_lm_head_to_fp32"]),
                           outputs), None


def unsupported(softcap: Optional[float], settings: TRLHeadSettings) -> Optional[str]:
    """Why t3s cannot compute TRL's head with these settings, or None when it can.

    t3s's kernels apply a softcap to ``scale * z``; a temperature after the
    softcap, and the mean or the doubled logits of softcapped logits, are not of
    that form.
    """
    if softcap is None:
        return None
    if settings.temperature != 1.0:
        return (f"the model's final logit softcap ({softcap}) with temperature "
                f"{settings.temperature}")
    extra = [k for k in ("mean_logits", "log_sum_sq_probs") if k in settings.outputs]
    if extra:
        return f"{' and '.join(extra)} of softcapped logits (softcap {softcap})"
    return None


class TRLHeadHook:
    """A forward pre-hook (with kwargs) on a patched model: ``fused_lm_head=True`` runs on t3s.

    Replaces the keyword with ``t3s_trl_head=<TRLHeadSettings>`` so that TRL's
    forward (if it is the outer one) passes the call down to t3s's. When t3s
    cannot serve the call (`unsupported`), says so once and leaves the call to
    TRL's own head (recorded in ``PatchInfo.trl_fallback``, which lets it run the
    backbone past `t3s.hf.guards.BypassGuard`).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, module: nn.Module, args, kwargs):
        if not kwargs.get("fused_lm_head") or PATCH_ATTR not in self.model.__dict__:
            return None
        settings = resolve(self.model)
        if settings is None:
            return None
        kwargs = dict(kwargs)
        del kwargs["fused_lm_head"]
        kwargs[TRL_HEAD_KWARG] = settings
        return args, kwargs


def resolve(model: nn.Module) -> Optional[TRLHeadSettings]:
    """The settings with which t3s serves ``fused_lm_head=True`` on the patched ``model``, or
    None when TRL's own head must (said once per reason; kept in ``PatchInfo.trl_fallback``)."""
    info = model.__dict__[PATCH_ATTR]
    settings, problem = trl_settings(model)
    if problem is None:
        problem = unsupported(info.head.softcap, settings)
    if problem is None:
        return settings
    if info.trl_fallback != problem:
        LOG.warning("t3s cannot compute TRL's fused LM head for %s: %s; TRL's own head runs "
                    "these calls", type(model).__name__, problem)
        info.trl_fallback = problem
    return None


def install_trl_hook(model: nn.Module) -> None:
    """Register a `TRLHeadHook` on ``model`` (first, before any other pre-hook)."""
    model.register_forward_pre_hook(TRLHeadHook(model), with_kwargs=True, prepend=True)


def remove_trl_hooks(model: nn.Module) -> None:
    """Remove every `TRLHeadHook` from ``model`` (found by type, as `remove_guards` does)."""
    for key in [k for k, h in model._forward_pre_hooks.items() if isinstance(h, TRLHeadHook)]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


# --------------------------------------------------------------------------------------
# The fields
# --------------------------------------------------------------------------------------


def trl_fields(info, head, hidden: torch.Tensor, labels, shift_labels, num_items,
               settings: TRLHeadSettings) -> dict:
    """`fused_outputs` from a patched forward's captured hidden states [B, T, H]: positions
    0..T-2 score ``labels[:, 1:]``, or every position scores ``shift_labels`` [B, T].
    ``info`` is the model's `t3s.hf.patch.PatchInfo`, ``head`` its `t3s.hf.heads.LMHead`."""
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    check_targets(targets, hidden)
    weight, bias = head.tensors(hidden_size=hidden.shape[-1], gather=True)
    options = {k: v for k, v in info.loss_options.items() if k in KERNEL_OPTIONS}
    return fused_outputs(hidden.to(weight.device), targets.to(weight.device), weight, bias,
                         logit_scale=head.logit_scale, softcap=head.softcap, settings=settings,
                         num_items_in_batch=num_items, backend=info.backend,
                         kernel_options=options)


def warn_loss_options_unused(info) -> None:
    """`t3s.patch`'s options that change the loss do not reach TRL's head: say so once."""
    unused = sorted(k for k in ("label_smoothing", "z_loss", "token_scaling")
                    if info.loss_options.get(k))
    if unused and not info.trl_options_warned:
        info.trl_options_warned = True
        LOG.warning("t3s.patch's %s do not apply to TRL's fused LM head: TRL computes its loss "
                    "from the per-token log-probs (use t3s.trainer.T3SSFTTrainer for them)",
                    " and ".join(unused))


def fused_outputs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor], *, logit_scale: float, softcap: Optional[float],
                  settings: TRLHeadSettings, num_items_in_batch=None,
                  backend: Optional[str] = None, kernel_options: Optional[dict] = None) -> dict:
    """Every field of TRL's ``FusedCausalLMOutput`` but ``aux_loss``, on t3s's kernels.

    Args:
        hidden: [B, T', H] the head's input at the scored positions (already shifted).
        labels: [B, T'] next-token labels, -100 where ignored.
        weight: [V, H] the head's weight; bias: [V] or None.
        logit_scale, softcap: the model's logit map, ``softcap(scale * z)``.
        settings: TRL's head settings (`unsupported` must be None for them).
        num_items_in_batch: the loss denominator (default: the labelled count).
        backend, kernel_options: passed to `t3s_kernels.linear_cross_entropy`
            (``filter_eps``, ``accum_dtype``, ``buffer_bytes``).

    Returns:
        dict of ``loss`` [] and the per-token fields [B, T'] (None where not
        requested), ``label_mask`` [B, T'] bool.
    """
    mask = labels != IGNORE_INDEX
    device_type = hidden.device.type
    if settings.cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    # Without a softcap, the temperature is one more factor on the logits: fold it in.
    scale = logit_scale if softcap is not None else logit_scale / settings.temperature
    h = hidden.to(dtype)
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    if scale != 1.0:
        h = h * scale
        b = None if b is None else b * scale
    targets = labels.masked_fill(~mask, IGNORE_INDEX)
    want = set(settings.outputs)
    with torch.autocast(device_type, enabled=False):
        token_loss, stats = linear_cross_entropy(
            h, w, targets, bias=b, softcap=softcap, reduction="none", return_stats=True,
            ignore_index=IGNORE_INDEX, backend=backend, **(kernel_options or {}))
        log_probs = -token_loss.float()
        entropy = is_top1 = mean_logits = log_sum_sq = None
        if "entropy" in want:
            values = torch.where(mask, stats.entropy, 0.0)
            entropy = EntropyGrad.apply(values, h, w, b, targets, softcap) \
                if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad) else values
        if "is_top1" in want:
            is_top1 = stats.argmax_correct & mask
        if "mean_logits" in want:  # softcap is None here (`unsupported`)
            with torch.no_grad():
                mean_w = w.float().mean(0)
                mean_logits = h.float() @ mean_w + (0.0 if b is None else b.float().mean())
                mean_logits = torch.where(mask, mean_logits, 0.0)
        if "log_sum_sq_probs" in want:  # log sum p^2 = 2 log p_y - log softmax(2 z)_y
            doubled = target_logprobs(2 * h.detach(), w.detach(), targets,
                                      bias=None if b is None else 2 * b.detach(),
                                      ignore_index=IGNORE_INDEX, backend=backend)
            log_sum_sq = torch.where(mask, 2 * log_probs.detach() - doubled, 0.0)
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denominator
    return dict(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)


class EntropyGrad(torch.autograd.Function):
    """The entropy values computed by the kernels, with the entropy's gradient.

    forward(values [...], hidden [..., H], weight [V, H], bias [V]?, targets [...], softcap)
    returns ``values``; the backward recomputes the logits of the labelled rows
    in chunks (float32, at most `ENTROPY_GRAD_BYTES` of logits at once) and
    applies dH/dz_j = -p_j (log p_j + H). Only a loss that uses the entropy
    (GRPO's entropy bonus) pays for it; logging it costs nothing.
    """

    @staticmethod
    def forward(ctx, values, hidden, weight, bias, targets, softcap):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.softcap = softcap
        ctx.set_materialize_grads(False)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets = ctx.saved_tensors
        if grad is None:
            return (None,) * 6
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        h2 = hidden.reshape(-1, hidden.shape[-1])
        rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        g = grad.reshape(-1).float()
        gh = torch.zeros(h2.shape, dtype=torch.float32, device=h2.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = None if bias is None or not need_b else torch.zeros(bias.shape, dtype=torch.float32,
                                                                  device=bias.device)
        step = max(1, ENTROPY_GRAD_BYTES // (4 * weight.shape[0]))
        w32 = weight.float()
        for r0 in range(0, rows.numel(), step):
            idx = rows[r0:r0 + step]
            h = h2.index_select(0, idx).float()
            z = F.linear(h, w32, None if bias is None else bias.float())
            cap_grad = None
            if ctx.softcap is not None:
                t = torch.tanh(z / ctx.softcap)
                z, cap_grad = ctx.softcap * t, 1 - t * t
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            ent = -(p * logp).sum(-1, keepdim=True)
            gz = -g[idx, None] * p * (logp + ent)
            if cap_grad is not None:
                gz = gz * cap_grad
            if gh is not None:
                gh.index_copy_(0, idx, gz @ w32)
            if gw is not None:
                gw.addmm_(gz.T, h)
            if gb is not None:
                gb += gz.sum(0)
        out_h = None if gh is None else gh.view(hidden.shape).to(hidden.dtype)
        out_w = None if gw is None else gw.to(weight.dtype)
        out_b = None if gb is None else gb.to(bias.dtype)
        return None, out_h, out_w, out_b, None, None


def output_class():
    """TRL's ``FusedCausalLMOutput`` class (ImportError with the install command without TRL)."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError as exc:
        raise ImportError("fused_lm_head=True needs TRL: pip install trl") from exc
    return FusedCausalLMOutput
