"""Vocab-parallel fused loss and log-probs: the head's rows are sharded across a group.

Tensor-parallel heads hold ``weight`` [V_r, H] on rank r: a contiguous block of
vocabulary rows starting at ``offset_r`` (blocks may differ in size). Every rank of
the group holds the same ``hidden`` [N, H] and ``targets`` [N] (global ids). Each
rank computes, for its kept rows and its own columns only, the partial statistics
of the streaming kernel (notation of `t3s_kernels.reference`):

    m_r  = max_j z_j        s_r = sum_j exp(z_j - m_r)      tz_r = z_y if y is local
    sz_r = sum_j z_j        ez_r = sum_j exp(z_j - m_r) (z_j - m_r)   (argmax value, index)

One all-gather of these [M]-sized partials (never the N x V_r logits) gives the
global lse, target logit, logit sum, entropy and argmax, exactly as
`t3s_kernels.triton.forward.combine_partials` merges vocabulary splits. The
backward is local to each shard, d loss / d z_j = p_j (1 + 2 lam lse) - (1 - eps)
[j == y] - eps / V, plus one all-reduce of grad_hidden, so the weight shard's
gradient stays on its rank.

The weight is either a local shard with ``vocab_group=`` (the offset is found
from the group's shard sizes, in rank order), or a ``DTensor`` with ``Shard(0)``
placement on a 1-D mesh (its local shard and group are used; its gradient flows
back as a DTensor). The computation runs in chunked PyTorch (the reference's
arithmetic) on any device; it is not a custom op, so it is for eager use.

Legend: N tokens, H hidden, V vocabulary (all ranks), V_r this rank's rows, M kept.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import reference
from .api import TargetLogprobs, TokenStats
from .prepare import (
    DEFAULT_BUFFER_BYTES,
    check_linear_inputs,
    check_loss_mask,
    check_options,
    check_scale,
    check_softcap,
    token_weights,
    scatter_rows,
    validate_and_compact,
)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_target_logprobs", "shard_layout"]


def shard_layout(local_rows: int, group) -> Tuple[int, int]:
    """(offset of this rank's first row, V over the group), from every rank's row count.

    Shards are contiguous and in rank order within the group. A collective.
    """
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([int(local_rows)], dtype=torch.int64), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _local_weight(weight, bias, vocab_group):
    """(local weight [V_r, H], local bias or None, group) from a shard + group or a DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed tensors
        DTensor = Shard = None
    if DTensor is not None and isinstance(weight, DTensor):
        if vocab_group is not None:
            raise ValueError("pass vocab_group only with a local weight shard, not a DTensor")
        mesh = weight.device_mesh
        if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"a DTensor weight must be Shard(0) on a 1-D mesh, got placements "
                             f"{tuple(weight.placements)} on a {mesh.ndim}-D mesh")
        group = mesh.get_group()
        if isinstance(bias, DTensor):
            bias = bias.to_local()
        return weight.to_local(), bias, group
    if vocab_group is None:
        raise ValueError("a vocab-parallel loss needs vocab_group= (the process group that "
                         "shards the vocabulary) or a Shard(0) DTensor weight")
    return weight, bias, vocab_group


def _partials(hidden, weight, bias, rows, targets, offset, softcap, want_sumz, want_stats,
              buffer_bytes):
    """This shard's partial statistics for the kept rows: dict of [M] tensors."""
    Vl = weight.shape[0]
    cd = reference.compute_dtype_for(hidden.dtype)
    w, b = weight.to(cd), None if bias is None else bias.to(cd)
    M = rows.numel()
    keys = ["m", "s", "tz"] + (["sz"] if want_sumz else []) + (["ez", "av", "ai"] if want_stats else [])
    out = {k: torch.empty(M, dtype=torch.int64 if k == "ai" else cd, device=hidden.device)
           for k in keys}
    local = targets - offset
    inside = (local >= 0) & (local < Vl)
    step = reference.rows_per_chunk(Vl, buffer_bytes)
    for start in range(0, M, step):
        sl = slice(start, start + step)
        z = reference.logits_ref(hidden[rows[sl]].to(cd), w, b, softcap)
        m = z.max(dim=1).values
        e = torch.exp(z - m[:, None])
        out["m"][sl], out["s"][sl] = m, e.sum(1)
        picked = z.gather(1, local[sl].clamp(0, Vl - 1)[:, None]).squeeze(1)
        out["tz"][sl] = torch.where(inside[sl], picked, torch.zeros_like(picked))
        if want_sumz:
            out["sz"][sl] = z.sum(1)
        if want_stats:
            out["ez"][sl] = (e * (z - m[:, None])).sum(1)  # shifted: no cancellation
            out["av"][sl] = m
            out["ai"][sl] = z.argmax(1) + offset
    return out


