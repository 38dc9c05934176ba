"""Triton fused linear + masked/weighted cross-entropy: the loss forward and backward.

Forward: the streaming kernel of `t3s_kernels.triton.forward` gives lse, the target logit and
(optionally) the logit sum, entropy and argmax of each kept row; nothing of
size N x V is stored. Backward: one kernel over (row block, vocab block)
tiles recomputes the logit tile and forms

    G = grad_loss_t * d loss_t / d r_tj          (fp32, see reference.py)

Two modes (`backward_mode`):

- fused (filtering on): skip the tile when every |d loss / d r| < filter_eps
  (gradient filtering), else add G W to grad_hidden and G^T h to grad_weight
  with fp32 atomics, all in the kernel;
- dense (exact): the kernel writes G for a vocabulary chunk, and the two
  GEMMs run in the BLAS library.

Memory: the temporaries together stay within `buffer_bytes`. grad_hidden is
accumulated in an fp32 [M, H] buffer (M kept rows) when that takes at most
half the budget, else in fp32 row chunks during an extra pass; grad_weight in
fp32 vocabulary chunks, each written out in the weight's dtype once complete
(so fp32 accumulation never needs a V x H fp32 buffer). With accum_dtype equal to the weight's
dtype the atomics go straight into grad_weight and no chunk buffer is used.

Atomics make the float summation order, hence the last bits, run-dependent. They
are relaxed (``sem="relaxed"``): the adds commute and nothing in the kernel reads
what another program added, so the default acq_rel ordering (a GPU-wide fence
around every add) buys nothing. The result is read only after the launch ends.

The scalar reductions 'mean' and 'sum' do not come here: they take the one-pass
path of `t3s_kernels.triton.forward_backward`, which has no atomics on
grad_hidden or grad_weight.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..debug import OVERRIDES, empty_like
from ..prepare import Grads, LossOptions, RowLosses
from ..reference import class_weight_coefs, per_token_loss
from .config import KERNELS_INTERPRETED, dot_precision, pick_config
from .forward import combine_partials, dot_acc, logit_tile, lse_partials


@triton.jit
def lce_backward_kernel(
    H, W, B, ROWS, TGT, LSE, GCOEF, CW, PBASE, ONTGT,
    DH, DW, DB, G,
    M, V, K, v_begin, v_end,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_dhm, stride_dwv, stride_gm,
    softcap, logit_mul, label_smoothing, z_loss, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_MUL: tl.constexpr,
    HAS_CW: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    STORE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    hrows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(TGT + offs_m, mask=row_mask, other=-1)
    cols = v_begin + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < v_end

    z = logit_tile(H, W, B, hrows, row_mask, cols, col_mask, K,
                   stride_hm, stride_hk, stride_wv, stride_wk, softcap,
                   HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
                   W, 0, False, logit_mul, HAS_MUL)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    if HAS_CW:  # class weights: per-row coefficients, per-column smoothing (`reference`)
        pbase = tl.load(PBASE + offs_m, mask=row_mask, other=0.0)
        ontgt = tl.load(ONTGT + offs_m, mask=row_mask, other=0.0)
        cw = tl.load(CW + cols, mask=col_mask, other=0.0)
        p = p * (pbase + 2.0 * z_loss * lse)[:, None]
        dz = p - tl.where(cols[None, :] == tgt[:, None], ontgt[:, None], 0.0)
        dz = dz - (label_smoothing / V) * cw[None, :]
    else:
        # z_loss * lse^2 adds 2 z_loss lse p_j to d loss / d z_j.
        p = p * (1.0 + 2.0 * z_loss * lse)[:, None]
        dz = p - tl.where(cols[None, :] == tgt[:, None], 1.0 - label_smoothing, 0.0)
        dz = dz - label_smoothing / V
    if HAS_SOFTCAP:
        if HAS_MUL:  # z = mul * cap * tanh(r / cap): softcap' = 1 - (z / (cap * mul))^2
            zc = z / (softcap * logit_mul)
        else:
            zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)

    # Gradient filtering: exact mode passes filter_eps < 0. NaN tiles are never skipped.
    tile_max = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
    if (tile_max >= filter_eps) | (tile_max != tile_max):
        g = dz * tl.load(GCOEF + offs_m, mask=row_mask, other=0.0)[:, None]
        if COMPUTE_DB:
            tl.atomic_add(DB + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
        g_in = g.to(H.dtype.element_ty)  # operand dtype of the two GEMMs, fp32 accumulation
        if STORE_G:  # dense mode: the GEMMs run outside, on this [M, chunk] tile of G
            tl.store(G + offs_m[:, None] * stride_gm + (cols - v_begin)[None, :], g_in,
                     mask=row_mask[:, None] & col_mask[None, :])
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            if COMPUTE_DH:
                w_tile = tl.load(W + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                                 mask=col_mask[:, None] & kmask[None, :], other=0.0)
                dh = dot_acc(g_in, w_tile, tl.zeros((BLOCK_M, BLOCK_K), tl.float32),
                          UPCAST, PRECISION)
                tl.atomic_add(DH + offs_m[:, None] * stride_dhm + ks[None, :], dh,
                              mask=row_mask[:, None] & kmask[None, :], sem="relaxed")
            if COMPUTE_DW:
                h_tile = tl.load(H + hrows[:, None] * stride_hm + ks[None, :] * stride_hk,
                                 mask=row_mask[:, None] & kmask[None, :], other=0.0)
                dw = dot_acc(tl.trans(g_in), h_tile, tl.zeros((BLOCK_N, BLOCK_K), tl.float32),
                          UPCAST, PRECISION)
                tl.atomic_add(DW + (cols - v_begin)[:, None] * stride_dwv + ks[None, :],
                              dw.to(DW.dtype.element_ty),
                              mask=col_mask[:, None] & kmask[None, :], sem="relaxed")


def _or(t, default):
    return t if t is not None else default


def _launch_backward(hidden, weight, bias, rows, targets, lse, gcoef, *, dh, dw, db,
                     v_begin, v_end, softcap, label_smoothing, z_loss, filter_eps, g_out=None,
                     logit_mul=1.0, class_weight=None, row_coefs=None):
    """row_coefs: (pbase, ontgt) [M] float32 under class_weight ([V] float32), else None
    (`reference.class_weight_coefs`); gcoef already holds the factor logit_mul."""
    M = rows.numel()
    V, K = weight.shape
    cfg = pick_config(M, V, K, hidden.element_size(), backward=True)
    dummy = lse
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(v_end - v_begin, cfg.block_n))
    lce_backward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, rows, targets, lse, gcoef,
        _or(class_weight, dummy), *(row_coefs if row_coefs is not None else (dummy, dummy)),
        dh if dh is not None else dummy, dw if dw is not None else dummy,
        db if db is not None else dummy, g_out if g_out is not None else dummy,
        M, V, K, v_begin, v_end,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        dh.stride(0) if dh is not None else 0, dw.stride(0) if dw is not None else 0,
        g_out.stride(0) if g_out is not None else 0,
        float(softcap) if softcap is not None else 1.0, float(logit_mul),
        float(label_smoothing), float(z_loss),
        float(filter_eps) if filter_eps is not None else -1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_MUL=logit_mul != 1.0,
        HAS_CW=class_weight is not None,
        COMPUTE_DH=dh is not None, COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None,
        STORE_G=g_out is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=KERNELS_INTERPRETED, PRECISION=dot_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def loss_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 rows: torch.Tensor, targets: torch.Tensor, opts: LossOptions,
                 want_stats: bool) -> RowLosses:
    """Per-kept-row loss and lse (+ statistics) from the streaming forward kernel.

    hidden: [N, H]; weight: [V, H]; rows, targets: [M] int64. Nothing of size
    N x V is stored: the backward recomputes the logit tiles.
    """
    if KERNELS_INTERPRETED and opts.accum_dtype == torch.bfloat16:
        raise ValueError("accum_dtype=torch.bfloat16 needs bf16 atomics, which the Triton "
                         "interpreter lacks; use torch.float32 there")
    V = weight.shape[0]
    cap, mul = opts.logit_map()
    cw = class_weight_f32(opts)
    part = lse_partials(hidden, weight, bias, rows, targets, softcap=cap,
                        want_sumz=opts.label_smoothing > 0, want_entropy=want_stats,
                        want_argmax=want_stats, logit_mul=mul, class_weight=cw)
    st = combine_partials(part)
    loss = row_loss(st, targets, V, opts, cw)
    if want_stats:
        return RowLosses(loss, st.lse, st.target_logit - st.lse, st.entropy,
                         st.argmax == targets)
    none = st.lse.new_empty(0)
    # token_scaling: the ops take the token scale p = exp(target log-prob) from here
    logprob = st.target_logit - st.lse if opts.token_scaling else none.clone()
    return RowLosses(loss, st.lse, logprob, none.clone(),
                     torch.empty(0, dtype=torch.bool, device=hidden.device))


def loss_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  rows: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                  grad_loss: torch.Tensor, opts: LossOptions,
                  need: Tuple[bool, bool, bool]) -> Grads:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]); None where not needed.

    rows, targets, lse, grad_loss: [M]. Picks the fused or the dense mode
    (`backward_mode`).
    """
    if not any(need):
        return None, None, None
    cap, mul = opts.logit_map()
    cw = class_weight_f32(opts)
    kw = dict(softcap=cap, label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
              filter_eps=opts.filter_eps, logit_mul=mul, class_weight=cw,
              row_coefs=row_coefs(cw, targets, opts))
    gcoef = grad_loss.float().contiguous()
    if mul != 1.0:  # dz/dr's factor of the logit map (`prepare.kernel_logit_map`)
        gcoef = gcoef * mul
    args = (hidden, weight, bias, rows, targets, lse, gcoef, need, kw,
            opts.accum_dtype, opts.buffer_bytes)
    dense_fits = _dense_fixed_bytes(rows.numel(), hidden) <= opts.buffer_bytes // 2
    mode = backward_mode(opts.filter_eps, dense_fits)
    return _dense_backward(*args) if mode == "dense" else _fused_backward(*args)


