"""Pure-PyTorch reference: the specification of every t3s kernel, and the fallback.

Notation (one token t, after flattening): hidden h_t [H], weight W [V, H],
optional bias b [V], target y_t, token weight w_t.

    r_t   = W h_t + b                                    raw logits       [V]
    u_t   = c * tanh(s r_t / c)   if softcap c else s r_t   (s = logit_scale)
    z_t   = u_t / T                                      logits (T = temperature) [V]
    lse_t = log sum_j exp(z_tj)
    loss_t = lse_t - (1 - eps) z_ty - (eps / V) sum_j z_tj + lam * lse_t**2

with eps = label_smoothing and lam = z_loss (s = T = 1 by default). With per-class
weights a [V] (``class_weight``; ``F.cross_entropy``'s ``weight=``):

    loss_t = (1 - eps) a_y (lse_t - z_ty) + (eps / V) sum_j a_j (lse_t - z_tj) + lam lse_t**2

(the z-loss term is not class-weighted), and the token weight below is multiplied by
a_y in the 'mean' denominator only: 'mean' = sum_t w_t loss_t / sum_t w_t a_{y_t}, as
``F.cross_entropy`` divides by the targets' class weights. The token weight is

    w_t = 0                  if y_t == ignore_index
    w_t = loss_mask_t        otherwise (bool -> 0/1; 1 if no mask is given)

and the reductions are

    'none':  w_t * loss_t                 (shape of targets; 0 where w_t == 0)
    'sum':   sum_t w_t loss_t             (/ normalizer if given)
    'mean':  sum_t w_t loss_t / sum_t w_t (normalizer replaces the denominator);
             0 when every token is dropped, never NaN.

Token scaling (``token_scaling=True``; DFT, as TRL's ``loss_type="dft"`` and Liger's
``use_token_scaling``) weights each kept token's loss by its own target probability,
through which no gradient flows:

    loss_t <- sg(p_ty) * loss_t,    p_ty = exp(z_ty - lse_t)

(the plain target probability of the softcapped logits, also under label smoothing and
z-loss; sg = stop-gradient). The token weights and the reductions stay as above, same
denominators: 'mean' = sum_t w_t p_ty loss_t / sum_t w_t, 'none' gives w_t p_ty loss_t,
and the gradient of loss_t below is multiplied by p_ty. The statistics are unchanged.

Tokens with w_t == 0 are removed before any matmul. The gradient of loss_t
with respect to z_t is

    d loss_t / d z_tj = p_tj (1 + 2 lam lse_t) - (1 - eps) [j == y_t] - eps / V

(with class weights: p_tj ((1 - eps) a_y + (eps / V) sum_k a_k + 2 lam lse_t)
- (1 - eps) a_y [j == y_t] - (eps / V) a_j), and d z_tj / d r_tj = s / T, times
(1 - (T z_tj / c)**2) under a softcap. Per-token statistics, computed in
the same pass for the kept tokens:

    target_logprob_t = z_ty - lse_t
    entropy_t        = -sum_j p_tj log p_tj
                     = log sum_j e^{s_tj} - sum_j p_tj s_tj,   s_tj = z_tj - max_k z_tk
    argmax_correct_t = (argmax_j z_tj == y_t)

Everything is accumulated in float32 (float64 for float64 inputs). A kept token
whose logits hold ±inf or NaN gets a NaN loss and NaN statistics (as with
``F.cross_entropy``); a dropped token never enters a matmul, so its values
cannot reach the loss. The
reference works on row chunks sized so that no chunk's [rows, V] temporaries
exceed ``buffer_bytes``: it never holds the N x V logits. It keeps one
float32 copy of a low-precision weight.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .debug import empty
from .prepare import Grads, LossOptions, RowLosses


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(vocab_size: int, buffer_bytes: int, live_copies: int = 3) -> int:
    """Rows whose `live_copies` float32 [rows, V] temporaries fit in buffer_bytes."""
    return max(1, buffer_bytes // (vocab_size * 4 * live_copies))


def logits_ref(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               softcap: Optional[float], logit_scale: float = 1.0,
               temperature: float = 1.0) -> torch.Tensor:
    """z = softcap(logit_scale * (h W^T + b)) / temperature in the dtype of `h` (callers
    upcast). h: [C, H] -> [C, V]. Differentiable (no in-place ops)."""
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def per_token_loss(lse: torch.Tensor, target_logit: torch.Tensor,
                   sum_logits: Optional[torch.Tensor], vocab_size: int,
                   label_smoothing: float, z_loss: float,
                   target_weight: Optional[torch.Tensor] = None,
                   weight_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """loss_t from the row statistics (all [M], float32).

    With class weights: target_weight [M] = a_y, weight_sum = sum_k a_k (a 0-dim tensor)
    and sum_logits = sum_j a_j z_tj (the module docstring's weighted loss)."""
    if target_weight is not None:
        loss = (1.0 - label_smoothing) * target_weight * (lse - target_logit)
        if label_smoothing:
            loss = loss + (label_smoothing / vocab_size) * (weight_sum * lse - sum_logits)
        if z_loss:
            loss = loss + z_loss * lse * lse
        return loss
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - (label_smoothing / vocab_size) * sum_logits
    if z_loss:
        loss = loss + z_loss * lse * lse
    return loss


def row_lse(z: torch.Tensor) -> torch.Tensor:
    """lse_t = m_t + log sum_j exp(z_tj - m_t), m_t = max_j z_tj. z: [C, V] -> [C].

    Written out rather than `torch.logsumexp`, which returns +inf for a row with
    an infinite logit: here such a row gives NaN (inf - inf), as
    ``F.cross_entropy`` and the streaming kernels do. A non-finite hidden state
    or weight in a kept token therefore makes its loss NaN, never ±inf.
    """
    m = z.max(dim=1, keepdim=True).values
    return (m + torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))).squeeze(1)