def _combine(part, group):
    """All-gather the partials over the group and merge them: (lse, tz, sz, entropy, argmax)."""
    world = dist.get_world_size(group)
    gathered = {}
    for key, value in part.items():
        bufs = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(bufs, value.contiguous(), group=group)
        gathered[key] = torch.stack(bufs)
    # shards are in rank order, so the first rank wins argmax ties: the lowest index
    return reference.merge_partials(**gathered)


class _VocabParallelLoss(torch.autograd.Function):
    """Per-kept-row loss [M] of a vocab-sharded head; stats ride along non-differentiably."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, group, offset, vocab_size,
                label_smoothing, z_loss, softcap, buffer_bytes, want_stats):
        part = _partials(hidden, weight, bias, rows, targets, offset, softcap,
                         label_smoothing > 0, want_stats, buffer_bytes)
        lse, tz, sz, entropy, argmax = _combine(part, group)
        loss = reference.per_token_loss(lse, tz, sz, vocab_size, label_smoothing, z_loss)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        ctx.opts = (group, offset, vocab_size, label_smoothing, z_loss, softcap, buffer_bytes)
        none = lse.new_empty(0)
        stats = ((tz - lse).float(), entropy.float(), argmax == targets) if want_stats else \
            (none.float(), none.float(), torch.empty(0, dtype=torch.bool, device=lse.device))
        ctx.mark_non_differentiable(lse, *stats)
        return (loss, lse, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        group, offset, V, eps, lam, softcap, buffer_bytes = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() and (need_h or need_w or need_b):
            # The gradients below treat lse as a constant and are written in place: a
            # second backward through them would be wrong, so refuse it outright.
            raise NotImplementedError(
                "vocab_parallel_cross_entropy does not support second derivatives "
                "(a backward with create_graph=True). Use t3s_kernels.linear_cross_entropy "
                "on the gathered weight, which differentiates its gradients exactly, or "
                "F.linear + F.cross_entropy.")
        cd = reference.compute_dtype_for(hidden.dtype)
        w, b = weight.to(cd), None if bias is None else bias.to(cd)
        Vl = weight.shape[0]
        local = targets - offset
        inside = (local >= 0) & (local < Vl)
        grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        grad_b = torch.zeros(Vl, dtype=cd, device=weight.device) if need_b else None
        step = reference.rows_per_chunk(Vl, buffer_bytes)
        for start in range(0, rows.numel(), step):
            sl = slice(start, start + step)
            h = hidden[rows[sl]].to(cd)
            z = reference.logits_ref(h, w, b, softcap)
            g = reference.logit_grad(z, lse[sl], local[sl], V, eps, lam, softcap,
                                     has_target=inside[sl])
            g *= grad_loss[sl, None].to(cd)
            if need_h:
                grad_h.index_add_(0, rows[sl], g @ w)
            if need_w:
                grad_w += g.T @ h
            if need_b:
                grad_b += g.sum(0)
        if need_h:
            dist.all_reduce(grad_h, group=group)  # every shard's columns contribute
            grad_h = grad_h.to(hidden.dtype)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype)) + (None,) * 10


def refuse_unsharded_options(*, logit_scale, temperature, class_weight, softcap) -> None:
    """Raise for the options the sharded path does not implement, saying what to use
    instead; the defaults (1.0, 1.0, None) pass. Without a softcap, scaling hidden (and
    bias) by logit_scale / temperature gives the same logits; otherwise, and for class
    weights, the unsharded `t3s_kernels.linear_cross_entropy` on the gathered weight."""
    check_scale(logit_scale, temperature)
    unsupported = [name for name, off in (("logit_scale", logit_scale == 1.0),
                                          ("temperature", temperature == 1.0),
                                          ("class_weight", class_weight is None)) if not off]
    if not unsupported:
        return
    hint = ("t3s_kernels.linear_cross_entropy (or target_logprobs) on the gathered weight, "
            "which takes them")
    if "class_weight" not in unsupported and softcap is None:
        hint = ("hidden * (logit_scale / temperature) (and bias likewise), which gives the "
                "same logits without a softcap, or " + hint)
    raise NotImplementedError(
        f"the vocab-parallel path does not support {', '.join(unsupported)}; use {hint}")


def _prepare(hidden, weight, targets, bias, loss_mask, ignore_index, vocab_group):
    weight, bias, group = _local_weight(weight, bias, vocab_group)
    check_linear_inputs(hidden, weight, targets, bias)  # [V_r, H] shard, [V_r] bias
    offset, vocab_size = shard_layout(weight.shape[0], group)
    targets1d = targets.reshape(-1).long()
    mask1d = None if loss_mask is None else loss_mask.reshape(-1)
    token_weight = token_weights(targets1d, mask1d, ignore_index)
    rows = validate_and_compact(targets1d, mask1d, token_weight, vocab_size, ignore_index)
    return (hidden.reshape(-1, hidden.shape[-1]), weight, bias, group, offset, vocab_size,
            targets1d, token_weight, rows)


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    vocab_group=None, bias: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", normalizer: Union[None, int, float, torch.Tensor] = None,
    label_smoothing: float = 0.0, softcap: Optional[float] = None, z_loss: float = 0.0,
    return_stats: bool = False, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    logit_scale: float = 1.0, temperature: float = 1.0,
    class_weight: Optional[torch.Tensor] = None,
):
    """`t3s_kernels.linear_cross_entropy` with the head's rows sharded over ``vocab_group``.

    hidden: [..., H] (the same on every rank of the group); weight: this rank's rows
    [V_r, H] (or a ``Shard(0)`` DTensor); targets: [...] global ids in [0, V) or
    ``ignore_index``; bias: this rank's [V_r]. Every option means what it means in
    `linear_cross_entropy` (V is the whole vocabulary); the result, its gradients
    with respect to hidden and to each rank's shard, and the statistics equal the
    unsharded ones. Collective: every rank of the group must call it.

    ``logit_scale``, ``temperature`` and ``class_weight`` are not supported here (a
    clear error, never silently ignored; see `refuse_unsharded_options`).
    """
    refuse_unsharded_options(logit_scale=logit_scale, temperature=temperature,
                             class_weight=class_weight, softcap=softcap)
    check_loss_mask(loss_mask, targets)
    check_options(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                  z_loss=z_loss, normalizer=normalizer, filter_eps=None,
                  accum_dtype=torch.float32, weight_dtype=weight.dtype, buffer_bytes=buffer_bytes)
    lead = targets.shape
    h2d, w, b, group, offset, V, t1d, token_weight, rows = _prepare(
        hidden, weight, targets, bias, loss_mask, ignore_index, vocab_group)
    loss_kept, lse, logprob, entropy, correct = _VocabParallelLoss.apply(
        h2d, w, b, rows, t1d[rows].contiguous(), group, offset, V, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), buffer_bytes, return_stats)
    n = t1d.numel()
    token_loss = torch.zeros(n, dtype=loss_kept.dtype, device=loss_kept.device)
    token_loss = token_loss.index_put((rows,), loss_kept)
    loss = reference.reduce_token_losses(token_loss, token_weight, reduction, normalizer)
    if reduction == "none":
        loss = loss.view(lead)
    if not return_stats:
        return loss
    nan = float("nan")
    return loss, TokenStats(target_logprob=scatter_rows(logprob, rows, n, nan).view(lead),
                            entropy=scatter_rows(entropy, rows, n, nan).view(lead),
                            argmax_correct=scatter_rows(correct, rows, n, False).view(lead),
                            lse=scatter_rows(lse.float(), rows, n, nan).view(lead))


@torch.no_grad()
def vocab_parallel_target_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    vocab_group=None, bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
    return_entropy: bool = False, return_argmax: bool = False, ignore_index: int = -100,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES, logit_scale: float = 1.0,
    temperature: float = 1.0,
):
    """`t3s_kernels.target_logprobs` with the head's rows sharded over ``vocab_group``.

    Shapes and arguments as in `vocab_parallel_cross_entropy`; returns float32 [...]
    log-probs, or `TargetLogprobs` with entropy / argmax (global ids). Collective.
    ``logit_scale`` / ``temperature`` other than 1 raise (`refuse_unsharded_options`).
    """
    refuse_unsharded_options(logit_scale=logit_scale, temperature=temperature,
                             class_weight=None, softcap=softcap)
    check_softcap(softcap)
    lead = targets.shape
    h2d, w, b, group, offset, V, t1d, _, rows = _prepare(
        hidden.detach(), weight.detach() if isinstance(weight, torch.Tensor) else weight,
        targets, None if bias is None else bias.detach(), None, ignore_index, vocab_group)
    want = return_entropy or return_argmax
    part = _partials(h2d, w, b, rows, t1d[rows].contiguous(), offset, softcap, False, want,
                     buffer_bytes)
    lse, tz, _, entropy, argmax = _combine(part, group)
    n = t1d.numel()
    logprob = scatter_rows((tz - lse).float(), rows, n, float("nan")).view(lead)
    if not want:
        return logprob
    return TargetLogprobs(
        logprobs=logprob,
        entropy=scatter_rows(entropy.float(), rows, n, float("nan")).view(lead) if return_entropy else None,
        argmax=scatter_rows(argmax, rows, n, -1).view(lead) if return_argmax else None)
