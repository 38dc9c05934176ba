"""The harness of `compare.py`: inputs, the float64 reference, timing and the run loop.

Every case (N, H, V, mask fraction, input distribution) gets one set of inputs over a
weight shared by the cases of one (V, H) (`make_weight`, `make_inputs`) and, unless
--no-check, a float64 reference of the kept rows (`fp64_reference`). Then every
selected (task, impl), built by `compare_anchors.Builder`, runs in this process, one
after the other on the same tensors (`run_all` -> `run_one`): on CUDA a first call
(compilation, autotuning), `triton.testing.do_bench` (L2 flushed, at least --min-reps
runs) and one separate call for the extra peak memory; on CPU one warm-up call and
--cpu-reps wall-clock runs. Each row is checked against the reference and credited
with the useful FLOPs and bytes of `work()`; a failure (an out-of-memory error
included) becomes a row with its status and reason, and memory is freed between rows.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

# The Triton interpreter is chosen when @triton.jit runs, i.e. when t3s_kernels
# is imported: decide before any Triton code is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.compare_anchors import (  # noqa: E402
    ALL_IMPLS, IGNORE_INDEX, IMPLS_BY_TASK, TASKS, Builder)

MiB = 2**20

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

PRESETS = {
    # name: (N list, H, V list, mask fractions, input distributions)
    "full": ([8192, 32768], 4096, [151936, 128256], [0.0, 0.5, 0.8], ["random", "peaked"]),
    "quick": ([8192], 4096, [151936], [0.0, 0.5], ["peaked"]),
    "small": ([64], 64, [1000], [0.0, 0.5], ["random", "peaked"]),
}


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One input configuration; every implementation of every task runs on it."""

    N: int
    H: int
    V: int
    mask_frac: float
    dist: str


