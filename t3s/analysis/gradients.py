"""Per-group losses and gradients with the fused masked loss, and their comparison.

For each group g of tokens (`t3s.analysis.groups`), L_g(θ) is the mean
cross-entropy over the group's tokens of the analysed examples, computed with
`t3s.masked_ce` from the model's last hidden states (one forward per batch,
one backward per group: the [B, T, V] logits are never materialised).
`group_gradients` returns ∇L_g over a chosen parameter subset
(`parameter_subset`: e.g. the last k decoder layers plus the output head),
flattened to one vector per group; `gradient_stats` gives the norms, the
norm ratio ‖∇L_a‖ / ‖∇L_b‖ and the cosine matrix.

Shapes: G groups, B batch, T sequence length, H hidden size, V vocabulary, P
the number of parameters in the subset.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..hf.heads import lm_head, last_hidden_state, output_embedding
from ..loss import masked_ce
from .groups import GroupBatch

__all__ = ["parameter_subset", "describe_subset", "group_loss_sums", "group_losses",
           "group_gradients", "gradient_stats", "cosine", "analysis_mode"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def parameter_subset(model: nn.Module, *, last_layers: Optional[int] = None,
                     head: bool = True) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of the subset the gradients are taken over.

    last_layers: None for every trainable parameter; k ≥ 0 for the parameters of
    the last k decoder layers (names ``...layers.<i>.``) plus, with ``head``, the
    output embedding's (tied to the input embedding in some models) and the
    final norm's parameters (those outside every layer that the head follows:
    named ``norm`` / ``ln_f``). ValueError when the subset is empty or k is above the
    number of decoder layers."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if last_layers is None:
        chosen = params
    else:
        if last_layers < 0:
            raise ValueError(f"last_layers must be ≥ 0, got {last_layers}")
        layer_of = {n: int(m.group(1)) for n, _ in params if (m := _LAYER_RE.search(n))}
        if last_layers and not layer_of:
            raise ValueError("no decoder layers found in the parameter names (expected "
                             "'...layers.<i>.'); use last_layers=None for all parameters")
        top = max(layer_of.values(), default=-1)
        if last_layers > top + 1:
            raise ValueError(f"last_layers={last_layers} but the model has {top + 1} decoder "
                             "layers")
        head_ids = {id(p) for p in output_embedding(model).parameters()} if head else set()
        chosen = []
        for n, p in params:
            if n in layer_of:
                keep = layer_of[n] > top - last_layers
            else:
                keep = head and (id(p) in head_ids or n.split(".")[-2:-1] in (["norm"], ["ln_f"]))
            if keep:
                chosen.append((n, p))
    if not chosen:
        raise ValueError("the parameter subset is empty (no trainable parameter matches)")
    return chosen


def describe_subset(subset: Sequence[Tuple[str, nn.Parameter]], model: nn.Module,
                    *, last_layers: Optional[int] = None) -> Dict[str, object]:
    """What a subset is, for the outputs: its size and share of the trainable parameters."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = sum(p.numel() for _, p in subset)
    return {"last_layers": last_layers, "tensors": len(subset), "parameters": n,
            "fraction_of_trainable": n / total if total else math.nan,
            "all": last_layers is None}


@contextlib.contextmanager
def analysis_mode(model: nn.Module, subset: Sequence[Tuple[str, nn.Parameter]]) -> Iterator[None]:
    """Eval mode (no dropout) and gradients only for ``subset`` (so the backward stops
    there); both restored on exit."""
    keep = {id(p) for _, p in subset}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def group_loss_sums(model: nn.Module, batch: GroupBatch, head=None) -> torch.Tensor:
    """Σ of the per-token cross-entropy over each group's tokens in ``batch``: float32 [G],
    differentiable (one forward, the fused masked loss once per group)."""
    head = head if head is not None else lm_head(model)
    batch = batch.to(_device(model))
    hidden = last_hidden_state(model, batch.input_ids, batch.attention_mask)[:, :-1]
    weight, bias = head.tensors()
    if head.logit_scale != 1.0:
        hidden = hidden * head.logit_scale
        bias = None if bias is None else bias * head.logit_scale
    targets = batch.labels[:, 1:]
    sums = [masked_ce(hidden, weight, targets, batch.masks[g, :, 1:], reduction="sum",
                      bias=bias, softcap=head.softcap)
            for g in range(batch.masks.shape[0])]
    return torch.stack([s.float() for s in sums])


