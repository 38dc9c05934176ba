"""Triton forward kernel: per-row log-sum-exp and friends over a linear head, streamed.

Used by the forward of both ops (the loss and `target_logprobs`), and by the
one-pass loss + gradient (`t3s_kernels.triton.forward_backward`).

For each kept row t and a slice of the vocabulary (a "split"), the kernel
computes logit tiles z = softcap(h_t W^T + b) block by block (fp32
accumulation) and folds them into running statistics, storing no logit
(except with ``STORE_Z``: the one-pass path writes its row chunk's logits to a
bounded buffer, to form the gradient from them):

    m      running max                 s    sum exp(z - m)
    tz     target logit (0 if the target is in another split)
    sz     sum of logits (label smoothing)
    ez     sum exp(z - m) * (z - m)    (entropy; shifted, so that it does not cancel)
    av/ai  max logit and its index     (argmax)

Splits are combined on the host side in O(N * splits) (`combine_partials`).
Keeping the per-split partials reachable is deliberate: a vocab-parallel head
combines the same partials across devices.

Legend: M kept rows, V vocab, K (= H) hidden size, S vocab splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..debug import empty
from ..reference import merge_partials
from .config import (KERNELS_INTERPRETED, TensorDescriptor, dot_precision, pick_config,
                     pick_splits, tma_problem)


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The Triton CPU interpreter multiplies bf16 bit patterns as integers;
    # upcasting first is exact (bf16 products fit in fp32) and only used there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice needed.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logit_tile(H, W, B, hrows, row_mask, cols, col_mask, K,
               stride_hm, stride_hk, stride_wv, stride_wk, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               W_DESC=None, v0=0, USE_TMA: tl.constexpr = False, logit_mul=1.0,
               HAS_MUL: tl.constexpr = False):
    """fp32 logits [BLOCK_M, BLOCK_N] for rows `hrows` of H and vocab `cols` of W.

    With USE_TMA the W tiles come through the tensor descriptor W_DESC (block
    [BLOCK_N, BLOCK_K], zero padding past V and K; TMA on sm_90), tile start v0.
    HAS_MUL: z = logit_mul * softcap(r), the logit scale and temperature folded into
    one multiply (`prepare.kernel_logit_map`); off, the default path is unchanged."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(H + hrows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)
        if USE_TMA:
            # columns past this split's end are loaded too; the caller masks them
            b = W_DESC.load([v0, k0]).T
        else:
            b = tl.load(W + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                        mask=col_mask[None, :] & kmask[:, None], other=0.0)
        acc = dot_acc(a, b, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    if HAS_MUL:
        acc = acc * logit_mul
    return acc


@triton.jit
def lse_partials_kernel(
    H, W, W_DESC, B, ROWS, TGT, CW,
    OUT_M, OUT_S, OUT_TZ, OUT_SZ, OUT_EZ, OUT_AV, OUT_AI, Z,
    M, V, K, vocab_per_split,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_zm,
    softcap, logit_mul,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_MUL: tl.constexpr,
    HAS_CW: tl.constexpr, HAS_TARGET: tl.constexpr,
    WANT_SUMZ: tl.constexpr, WANT_ENT: tl.constexpr, WANT_ARGMAX: tl.constexpr,
    STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    hrows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
    if HAS_TARGET:
        tgt = tl.load(TGT + offs_m, mask=row_mask, other=-1)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    tz = tl.zeros((BLOCK_M,), tl.float32)
    sz = tl.zeros((BLOCK_M,), tl.float32)
    ez = tl.zeros((BLOCK_M,), tl.float32)
    av = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    ai = tl.zeros((BLOCK_M,), tl.int64)

    v_start = pid_s * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < v_end
        z = logit_tile(H, W, B, hrows, row_mask, cols, col_mask, K,
                       stride_hm, stride_hk, stride_wv, stride_wk, softcap,
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
                       W_DESC, v0, USE_TMA, logit_mul, HAS_MUL)
        if STORE_Z:  # the gradient-in-forward path forms G from these stored logits
            tl.store(Z + offs_m[:, None] * stride_zm + cols[None, :], z,
                     mask=row_mask[:, None] & col_mask[None, :])
        z_valid = tl.where(col_mask[None, :], z, 0.0)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if HAS_TARGET:
            tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z_valid, 0.0), axis=1)
        if WANT_SUMZ:
            if HAS_CW:  # sum_j a_j z_j under class weights (label smoothing)
                cw = tl.load(CW + cols, mask=col_mask, other=0.0)
                sz += tl.sum(z_valid * cw[None, :], axis=1)
            else:
                sz += tl.sum(z_valid, axis=1)
        blk_max = tl.max(z, axis=1)
        if WANT_ARGMAX:
            blk_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int64) + v0
            better = blk_max > av  # strict: earlier blocks win ties, like torch.argmax
            ai = tl.where(better, blk_arg, ai)
            av = tl.where(better, blk_max, av)
        m_new = tl.maximum(m, blk_max)
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if WANT_ENT:
            # Re-shift the running sum to m_new: sum e^(z-m_new) (z-m_new) =
            # scale (ez + (m - m_new) s). Before the first block s = 0 and m = -inf, whose
            # product would be NaN: m_new stands in. Masked columns: p = 0, z_valid finite.
            shift = (tl.where(s > 0.0, m, m_new) - m_new) * s
            ez = (ez + shift) * scale + tl.sum(p * (z_valid - m_new[:, None]), axis=1)
        s = s * scale + tl.sum(p, axis=1)
        m = m_new

    out = pid_s * M + offs_m
    tl.store(OUT_M + out, m, mask=row_mask)
    tl.store(OUT_S + out, s, mask=row_mask)
    if HAS_TARGET:
        tl.store(OUT_TZ + out, tz, mask=row_mask)
    if WANT_SUMZ:
        tl.store(OUT_SZ + out, sz, mask=row_mask)
    if WANT_ENT:
        tl.store(OUT_EZ + out, ez, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(OUT_AV + out, av, mask=row_mask)
        tl.store(OUT_AI + out, ai, mask=row_mask)


@dataclass
class Partials:
    """Per-split row statistics, each [S, M] float32 (ai: int64)."""

    m: torch.Tensor
    s: torch.Tensor
    tz: Optional[torch.Tensor]
    sz: Optional[torch.Tensor]
    ez: Optional[torch.Tensor]
    av: Optional[torch.Tensor]
    ai: Optional[torch.Tensor]


def lse_partials(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 rows: torch.Tensor, targets: Optional[torch.Tensor], *,
                 softcap: Optional[float], want_sumz: bool = False, want_entropy: bool = False,
                 want_argmax: bool = False,
                 logits_out: Optional[torch.Tensor] = None, logit_mul: float = 1.0,
                 class_weight: Optional[torch.Tensor] = None) -> Partials:
    """Launch the streaming kernel over rows `rows` of hidden [N, K]; weight [V, K].

    rows: [M] int64 row indices, targets: [M] int64 or None. O(S * M) output.
    logits_out: optional [M, V] float32 (unit column stride) that receives the logits
    z (after bias and softcap) of the M rows as they stream past. softcap, logit_mul:
    the kernel's logit map z = logit_mul * softcap(r) (`prepare.kernel_logit_map`).
    class_weight: [V] float32 or None; sz is then sum_j a_j z_j.
    """
    M = rows.numel()
    V, K = weight.shape
    cfg = pick_config(M, V, K, hidden.element_size())
    S = pick_splits(M, V, cfg, hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(V, S), cfg.block_n) * cfg.block_n
    S = triton.cdiv(V, vocab_per_split)  # every split holds at least one column
    f32 = dict(dtype=torch.float32, device=hidden.device)
    out_m = empty(S, M, **f32)
    out_s = empty(S, M, **f32)
    out_tz = empty(S, M, **f32) if targets is not None else None
    out_sz = empty(S, M, **f32) if want_sumz else None
    out_ez = empty(S, M, **f32) if want_entropy else None
    out_av = empty(S, M, **f32) if want_argmax else None
    out_ai = empty(S, M, dtype=torch.int64, device=hidden.device) if want_argmax else None
    if M > 0:
        dummy = out_m  # stands in for absent optional pointers; never dereferenced
        grid = (triton.cdiv(M, cfg.block_m), S)
        w_desc = weight_descriptor(weight, cfg.block_n, cfg.block_k)
        lse_partials_kernel[grid](
            hidden, weight, w_desc if w_desc is not None else weight,
            bias if bias is not None else dummy, rows,
            targets if targets is not None else rows, _or(class_weight, dummy),
            out_m, out_s, _or(out_tz, dummy), _or(out_sz, dummy), _or(out_ez, dummy),
            _or(out_av, dummy), _or(out_ai, dummy), _or(logits_out, dummy),
            M, V, K, vocab_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            logits_out.stride(0) if logits_out is not None else 0,
            float(softcap) if softcap is not None else 1.0, float(logit_mul),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_MUL=logit_mul != 1.0, HAS_CW=class_weight is not None and want_sumz,
            HAS_TARGET=targets is not None, WANT_SUMZ=want_sumz, WANT_ENT=want_entropy,
            WANT_ARGMAX=want_argmax, STORE_Z=logits_out is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            UPCAST=KERNELS_INTERPRETED, PRECISION=dot_precision(hidden.dtype),
            USE_TMA=w_desc is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return Partials(out_m, out_s, out_tz, out_sz, out_ez, out_av, out_ai)


def weight_descriptor(weight: torch.Tensor, block_n: int, block_k: int):
    """A host tensor descriptor of weight [V, K] with block [block_n, block_k], or None
    where TMA does not apply (`config.tma_problem` says why)."""
    if tma_problem(weight, dot_precision(weight.dtype)) is not None:
        return None
    return TensorDescriptor(weight, shape=list(weight.shape), strides=[weight.stride(0), 1],
                            block_shape=[block_n, block_k])


def _or(t, default):
    return t if t is not None else default


@dataclass
class RowStats:
    """Combined per-row statistics, each [M] float32 (argmax: int64)."""

    lse: torch.Tensor
    target_logit: Optional[torch.Tensor]
    sum_logits: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    argmax: Optional[torch.Tensor]


def combine_partials(p: Partials) -> RowStats:
    """Merge the S vocab splits (`t3s_kernels.reference.merge_partials`)."""
    return RowStats(*merge_partials(p.m, p.s, p.tz, p.sz, p.ez, p.av, p.ai))