@dataclass
class Inputs:
    """hidden [N, H], weight [V, H] (input dtype), targets [N] int64 (-100 = masked),
    kept [M] int64 row indices, hidden_kept [M, H] (a copy, for gemm_kept)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    kept: torch.Tensor
    hidden_kept: torch.Tensor


def make_weight(V: int, H: int, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> torch.Tensor:
    """W [V, H] with rows ~ N(0, I / H), so that for h ~ N(0, I) every logit h.w ~ N(0, 1)."""
    w = torch.empty(V, H, dtype=dtype, device=device)
    step = max(1, (256 * MiB) // (H * 4))  # fp32 staging in bounded chunks
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        w[v0:v1] = (torch.randn(v1 - v0, H, device=device, generator=gen) * H ** -0.5).to(dtype)
    return w


def make_inputs(case: Case, weight: torch.Tensor, gen: torch.Generator) -> Inputs:
    """Hidden states and targets for `case` over a shared weight.

    "random": h ~ N(0, I); every logit is ~ N(0, 1) and the target is uniform,
        so the softmax is flat (the worst case for gradient filtering).
    "peaked": the target logit sits U(0, 16) above a N(0, 1) background, as on
        real SFT data. With g ~ N(0, I), u ~ U(0, 16) and w_y the target's weight
        row,

            h = g + u * w_y / |w_y|^2    =>    z_y = g.w_y + u  ~ N(0, 1) + U(0, 16)

        while any other logit z_j = g.w_j + u (w_y.w_j) / |w_y|^2 stays
        ~ N(0, 1 + u^2 / H), since w_y.w_j ~ N(0, 1/H): the extra term's std
        u / sqrt(H) is at most 0.25 at H = 4096 (at most 2 at H = 64).

    Masked tokens (a random round(mask_frac * N) of them) get target -100; their
    hidden rows are built like the others, from the original label.
    """
    N, H, V = case.N, case.H, case.V
    device, dtype = weight.device, weight.dtype
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    g = torch.randn(N, H, device=device, generator=gen)
    if case.dist == "peaked":
        u = torch.rand(N, device=device, generator=gen) * 16.0
        for s in range(0, N, 4096):  # fp32 w_y rows in bounded chunks
            wy = weight[labels[s:s + 4096]].float()
            g[s:s + 4096] += (u[s:s + 4096] / (wy * wy).sum(1))[:, None] * wy
    elif case.dist != "random":
        raise ValueError(f"unknown input distribution {case.dist!r}")
    hidden = g.to(dtype)
    del g
    targets = labels.clone()
    n_masked = int(round(case.mask_frac * N))
    if n_masked:
        targets[torch.randperm(N, device=device, generator=gen)[:n_masked]] = IGNORE_INDEX
    kept = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    return Inputs(hidden, weight, targets, kept, hidden[kept].contiguous())


# ----------------------------------------------------------------------------
# float64 reference, in row chunks
# ----------------------------------------------------------------------------

def fp64_reference(inp: Inputs, *, want_grads: bool, chunk_bytes: int) -> Dict[str, torch.Tensor]:
    """Exact statistics of the rounded inputs, in float64, over the kept rows only.

    Rows are processed in chunks whose [rows, V] float64 temporaries stay under
    `chunk_bytes`, so the N x V logits never exist. Returns logprob / entropy /
    argmax [M] and, when `want_grads`, the mean loss (a 0-d tensor),
    grad_hidden [N, H] (zeros at masked rows) and grad_weight [V, H], all float64.
    """
    w64 = inp.weight.double()
    V, H = w64.shape
    kept, yk = inp.kept, inp.targets[inp.kept]
    M = kept.numel()
    dev = w64.device
    out = {"logprob": torch.empty(M, dtype=torch.float64, device=dev),
           "entropy": torch.empty(M, dtype=torch.float64, device=dev),
           "argmax": torch.empty(M, dtype=torch.int64, device=dev)}
    if want_grads:
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        gh_kept = torch.empty(M, H, dtype=torch.float64, device=dev)
        gw = torch.zeros(V, H, dtype=torch.float64, device=dev)
    step = max(1, chunk_bytes // (V * 8 * 3))  # z, p and one product live at once
    for s in range(0, M, step):
        e = min(M, s + step)
        h64 = inp.hidden_kept[s:e].double()
        y = yk[s:e]
        z = h64 @ w64.T
        lse = torch.logsumexp(z, dim=1)
        zy = z.gather(1, y[:, None]).squeeze(1)
        out["logprob"][s:e] = zy - lse
        out["argmax"][s:e] = z.argmax(1)
        p = torch.exp(z - lse[:, None])
        out["entropy"][s:e] = lse - (p * z).sum(1)
        del z
        if want_grads:
            loss_sum += (lse - zy).sum()
            p[torch.arange(e - s, device=dev), y] -= 1.0
            p /= max(M, 1)  # 'mean' reduction over the kept tokens
            gh_kept[s:e] = p @ w64
            gw.addmm_(p.T, h64)
        del p
    if want_grads:
        out["loss"] = loss_sum / max(M, 1)
        gh = torch.zeros(inp.hidden.shape, dtype=torch.float64, device=dev)
        gh[kept] = gh_kept
        out["grad_hidden"] = gh
        out["grad_weight"] = gw
    return out


def max_abs_diff(a: torch.Tensor, ref: torch.Tensor, rows: int = 4096) -> float:
    """max |a - ref| computed in float64, `rows` rows at a time (bounded temporaries)."""
    if a.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs reference {tuple(ref.shape)}")
    if a.dim() == 0:
        return float((a.double() - ref).abs())
    worst = 0.0
    for s in range(0, a.shape[0], rows):
        d = (a[s:s + rows].double() - ref[s:s + rows]).abs().max()
        worst = max(worst, float(d)) if not torch.isnan(d) else float("nan")
        if math.isnan(worst):
            break
    return worst


def errors(task: str, out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor],
           kept: torch.Tensor) -> Dict[str, float]:
    """Per-output max abs errors of one call's outputs against the fp64 reference."""
    if task == "loss":
        return {"loss": max_abs_diff(out["loss"].reshape(()), ref["loss"]),
                "grad_hidden": max_abs_diff(out["grad_hidden"], ref["grad_hidden"]),
                "grad_weight": max_abs_diff(out["grad_weight"], ref["grad_weight"])}
    if task in ("logprob", "logprob_stats"):
        err = {"logprob": max_abs_diff(out["logprob"][kept], ref["logprob"])}
        if task == "logprob_stats":
            err["entropy"] = max_abs_diff(out["entropy"][kept], ref["entropy"])
            mism = (out["argmax"][kept] != ref["argmax"]).double().mean()
            err["argmax_mismatch_frac"] = float(mism) if kept.numel() else 0.0
        return err
    return {}