def _counts(batches: Sequence[GroupBatch]) -> torch.Tensor:
    return torch.stack([b.counts() for b in batches]).sum(0).double()


def group_losses(model: nn.Module, batches: Sequence[GroupBatch], *, head=None) -> torch.Tensor:
    """L_g: each group's mean token loss over ``batches``, float64 [G] (no gradients).

    head: the model's `t3s.LMHead` (default: measured by `t3s.lm_head`'s probe)."""
    if not batches:
        raise ValueError("no batches")
    head = head if head is not None else lm_head(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = sum(group_loss_sums(model, b, head).double().cpu() for b in batches)
    finally:
        model.train(was_training)
    return total / _counts(batches).clamp_min(1)


def group_gradients(model: nn.Module, batches: Sequence[GroupBatch],
                    subset: Sequence[Tuple[str, nn.Parameter]], *, head=None,
                    only: Optional[int] = None, return_losses: bool = False):
    """∇L_g over ``subset`` for each group, flattened: float32 [G, P] on the model's device
    (only: the gradient of that group alone, [1, P]); with ``return_losses`` also L_g
    (float64 [G], as `group_losses`) from the same forward passes.

    L_g is the group's mean token loss over all of ``batches`` (sums accumulated
    per batch, divided by the group's token count at the end). The model runs in
    eval mode, and only ``subset`` requires gradients meanwhile. head: as in
    `group_losses`."""
    if not batches:
        raise ValueError("no batches")
    params = [p for _, p in subset]
    n_groups = batches[0].masks.shape[0]
    wanted = list(range(n_groups)) if only is None else [int(only)]
    size = sum(p.numel() for p in params)
    grads = torch.zeros((len(wanted), size), dtype=torch.float32, device=_device(model))
    head = head if head is not None else lm_head(model)
    loss_sums = torch.zeros(n_groups, dtype=torch.float64)
    with analysis_mode(model, subset):
        for batch in batches:
            sums = group_loss_sums(model, batch, head)
            loss_sums += sums.detach().double().cpu()
            for i, g in enumerate(wanted):
                parts = torch.autograd.grad(sums[g], params, retain_graph=i < len(wanted) - 1,
                                            allow_unused=True)
                grads[i] += torch.cat([torch.zeros(p.numel(), device=grads.device)
                                       if d is None else d.reshape(-1).float()
                                       for p, d in zip(params, parts)])
    counts = _counts(batches)
    grads /= counts[wanted].to(grads.device).float().clamp_min(1)[:, None]
    return (grads, loss_sums / counts.clamp_min(1)) if return_losses else grads


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) of two vectors [P], computed in float64 and clipped to [−1, 1]; NaN when
    either is zero."""
    if a.shape != b.shape:
        raise ValueError(f"vectors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = float(a64.norm()), float(b64.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(a64 @ b64) / (na * nb)))


def gradient_stats(grads: torch.Tensor, names: Sequence[str]) -> Dict[str, object]:
    """Norms, ratios and cosines of per-group gradients ``grads`` [G, P].

    Returns {"norms": {g: ‖∇L_g‖}, "norm_ratio": ‖∇L_{names[0]}‖ / ‖∇L_{names[1]}‖,
    "cosine": cos(∇L_{names[0]}, ∇L_{names[1]}), "cosine_matrix": [G][G],
    "dot_matrix": [G][G] (<∇L_a, ∇L_b>)}."""
    if grads.ndim != 2 or grads.shape[0] != len(names):
        raise ValueError(f"grads must be [G={len(names)}, P], got {tuple(grads.shape)}")
    g64 = grads.double()
    norms = g64.norm(dim=1)
    dots = g64 @ g64.T
    cos = [[cosine(grads[i], grads[j]) for j in range(len(names))] for i in range(len(names))]
    ratio = float(norms[0] / norms[1]) if float(norms[1]) > 0 else math.nan
    return {"norms": {n: float(v) for n, v in zip(names, norms)}, "norm_ratio": ratio,
            "cosine": cos[0][1], "cosine_matrix": cos, "dot_matrix": dots.tolist()}
