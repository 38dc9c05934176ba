"""Second derivatives: the loss gradients as a differentiable function of the inputs.

The loss ops of `t3s_kernels.ops` compute their gradients in kernels (in the forward
for 'mean' / 'sum', in a deferred backward for 'none'); to autograd those gradients
are constants, so differentiating them again would drop the cross-entropy's
curvature. Their autograd backwards therefore branch on ``torch.is_grad_enabled()``,
which autograd sets only when the backward itself is being recorded
(``create_graph=True``: Hessian-vector products, gradient penalties, meta-learning):

- grad mode off (every ordinary ``backward()``): the kernels' gradients, unchanged;
- grad mode on: `loss_gradients` below, the same gradients written with plain
  differentiable PyTorch ops on the materialised logits of the kept rows, so that the
  next backward is exact, through hidden, weight, bias and the incoming grad_output.

The formula is the specification's (`t3s_kernels.reference`): for a kept token t,

    d loss_t / d r_tj = (p_tj (1 + 2 lam lse_t) - (1 - eps) [j == y_t] - eps / V)
                        * (1 - (z_tj / c)**2 under a softcap c)

times coef_t = d out / d loss_t (the token weight over the denominator, times the
stop-gradient p_ty under token scaling, times grad_output). This path holds the
[M, V] logits and their autograd graph, as ``F.linear`` + ``F.cross_entropy`` would:
second-order use is for problems where that fits. It is exact (no ``filter_eps``).

Legend: N tokens, H hidden, V vocabulary, M kept tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import prepare, reference

__all__ = ["loss_gradients"]


def loss_gradients(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                   loss_mask: Optional[Tensor], coef: Tensor, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: Optional[float],
                   token_scaling: bool, need: Tuple[bool, bool, bool],
                   logit_scale: float = 1.0, temperature: float = 1.0,
                   class_weight: Optional[Tensor] = None,
                   ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Differentiable gradients of sum_t coef_t * loss_t (loss_t unweighted, as the ops'
    token_loss) with respect to (hidden, weight, bias).

    hidden: [N, H]; weight: [V, H]; bias: [V] or None; targets: [N] int64 (ignore_index
    allowed); loss_mask: [N] or None; coef: [N] (0 or anything on dropped rows: they are
    left out). ``token_scaling`` multiplies coef_t by the stop-gradient
    p_ty = exp(z_ty - lse_t). Returns (grad_hidden [N, H] with zeros on dropped rows,
    grad_weight [V, H], grad_bias [V]) in the inputs' dtypes, None where ``need`` is False.
    logit_scale, temperature, class_weight ([V] or None): the options of the loss
    (`t3s_kernels.reference`), with the same formulas.
    Must run with grad mode on (the caller's backward under ``create_graph=True``).
    """
    need_h, need_w, need_b = need
    V = weight.shape[0]
    cd = reference.compute_dtype_for(hidden.dtype)
    token_weight = prepare.token_weights(targets, loss_mask, ignore_index)
    rows = prepare.kept_rows(token_weight != 0)  # the values were checked by the forward
    h = hidden.index_select(0, rows).to(cd)
    w = weight.to(cd)
    z = reference.logits_ref(h, w, None if bias is None else bias.to(cd), softcap,
                             logit_scale, temperature)
    t = targets.index_select(0, rows)
    # torch.logsumexp and softmax are twice differentiable; no in-place ops below, so
    # autograd keeps every intermediate the second backward needs.
    lse = torch.logsumexp(z, 1)
    p = torch.exp(z - lse[:, None])
    eps = label_smoothing
    if class_weight is not None:  # F.cross_entropy's weight= (`reference` module doc)
        a = class_weight.to(cd)
        a_y = a.index_select(0, t)
        g = p * ((1.0 - eps) * a_y + (eps / V) * a.sum() + 2.0 * z_loss * lse)[:, None]
        g = g - ((1.0 - eps) * a_y)[:, None] * F.one_hot(t, V).to(cd)
        if eps:
            g = g - (eps / V) * a
    else:
        g = p * (1.0 + 2.0 * z_loss * lse)[:, None] if z_loss else p
        g = g - (1.0 - eps) * F.one_hot(t, V).to(cd)
        if eps:
            g = g - eps / V
    if softcap is not None:
        g = g * (1.0 - (z / (softcap / temperature)) ** 2)
    if logit_scale != temperature:
        g = g * (logit_scale / temperature)
    c = coef.index_select(0, rows).to(cd)
    if token_scaling:  # DFT: the scale is a constant to autograd, as in the first order
        c = c * torch.exp(z.gather(1, t[:, None]).squeeze(1) - lse).detach()
    g = g * c[:, None]  # d out / d r  [M, V]
    grad_h = grad_w = grad_b = None
    if need_h:
        grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device)
        grad_h = grad_h.index_add(0, rows, g @ w).to(hidden.dtype)
    if need_w:
        grad_w = (g.T @ h).to(weight.dtype)
    if need_b and bias is not None:
        grad_b = g.sum(0).to(bias.dtype)
    return grad_h, grad_w, grad_b