# ----------------------------------------------------------------------------
# Work formulas: useful FLOPs and compulsory bytes
# ----------------------------------------------------------------------------

def work(task: str, impl: str, N: int, M: int, H: int, V: int, elt: int) -> tuple:
    """(FLOPs, bytes) of the useful work; elt = bytes per input element.

    loss:           FLOPs = 6 M V H   (logits, grad_hidden = G W, grad_weight = G^T h;
                                       a backward recompute of the logits is not counted)
                    bytes = (M H + V H) elt  (read h, W)  + 8 N (targets)
                          + (N H + V H) elt  (write grad_hidden, grad_weight)
    logprob(_stats): FLOPs = 2 M V H; bytes = (M H + V H) elt + 8 N + out,
                    out = 4 N (log-probs) [+ 4 N entropy + 8 N argmax]
    floor:          FLOPs = 2 R V H;  bytes = (R H + V H) elt + R V elt,
                    R = N (gemm_all) or M (gemm_kept)
    """
    if task == "loss":
        return 6 * M * V * H, (M * H + V * H) * elt + 8 * N + (N * H + V * H) * elt
    if task in ("logprob", "logprob_stats"):
        out = 4 * N + (12 * N if task == "logprob_stats" else 0)
        return 2 * M * V * H, (M * H + V * H) * elt + 8 * N + out
    if task == "floor":
        R = N if impl == "gemm_all" else M
        return 2 * R * V * H, (R * H + V * H) * elt + R * V * elt
    raise ValueError(task)


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------

def output_bytes(out: Dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in out.values() if isinstance(v, torch.Tensor))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def call_measured(fn: Callable, device: torch.device):
    """One call; returns (outputs, peak_extra_mib), as compare.py's docstring defines it."""
    if device.type != "cuda":
        return fn(), None
    free_memory(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return out, (peak - base - output_bytes(out)) / MiB


def time_cuda(fn: Callable, warmup_ms: float, rep_ms: float, min_reps: int) -> List[float]:
    """[median, p20, p80] ms from triton.testing.do_bench, with at least ~min_reps timed runs."""
    fn()  # compile / autotune / first-touch, outside every estimate
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    return triton.testing.do_bench(fn, warmup=max(warmup_ms, est), rep=max(rep_ms, min_reps * est),
                                   quantiles=[0.5, 0.2, 0.8])


def time_cpu(fn: Callable, reps: int) -> List[float]:
    """[median, p20, p80] wall-clock ms of `reps` runs (the caller has warmed fn up)."""
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def q(p):
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]
    return [statistics.median(times), q(0.2), q(0.8)]


_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", RuntimeError),
                     getattr(torch.cuda, "OutOfMemoryError", RuntimeError)} - {RuntimeError})


def is_oom(e: BaseException) -> bool:
    """CUDA out-of-memory, whichever torch version raised it."""
    return isinstance(e, _OOM_ERRORS) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def make_row(task: str, impl: str, case: Case, **kw) -> dict:
    row = {"task": task, "impl": impl, "N": case.N, "H": case.H, "V": case.V,
           "mask_frac": case.mask_frac, "dist": case.dist, "ms": None, "peak_extra_mib": None,
           "max_err": None, "status": "ok", "reason": None}
    row.update(kw)
    return row


def _finite(x: Optional[float]) -> Optional[float]:
    return x if (x is None or math.isfinite(x)) else None