def merge_partials(m: torch.Tensor, s: torch.Tensor, tz: Optional[torch.Tensor] = None,
                   sz: Optional[torch.Tensor] = None, ez: Optional[torch.Tensor] = None,
                   av: Optional[torch.Tensor] = None, ai: Optional[torch.Tensor] = None):
    """Merge row statistics computed over disjoint column blocks (vocabulary splits of
    one kernel, or the shards of a vocab-parallel head). Each input is [S, M]:

        m max logit, s sum exp(z - m), tz target logit (0 where the target is elsewhere),
        sz sum z, ez sum exp(z - m) (z - m) (shifted by the block's own max),
        av / ai the block's max logit and its index.

    Returns (lse, target_logit, sum_logits, entropy, argmax), each [M] or None:
    lse = top + log sum_s exp(m_s - top) s_s, and so on. Ties in argmax go to the
    first block, i.e. the lowest vocabulary index. The entropy is that of `row_entropy`,
    log(total) - sum_s exp(m_s - top) (ez_s + (m_s - top) s_s) / total: two terms >= 0,
    never lse - sum p z, which cancels when the entropy is small next to |lse|.
    """
    top = m.max(dim=0).values
    # exp(-inf - (-inf)) would be NaN for an empty block; every block has >= 1 column.
    scale = torch.exp(m - top)
    total = (scale * s).sum(0)
    lse = top + torch.log(total)
    target_logit = tz.sum(0) if tz is not None else None
    sum_logits = sz.sum(0) if sz is not None else None
    entropy = (torch.log(total) - (scale * (ez + (m - top) * s)).sum(0) / total
               if ez is not None else None)
    argmax = ai.gather(0, av.argmax(0)[None]).squeeze(0) if av is not None else None
    return lse, target_logit, sum_logits, entropy, argmax


def row_entropy(z: torch.Tensor) -> torch.Tensor:
    """entropy_t = -sum_j p_tj log p_tj for a chunk. z: [C, V] -> [C].

    Computed on the shifted logits s = z - max z as log sum e^s - sum_j p_j s_j: both
    terms are >= 0 and small on a peaked row. The textbook lse - sum_j p_j z_j takes
    the difference of two numbers ~max z instead, and loses the entropy to their
    rounding (1.75e-5 absolute in float32 on TRL's peaked rows). sum e^s = k + rest,
    with k >= 1 maxima (e^0 = 1 exactly) and rest the sum of the others, enters as
    log1p(k - 1 + rest): rest stays exact where 1 + rest would round it away, so a tiny
    entropy keeps its relative precision too. A non-finite logit gives NaN, as the loss.
    """
    s = z - z.max(dim=1, keepdim=True).values
    e = torch.exp(s)
    below = s < 0
    rest = torch.where(below, e, torch.zeros((), dtype=e.dtype, device=e.device)).sum(1)
    rest = rest + (z.shape[1] - 1 - below.sum(1)).to(e.dtype)  # ties at the max: +1 each
    return torch.log1p(rest) - (e * s).sum(1) / (1.0 + rest)


