"""Triton loss forward with the gradient in the same pass (reductions 'mean' and 'sum').

For a scalar reduction the weight of each token's loss in the output,
grad_scale_t = w_t / denominator, is known before the forward runs, so the
gradient needs no second pass over the logits. For bounded chunks of C kept rows:

1. the streaming forward kernel (`forward.lse_partials`) computes the logit tiles
   once, folds them into the row statistics (lse, target logit, ...) and also
   stores them: Z [C, V] float32;
2. `grad_tile_kernel` forms G = grad_scale_t * d loss_t / d r_tj from Z (input
   dtype, the operand of the two GEMMs; with token_scaling, grad_scale_t times the
   chunk's p_t = exp(target logit - lse) from step 1), flags the tiles whose every
   |d loss / d r| is below filter_eps (gradient filtering), and adds the column
   sums of G to grad_bias;
3. grad_hidden[chunk] = G W and grad_weight += Gᵀ h_chunk. Exact
   (filter_eps=None): two library GEMMs. Filtered: `grad_hidden_kernel` and
   `grad_weight_kernel` visit only the kept tiles (per-tile lists built on the
   device, no host sync). Each program owns its output tile and sums over the
   vocabulary (grad_hidden) or the chunk's rows (grad_weight) in registers,
   then writes it once: no atomics.

No logit GEMM is recomputed: the whole loss costs one logit GEMM plus the kept
tiles of two backward GEMMs.

Why Z is float32: G needs p = exp(z - lse). A bfloat16 logit of magnitude 20
carries an absolute rounding error up to 20 * 2**-9 = 0.04, i.e. a 4 % error
in p of the largest probabilities, about 20 times the rounding of the bf16
gradient itself. Z is written once and read once per chunk.

Memory (all temporaries within `buffer_bytes`): Z and G for the chunk
(C * V * (4 + element size) bytes), O(C * V / tile) tile lists, and, for a
low-precision weight with accum_dtype=float32, one float32 [V, H] grad_weight
accumulator. When that accumulator and one chunk do not fit, the one-pass plan
does not apply (`plan_forward_backward` returns None) and the caller runs the
forward and the deferred backward instead.

Legend: M kept rows, C rows per chunk, V vocab, K (= H) hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..debug import empty
from ..prepare import Grads, LossOptions, RowLosses
from .backward import class_weight_f32, row_coefs, row_loss
from .config import (KERNELS_INTERPRETED, TensorDescriptor, dot_precision, pick_config,
                     tma_problem)
from .forward import combine_partials, dot_acc, lse_partials


@triton.jit
def grad_tile_kernel(
    Z, LSE, TGT, SCALE, G, KEEP, DB, CW, PBASE, ONTGT,
    M, V, n_vtiles, stride_zm, stride_gm,
    softcap, label_smoothing, z_loss, filter_eps,
    HAS_SOFTCAP: tl.constexpr, HAS_CW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(Z + offs_m[:, None] * stride_zm + cols[None, :], mask=tile_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=0.0)
    tgt = tl.load(TGT + offs_m, mask=row_mask, other=-1)
    if HAS_CW:  # class weights: per-row coefficients, per-column smoothing (`reference`)
        pbase = tl.load(PBASE + offs_m, mask=row_mask, other=0.0)
        ontgt = tl.load(ONTGT + offs_m, mask=row_mask, other=0.0)
        cw = tl.load(CW + cols, mask=col_mask, other=0.0)
        p = tl.exp(z - lse[:, None]) * (pbase + 2.0 * z_loss * lse)[:, None]
        dz = p - tl.where(cols[None, :] == tgt[:, None], ontgt[:, None], 0.0)
        dz = dz - (label_smoothing / V) * cw[None, :]
    else:
        p = tl.exp(z - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
        dz = p - tl.where(cols[None, :] == tgt[:, None], 1.0 - label_smoothing, 0.0)
        dz = dz - label_smoothing / V
    # softcap: the z scale of the logit map, cap * mul (the loaded z holds the factor mul)
    if HAS_SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    dz = tl.where(tile_mask, dz, 0.0)
    # Gradient filtering (exact mode passes filter_eps < 0). NaN tiles are never skipped.
    tile_max = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
    keep = (tile_max >= filter_eps) | (tile_max != tile_max)
    tl.store(KEEP + pid_m * n_vtiles + pid_n, keep.to(tl.int8))
    if keep:
        g = dz * tl.load(SCALE + offs_m, mask=row_mask, other=0.0)[:, None]
        tl.store(G + offs_m[:, None] * stride_gm + cols[None, :], g.to(G.dtype.element_ty),
                 mask=tile_mask)
        if COMPUTE_DB:  # commutative adds into distinct columns: no ordering needed
            tl.atomic_add(DB + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")


@triton.jit
def grad_hidden_kernel(
    G, W, G_DESC, W_DESC, ROWS, TILES, COUNTS, DH,
    M, V, K, n_vtiles, stride_gm, stride_wv, stride_wk, stride_dhm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """grad_hidden[rows] = G W over the kept vocabulary tiles of each row block.

    USE_TMA: the G and W tiles come through tensor descriptors (zero padding past
    the chunk's rows, V and K)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    count = tl.load(COUNTS + pid_m)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for i in range(0, count):
        vt = tl.load(TILES + pid_m * n_vtiles + i)
        if USE_TMA:
            g = G_DESC.load([pid_m * BLOCK_M, vt * BLOCK_N])
            w = W_DESC.load([vt * BLOCK_N, pid_k * BLOCK_K])
        else:
            cols = vt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < V
            g = tl.load(G + offs_m[:, None] * stride_gm + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                        mask=col_mask[:, None] & kmask[None, :], other=0.0)
        acc = dot_acc(g, w, acc, UPCAST, PRECISION)
    hrows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
    tl.store(DH + hrows[:, None] * stride_dhm + ks[None, :], acc.to(DH.dtype.element_ty),
             mask=row_mask[:, None] & kmask[None, :])


@triton.jit
def grad_weight_kernel(
    G, G_DESC, H, ROWS, TILES, COUNTS, DW,
    M, V, K, n_mtiles, stride_gm, stride_hm, stride_hk, stride_dwv,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """grad_weight[tile] (+)= Gᵀ h over the kept row blocks of each vocabulary tile.

    USE_TMA: the G tiles come through a tensor descriptor; the h rows are gathered
    (the kept rows are not contiguous in hidden)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < V
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    count = tl.load(COUNTS + pid_n)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for i in range(0, count):
        mt = tl.load(TILES + pid_n * n_mtiles + i)
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < M
        if USE_TMA:
            g = G_DESC.load([mt * BLOCK_M, pid_n * BLOCK_N])
        else:
            g = tl.load(G + offs_m[:, None] * stride_gm + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        hrows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
        h = tl.load(H + hrows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)
        acc = dot_acc(tl.trans(g), h, acc, UPCAST, PRECISION)
    out = DW + cols[:, None] * stride_dwv + ks[None, :]
    out_mask = col_mask[:, None] & kmask[None, :]
    if ACCUMULATE:  # later chunks add to what the earlier ones wrote (one owner per tile)
        acc += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(DW.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class Plan:
    """How the one-pass loss + gradient runs: rows per chunk, and whether grad_weight
    is summed in a float32 [V, H] accumulator (else straight into grad_weight)."""

    chunk_rows: int
    fp32_weight_accumulator: bool


def plan_forward_backward(M: int, V: int, K: int, element_size: int, need_weight: bool,
                          accum_fp32: bool, buffer_bytes: int) -> Optional[Plan]:
    """The chunking that keeps every temporary within ``buffer_bytes``, or None when
    not even one row fits beside the grad_weight accumulator.

    element_size: bytes of an input element (G is stored in the input dtype).
    accum_fp32: grad_weight must be summed in float32 while the weight is not.
    """
    block_m = pick_config(M, V, K, element_size).block_m
    acc_bytes = V * K * 4 if (need_weight and accum_fp32) else 0
    per_row = V * (4 + element_size) + 64  # Z, G, and the row statistics
    rows = (buffer_bytes - acc_bytes) // per_row
    if rows < 1:
        return None
    rows = min(rows, max(M, 1))
    if rows > block_m:
        rows = rows // block_m * block_m  # whole row blocks: no ragged block mid-stream
    return Plan(chunk_rows=int(rows), fp32_weight_accumulator=acc_bytes > 0)


def _tile_lists(keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """keep [R, T] int8 -> (indices [R, T] int32 with each row's kept columns first,
    counts [R] int32). On the device, without a host sync."""
    order = torch.argsort(keep, dim=1, descending=True, stable=True).to(torch.int32)
    return order.contiguous(), keep.sum(1, dtype=torch.int32)


def _descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    """A tensor descriptor of the 2-D ``t`` (TMA on sm_90), or None where it does not
    apply (`config.tma_problem`)."""
    if tma_problem(t, dot_precision(t.dtype)) is not None:
        return None
    return TensorDescriptor(t, shape=list(t.shape), strides=[t.stride(0), 1],
                            block_shape=[block_rows, block_cols])


def _or(t, default):
    return t if t is not None else default


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output; on CUDA low-precision operands stay on the tensor
    cores (fp32 accumulation, no rounding of the product to the input dtype)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.device.type in ("cuda", "meta"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def loss_forward_backward(hidden: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], rows: torch.Tensor,
                          targets: torch.Tensor, grad_scale: torch.Tensor, opts: LossOptions,
                          want_stats: bool, need: Tuple[bool, bool, bool],
                          plan: Plan) -> Tuple[RowLosses, Grads]:
    """Loss of the M kept rows and the gradients of sum_m grad_scale[m] * loss[m]
    (under ``opts.token_scaling``, of sum_m grad_scale[m] * p[m] * loss[m] with the
    constant p = exp(target logit - lse) of the same chunk's forward).

    hidden: [N, H]; weight: [V, H]; bias: [V] or None; rows, targets: [M] int64;
    grad_scale: [M] float32. Returns (`RowLosses` of [M] tensors, (grad_hidden
    [N, H] with zeros on rows not kept, grad_weight [V, H], grad_bias [V]), None
    where ``need`` is False).
    """
    need_h, need_w, need_b = need
    M = rows.numel()
    V, K = weight.shape
    dev = hidden.device
    cfg = pick_config(M, V, K, hidden.element_size(), backward=True)
    bm, bn = pick_config(M, V, K, hidden.element_size()).block_m, cfg.block_n
    exact = opts.filter_eps is None
    loss = empty(M, dtype=torch.float32, device=dev)
    lse_all = empty(M, dtype=torch.float32, device=dev)
    n_stats = M if want_stats else 0
    want_logprob = want_stats or opts.token_scaling  # the ops' token scale is its exp
    logprob = empty(M if want_logprob else 0, dtype=torch.float32, device=dev)
    entropy = empty(n_stats, dtype=torch.float32, device=dev)
    correct = empty(n_stats, dtype=torch.bool, device=dev)
    # Contiguous gradients (the kernels write rows with a unit column stride), also for
    # a strided hidden; as the fake implementation of the op promises.
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
    grad_w = dw = None
    if need_w:
        # The tile kernels' first chunk writes every grad_weight tile (kept or not), so
        # only the library-GEMM path (+=) and an empty batch need zeros.
        alloc = torch.zeros if (exact or M == 0) else \
            (lambda *shape, dtype, device: empty(*shape, dtype=dtype, device=device))
        if plan.fp32_weight_accumulator:
            dw = alloc(V, K, dtype=torch.float32, device=dev)
            grad_w = empty(V, K, dtype=weight.dtype, device=dev)
        else:
            grad_w = dw = alloc(V, K, dtype=weight.dtype, device=dev)
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    C = plan.chunk_rows
    z_buf = torch.empty(min(C, M), V, dtype=torch.float32, device=dev)
    # Filtered tiles are never read, so G needs no initialisation in either mode.
    g_buf = torch.empty(min(C, M), V, dtype=hidden.dtype, device=dev)
    n_vtiles = triton.cdiv(V, bn)
    first_w_chunk = True
    cap, mul = opts.logit_map()
    cw = class_weight_f32(opts)
    coefs = row_coefs(cw, targets, opts)
    if mul != 1.0:  # dz/dr's factor of the logit map rides on the row coefficients
        grad_scale = grad_scale * mul
    for r0 in range(0, M, C):
        r1 = min(r0 + C, M)
        c = r1 - r0
        rows_c, tgt_c, scale_c = rows[r0:r1], targets[r0:r1], grad_scale[r0:r1]
        z, g = z_buf[:c], g_buf[:c]
        part = lse_partials(hidden, weight, bias, rows_c, tgt_c, softcap=cap,
                            want_sumz=opts.label_smoothing > 0, want_entropy=want_stats,
                            want_argmax=want_stats, logits_out=z, logit_mul=mul,
                            class_weight=cw)
        st = combine_partials(part)
        loss[r0:r1] = row_loss(st, tgt_c, V, opts, cw)
        lse_all[r0:r1] = st.lse
        if want_logprob:
            logprob[r0:r1] = st.target_logit - st.lse
        if want_stats:
            entropy[r0:r1] = st.entropy
            correct[r0:r1] = st.argmax == tgt_c
        if not any(need):
            continue
        if opts.token_scaling:  # the stop-gradient p_t of this chunk's rows, now known
            scale_c = scale_c * torch.exp(st.target_logit - st.lse)
        n_mtiles = triton.cdiv(c, bm)
        keep = torch.empty(n_mtiles, n_vtiles, dtype=torch.int8, device=dev)
        grad_tile_kernel[(n_mtiles, n_vtiles)](
            z, st.lse, tgt_c, scale_c, g, keep, db if db is not None else z,
            _or(cw, z), *((z, z) if coefs is None else (c_[r0:r1] for c_ in coefs)),
            c, V, n_vtiles, z.stride(0), g.stride(0),
            # z / (cap * mul) in softcap' (`prepare.kernel_logit_map`); cap itself at mul 1
            (cap if mul == 1.0 else cap * mul) if cap is not None else 1.0,
            float(opts.label_smoothing), float(opts.z_loss),
            -1.0 if exact else float(opts.filter_eps),
            HAS_SOFTCAP=cap is not None, HAS_CW=cw is not None, COMPUTE_DB=need_b, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=8, num_stages=1,  # elementwise; 8 warps keep a 128 x 128 tile in registers
        )
        if exact:
            if need_h:
                grad_h.index_copy_(0, rows_c, (g @ weight).to(hidden.dtype))
            if need_w:
                h_c = hidden.index_select(0, rows_c)
                if dw.dtype == torch.float32:
                    dw += _mm_fp32(g.T, h_c)
                else:
                    dw.addmm_(g.T, h_c)  # accum_dtype is the weight's: one rounding per chunk
            continue
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg.block_k,
                      UPCAST=KERNELS_INTERPRETED, PRECISION=dot_precision(hidden.dtype),
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        g_desc = _descriptor(g, bm, bn)
        if need_h:
            tiles, counts = _tile_lists(keep)
            w_desc = _descriptor(weight, bn, cfg.block_k) if g_desc is not None else None
            grad_hidden_kernel[(n_mtiles, triton.cdiv(K, cfg.block_k))](
                g, weight, _or(g_desc, g), _or(w_desc, weight), rows_c, tiles, counts, grad_h,
                c, V, K, n_vtiles, g.stride(0), weight.stride(0), weight.stride(1),
                grad_h.stride(0), USE_TMA=w_desc is not None, **common)
        if need_w:
            tiles_t, counts_t = _tile_lists(keep.T.contiguous())
            grad_weight_kernel[(n_vtiles, triton.cdiv(K, cfg.block_k))](
                g, _or(g_desc, g), hidden, rows_c, tiles_t, counts_t, dw,
                c, V, K, n_mtiles, g.stride(0), hidden.stride(0), hidden.stride(1),
                dw.stride(0), ACCUMULATE=not first_w_chunk, USE_TMA=g_desc is not None,
                **common)
            first_w_chunk = False
    if need_w and dw is not grad_w:
        grad_w.copy_(dw)
    grad_b = db.to(bias.dtype) if need_b else None
    if not want_stats:
        entropy = lse_all.new_empty(0)
        correct = torch.empty(0, dtype=torch.bool, device=dev)
    return RowLosses(loss, lse_all, logprob, entropy, correct), (grad_h, grad_w, grad_b)