def run_one(task: str, impl: str, case: Case, inp: Inputs, ref: Optional[dict],
            builder: Builder, args, device: torch.device) -> dict:
    """Time, measure and check one (task, impl) on one case; never raises."""
    M = inp.kept.numel()
    fn = out = None
    try:
        fn = builder.build(task, impl, inp)
        if device.type == "cuda":
            q = time_cuda(fn, args.warmup_ms, args.rep_ms, args.min_reps)
            out, mib = call_measured(fn, device)
        else:
            out, mib = call_measured(fn, device)  # doubles as the warm-up call
            q = time_cpu(fn, args.cpu_reps)
        err = errors(task, out, ref, inp.kept) if ref is not None else {}
        float_errs = [v for k, v in err.items() if k != "argmax_mismatch_frac"]
        max_err = max(float_errs) if float_errs else None
        flops, nbytes = work(task, impl, case.N, M, case.H, case.V, inp.hidden.element_size())
        ms = q[0]
        reason = None
        if max_err is not None and not math.isfinite(max_err):
            reason = "non-finite values in the outputs (NaN/inf)"
        return make_row(task, impl, case, ms=ms, ms_p20=q[1], ms_p80=q[2],
                        peak_extra_mib=None if mib is None else round(mib, 3),
                        max_err=_finite(max_err),
                        err={k: _finite(v) for k, v in err.items()},
                        tflops=flops / (ms * 1e-3) / 1e12, gbps=nbytes / (ms * 1e-3) / 1e9,
                        kept=M, reason=reason)
    except Exception as e:  # noqa: BLE001 - one failing case must not end the run
        status = "oom" if is_oom(e) else "error"
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if status == "error" and args.verbose:
            traceback.print_exc()
        return make_row(task, impl, case, status=status, reason=msg[:500], kept=M)
    finally:
        del fn, out
        free_memory(device)


def plan(args) -> List[Case]:
    preset = "small" if args.small else ("quick" if args.quick else "full")
    Ns, H, Vs, masks, dists = PRESETS[preset]
    Ns = args.N or Ns
    H = args.H or H
    Vs = args.V or Vs
    masks = args.mask_frac if args.mask_frac is not None else masks
    dists = args.dist or dists
    return [Case(N, H, V, m, d) for V in Vs for N in Ns for d in dists for m in masks]


def selected(args) -> List[tuple]:
    tasks = args.task or list(TASKS)
    impls = args.impl or list(ALL_IMPLS)
    return [(t, i) for t in tasks for i in IMPLS_BY_TASK[t] if i in impls]


def fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def print_row(r: dict) -> None:
    if r["status"] != "ok":
        print(f"  {r['task']:<13} {r['impl']:<13} {r['status'].upper():>8}  {r['reason']}")
        return
    print(f"  {r['task']:<13} {r['impl']:<13} {fmt(r['ms'], '9.3f')} ms "
          f"{fmt(r['tflops'], '7.1f')} TFLOP/s {fmt(r['peak_extra_mib'], '9.1f')} MiB "
          f"err {fmt(r['max_err'], '.2e')}" + (f"  ({r['reason']})" if r["reason"] else ""))


def run_all(args, device: torch.device, dtype: torch.dtype, builder: Builder) -> List[dict]:
    """Every selected (task, impl) on every planned case; one row each."""
    cases = plan(args)
    todo = selected(args)
    rows: List[dict] = []
    gen = torch.Generator(device=device)
    weight = None
    weight_key = None
    for ci, case in enumerate(cases):
        print(f"\n[{ci + 1}/{len(cases)}] N={case.N} H={case.H} V={case.V} "
              f"mask={case.mask_frac} dist={case.dist}")
        gen.manual_seed(args.seed + ci)
        if weight_key != (case.V, case.H):
            weight = None
            free_memory(device)
            wgen = torch.Generator(device=device)
            wgen.manual_seed(args.seed + 10_000 + case.V)
            weight = make_weight(case.V, case.H, dtype, device, wgen)
            weight_key = (case.V, case.H)
        inp = make_inputs(case, weight, gen)
        ref = None
        if args.check:
            try:
                want_grads = any(t == "loss" for t, _ in todo)
                ref = fp64_reference(inp, want_grads=want_grads, chunk_bytes=args.ref_chunk_bytes)
            except Exception as e:  # noqa: BLE001
                print(f"  fp64 reference failed ({type(e).__name__}: {e}); errors not checked")
                ref = None
            free_memory(device)
        for task, impl in todo:
            reason = builder.skip_reason(task, impl, device, args.try_cpu)
            if reason is not None:
                r = make_row(task, impl, case, status="skipped", reason=reason,
                             kept=inp.kept.numel())
            else:
                r = run_one(task, impl, case, inp, ref, builder, args, device)
            r["dtype"] = str(dtype).replace("torch.", "")
            print_row(r)
            rows.append(r)
        del inp, ref
        free_memory(device)
    return rows