def logit_grad(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, vocab_size: int,
               label_smoothing: float, z_loss: float, softcap: Optional[float],
               has_target: Optional[torch.Tensor] = None, *, logit_scale: float = 1.0,
               temperature: float = 1.0,
               class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d loss_t / d r_t for a chunk. z: [C, V] logits (after the logit map), lse/targets: [C].

    vocab_size: V of the whole vocabulary (eps / V). has_target: [C] bool, the rows
    whose target is among z's columns (a vocabulary shard holds only some); None: all.
    class_weight: [V] in z's dtype, or None (module docstring).
    """
    eps = label_smoothing
    p = torch.exp(z - lse[:, None])
    rows = torch.arange(z.shape[0], device=z.device)
    if class_weight is not None:
        a_y = class_weight[targets]
        coef = (1.0 - eps) * a_y + (eps / vocab_size) * class_weight.sum() + 2.0 * z_loss * lse
        grad = p * coef[:, None]
        grad[rows, targets] -= (1.0 - eps) * a_y
        if eps:
            grad -= (eps / vocab_size) * class_weight
    else:
        grad = p * (1.0 + 2.0 * z_loss * lse)[:, None] if z_loss else p
        if has_target is None:
            grad[rows, targets] -= 1.0 - eps
        else:
            grad[rows[has_target], targets[has_target]] -= 1.0 - eps
        if eps:
            grad -= eps / vocab_size
    if softcap is not None:
        grad *= 1.0 - (z / (softcap / temperature)) ** 2
    if logit_scale != temperature:
        grad *= logit_scale / temperature
    return grad


def token_losses_forward_ref(hidden: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], rows: torch.Tensor,
                             targets: torch.Tensor, opts: LossOptions,
                             want_stats: bool) -> RowLosses:
    """loss_t, lse_t (and the statistics) for the kept rows, chunked over rows.

    hidden: [N, H]; weight: [V, H]; bias: [V] or None; rows: [M] int64 indices
    into hidden; targets: [M] int64 (the kept rows' labels). `opts.filter_eps`
    (a speed option of the kernels) is ignored: the reference is always exact.
    loss_t is unscaled; under `opts.token_scaling` target_logprob (log p_ty, in the
    loss dtype) comes back even without ``want_stats``: the caller scales by its exp.
    """
    V = weight.shape[0]
    cd = compute_dtype_for(hidden.dtype)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    M = rows.numel()
    n_stats = M if want_stats else 0  # entropy and argmax cost extra passes over [C, V]
    want_logprob = want_stats or opts.token_scaling
    loss = empty(M, dtype=cd, device=hidden.device)
    lse_all = empty(M, dtype=cd, device=hidden.device)
    logprob = empty(M if want_logprob else 0, dtype=cd, device=hidden.device)
    entropy = empty(n_stats, dtype=torch.float32, device=hidden.device)
    correct = empty(n_stats, dtype=torch.bool, device=hidden.device)
    cw = None if opts.class_weight is None else opts.class_weight.to(cd)
    step = rows_per_chunk(V, opts.buffer_bytes)
    for s in range(0, M, step):
        sl = slice(s, s + step)
        z = logits_ref(hidden[rows[sl]].to(cd), w, b, opts.softcap, opts.logit_scale,
                       opts.temperature)
        lse = row_lse(z)
        tz = z.gather(1, targets[sl, None]).squeeze(1)
        if cw is None:
            sum_z = z.sum(1) if opts.label_smoothing else None
            loss[sl] = per_token_loss(lse, tz, sum_z, V, opts.label_smoothing, opts.z_loss)
        else:
            sum_z = z @ cw if opts.label_smoothing else None
            loss[sl] = per_token_loss(lse, tz, sum_z, V, opts.label_smoothing, opts.z_loss,
                                      cw[targets[sl]], cw.sum())
        lse_all[sl] = lse
        if want_logprob:
            logprob[sl] = tz - lse
        if want_stats:
            entropy[sl] = row_entropy(z)
            correct[sl] = z.argmax(1) == targets[sl]
    return RowLosses(loss, lse_all, logprob, entropy, correct)


def token_losses_backward_ref(hidden: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], rows: torch.Tensor,
                              targets: torch.Tensor, lse: torch.Tensor,
                              grad_loss: torch.Tensor, opts: LossOptions,
                              need: Tuple[bool, bool, bool]) -> Grads:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) from d out / d loss_t.

    rows, targets, lse, grad_loss: [M] for the kept rows (`lse` from the
    forward). Entries of ``need`` that are False give None. Rows of hidden that
    are not kept get a zero gradient. Token scaling is in grad_loss already (the
    caller's d out / d loss_t includes p_ty).
    """
    need_h, need_w, need_b = need
    V = weight.shape[0]
    cd = compute_dtype_for(hidden.dtype)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = (torch.zeros(weight.shape, dtype=opts.accum_dtype, device=weight.device)
              if need_w else None)
    grad_b = torch.zeros(V, dtype=cd, device=weight.device) if need_b else None
    cw = None if opts.class_weight is None else opts.class_weight.to(cd)
    step = rows_per_chunk(V, opts.buffer_bytes)
    for s in range(0, rows.numel(), step):
        sl = slice(s, s + step)
        h = hidden[rows[sl]].to(cd)
        z = logits_ref(h, w, b, opts.softcap, opts.logit_scale, opts.temperature)
        g = logit_grad(z, lse[sl], targets[sl], V, opts.label_smoothing, opts.z_loss,
                       opts.softcap, logit_scale=opts.logit_scale,
                       temperature=opts.temperature, class_weight=cw)
        g *= grad_loss[sl, None].to(cd)
        if need_h:
            grad_h[rows[sl]] = (g @ w).to(hidden.dtype)
        if need_w:
            grad_w += (g.T @ h).to(opts.accum_dtype)
        if need_b:
            grad_b += g.sum(0)
    if need_w:
        grad_w = grad_w.to(weight.dtype)
    if need_b:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


@torch.no_grad()
def target_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        rows: torch.Tensor, targets: torch.Tensor, *, softcap: Optional[float],
                        want_entropy: bool, want_argmax: bool, buffer_bytes: int,
                        logit_scale: float = 1.0, temperature: float = 1.0):
    """Forward-only statistics for the rows `rows` of hidden [N, H].

    Returns float32 log p(target) [M], and entropy [M] (float32) and argmax
    [M] (int64) when asked, else None.
    """
    V = weight.shape[0]
    cd = compute_dtype_for(hidden.dtype)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    M = rows.numel()
    logprob = empty(M, dtype=torch.float32, device=hidden.device)
    entropy = empty(M, dtype=torch.float32, device=hidden.device) if want_entropy else None
    argmax = empty(M, dtype=torch.int64, device=hidden.device) if want_argmax else None
    step = rows_per_chunk(V, buffer_bytes)
    for s in range(0, M, step):
        sl = slice(s, s + step)
        z = logits_ref(hidden[rows[sl]].to(cd), w, b, softcap, logit_scale, temperature)
        lse = row_lse(z)
        logprob[sl] = z.gather(1, targets[sl, None]).squeeze(1) - lse
        if want_entropy:
            entropy[sl] = row_entropy(z)
        if want_argmax:
            argmax[sl] = z.argmax(1)
    return logprob, entropy, argmax


def token_scale(target_logprob: torch.Tensor, token_weight: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The stop-gradient DFT scale p_ty = exp(target_logprob_t) [N] in ``dtype``; 0 where
    ``token_weight`` is 0 (there target_logprob is NaN; the token leaves the loss)."""
    p = torch.exp(target_logprob.detach().to(dtype))
    return torch.where(token_weight != 0, p, torch.zeros((), dtype=dtype, device=p.device))


def class_weight_coefs(class_weight: torch.Tensor, targets: torch.Tensor,
                       label_smoothing: float, vocab_size: int
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-row gradient coefficients under class weights a [V] (targets [M]):
    (p coefficient base (1 - eps) a_y + (eps / V) sum_k a_k, on-target term (1 - eps) a_y),
    each [M] in a's dtype; d loss_t / d z_tj = p_tj (base_t + 2 lam lse_t) - on_t [j == y]
    - (eps / V) a_j (module docstring)."""
    on_target = (1.0 - label_smoothing) * class_weight[targets]
    return on_target + (label_smoothing / vocab_size) * class_weight.sum(), on_target


def reduce_token_losses(token_loss: torch.Tensor, token_weight: torch.Tensor, reduction: str,
                        normalizer, mean_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply token weights and the reduction. token_loss, token_weight: [N] -> [N] or [].

    mean_weight: [N] weights whose sum is the 'mean' denominator (w_t a_{y_t} with
    class weights, `mean_weights`); None: token_weight.

    ``token_loss`` is 0 (never NaN) where ``token_weight`` is 0. Plain
    differentiable PyTorch, so autograd hands each kept token its own
    d(out)/d(loss_t): a per-token grad_output under reduction='none' works.
    """
    weighted = token_loss * token_weight.to(token_loss.dtype)
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=token_loss.dtype, device=token_loss.device)
        return total / denom.reshape(())
    if reduction == "sum":
        return total
    # 'mean': sum(w l) / sum(w); an all-dropped batch has an empty sum -> 0, not 0/0.
    if mean_weight is None:
        mean_weight = token_weight
    denom = mean_weight.to(token_loss.dtype).sum().clamp_min(torch.finfo(token_loss.dtype).tiny)
    return total / denom


def mean_weights(token_weight: torch.Tensor, targets: torch.Tensor,
                 class_weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """w_t a_{y_t} [N] (the 'mean' denominator's terms under class weights; 0 where w_t is
    0, whatever the label there), or None without class weights. targets: [N] int64."""
    if class_weight is None:
        return None
    # any in-range index where the token is dropped (ignore_index; labels are checked
    # later, in the ops): its term is 0 either way
    safe = torch.where(token_weight != 0, targets, 0).clamp(0, class_weight.shape[0] - 1)
    return token_weight * class_weight.to(token_weight.dtype)[safe]