def class_weight_f32(opts: LossOptions) -> Optional[torch.Tensor]:
    """The options' class weights as contiguous float32 [V], or None."""
    cw = opts.class_weight
    return None if cw is None else cw.detach().float().contiguous()


def row_coefs(cw: Optional[torch.Tensor], targets: torch.Tensor, opts: LossOptions):
    """(pbase, ontgt) [M] float32 of `reference.class_weight_coefs`, or None without
    class weights."""
    if cw is None:
        return None
    return tuple(c.contiguous() for c in class_weight_coefs(cw, targets, opts.label_smoothing,
                                                            cw.shape[0]))


def row_loss(st, targets: torch.Tensor, V: int, opts: LossOptions,
             cw: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-row loss [M] from the combined statistics (`reference.per_token_loss`)."""
    extra = () if cw is None else (cw[targets], cw.sum())
    return per_token_loss(st.lse, st.target_logit, st.sum_logits, V, opts.label_smoothing,
                          opts.z_loss, *extra)


def backward_mode(filter_eps: Optional[float], dense_fits: bool = True) -> str:
    """'fused' (atomics, tile skipping) when filtering, 'dense' (G chunks + GEMMs) when exact.

    Without filtering every tile contributes, and the dense mode hands the two
    backward GEMMs to the BLAS library instead of ~V/BLOCK_N atomic adds per
    grad_hidden element. When its buffers would not fit `buffer_bytes`, the
    exact backward runs in the fused mode with filtering off. Tests and
    benchmarks can force a mode via ``t3s_kernels.debug.OVERRIDES["backward"]``; the
    default is to be settled by GPU timings.
    """
    forced = OVERRIDES.get("backward")
    if forced is not None:
        if forced == "dense" and filter_eps is not None:
            raise ValueError("the dense backward is exact: it needs filter_eps=None")
        return forced
    return "dense" if filter_eps is None and dense_fits else "fused"


def _fused_backward(hidden, weight, bias, rows, targets, lse, gcoef, need, kw, accum_dtype,
                    buffer_bytes):
    need_h, need_w, need_b = need
    M = rows.numel()
    V, K = weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_h else None
    # grad_hidden is summed over the whole vocabulary in fp32. If the [M, H] fp32
    # accumulator fits the buffer budget, one pass does everything; otherwise a
    # first pass does grad_hidden in row chunks and a second pass (recomputing the
    # logits once more) does grad_weight / grad_bias.
    one_pass = need_h and M * K * 4 <= buffer_bytes // 2
    dh = torch.zeros(M, K, **f32) if one_pass else None
    if need_h and not one_pass and M > 0:
        step = max(1, buffer_bytes // (K * 4))
        buf = torch.empty(min(step, M), K, **f32)
        for r0 in range(0, M, step):
            r1 = min(r0 + step, M)
            acc = buf[: r1 - r0].zero_()
            coefs = kw["row_coefs"]
            _launch_backward(hidden, weight, bias, rows[r0:r1], targets[r0:r1],
                             lse[r0:r1], gcoef[r0:r1], dh=acc, dw=None, db=None,
                             v_begin=0, v_end=V, **{**kw, "row_coefs": None if coefs is None
                                                    else tuple(c[r0:r1] for c in coefs)})
            grad_h.index_copy_(0, rows[r0:r1], acc.to(hidden.dtype))
    db = torch.zeros(V, **f32) if need_b else None
    grad_w = None
    if need_w:
        grad_w = torch.zeros_like(weight) if accum_dtype == weight.dtype else empty_like(weight)
    if M > 0 and (need_w or need_b or one_pass):
        if not need_w or accum_dtype == weight.dtype:
            # One launch over the whole vocabulary; atomics go straight into grad_w.
            _launch_backward(hidden, weight, bias, rows, targets, lse, gcoef, dh=dh,
                             dw=grad_w, db=db, v_begin=0, v_end=V, **kw)
        else:
            # fp32 accumulation in bounded vocabulary chunks, each cast once when done.
            # The chunk takes what the grad_hidden accumulator leaves of the budget.
            block_n = pick_config(M, V, K).block_n
            budget = buffer_bytes - (dh.numel() * 4 if dh is not None else 0)
            chunk = max(block_n, (budget // (K * 4)) // block_n * block_n)
            buf = torch.empty(min(chunk, V), K, **f32)
            for v0 in range(0, V, chunk):
                v1 = min(v0 + chunk, V)
                acc = buf[: v1 - v0].zero_()
                _launch_backward(hidden, weight, bias, rows, targets, lse, gcoef, dh=dh,
                                 dw=acc, db=db, v_begin=v0, v_end=v1, **kw)
                grad_w[v0:v1] = acc
    elif need_w:
        grad_w.zero_()
    if one_pass:
        grad_h.index_copy_(0, rows, dh.to(hidden.dtype))
    grad_b = db.to(bias.dtype) if need_b else None
    return grad_h, grad_w, grad_b


def _dense_fixed_bytes(M: int, hidden: torch.Tensor) -> int:
    """Bytes the dense mode holds besides its G chunk: the fp32 [M, H] grad_hidden
    accumulator and the [M, H] copy of the kept rows (input dtype)."""
    return M * hidden.shape[1] * (4 + hidden.element_size())


def _dense_backward(hidden, weight, bias, rows, targets, lse, gcoef, need, kw, accum_dtype,
                    buffer_bytes):
    """Exact backward: the kernel writes G in [M, chunk] tiles (input dtype), and
    grad_hidden += G W_chunk, grad_weight[chunk] = G^T h_kept run as library GEMMs.

    Each vocabulary chunk of grad_weight is complete after one GEMM over all kept
    rows (fp32 accumulation inside the GEMM); grad_hidden sums chunk results in fp32.
    """
    need_h, need_w, need_b = need
    M = rows.numel()
    V, K = weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    db = torch.zeros(V, **f32) if need_b else None
    if M > 0:
        h_kept = hidden.index_select(0, rows) if need_w else None
        dh = torch.zeros(M, K, **f32) if need_h else None
        block_n = pick_config(M, V, K).block_n
        budget = buffer_bytes - _dense_fixed_bytes(M, hidden)
        chunk = max(block_n, (budget // (M * hidden.element_size())) // block_n * block_n)
        g_buf = torch.empty(M, min(chunk, V), dtype=hidden.dtype, device=hidden.device)
        for v0 in range(0, V, chunk):
            v1 = min(v0 + chunk, V)
            g = g_buf[:, : v1 - v0]
            _launch_backward(hidden, weight, bias, rows, targets, lse, gcoef, dh=None, dw=None,
                             db=db, v_begin=v0, v_end=v1, g_out=g, **{**kw, "filter_eps": None})
            if need_h:
                dh += (g @ weight[v0:v1]).float()
            if need_w:
                grad_w[v0:v1] = (g.T @ h_kept).to(weight.dtype)
        if need_h:
            grad_h.index_copy_(0, rows, dh.to(hidden.dtype))
    grad_b = db.to(bias.dtype) if need_b else None
    return grad_h, grad_w, grad_b
