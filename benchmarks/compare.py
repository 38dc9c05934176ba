#!/usr/bin/env python
"""Benchmark t3s kernels against torch, torch.compile, Liger-Kernel, Cut Cross-Entropy and quack.

One process times every implementation on the same inputs and writes

    benchmarks/results/<date>_<device-slug>.json    every measured row
    benchmarks/RESULTS.md                           appended: ratios vs the anchors

and prints a target / measured / met table for its targets (benchmarks/NOTES.md §3).

Usage (GPU; see benchmarks/NOTES.md for carrying the competitor wheels):

    python benchmarks/compare.py --quick --wheels .whl      # sized for 5 min on an H100
    python benchmarks/compare.py --wheels .whl              # full grid
    python benchmarks/compare.py --small --out /tmp/bench   # tiny shapes, CPU is fine

Tasks and implementations (`--task`, `--impl` filter them):

    loss           forward + backward of mean CE over the kept tokens; outputs the
                   loss, grad_hidden [N, H] and grad_weight [V, H]
                   torch_eager, torch_compile, liger, liger_sm90, quack, cce, cce_exact,
                   trl, t3s, t3s_exact, t3s_1pass, t3s_1pass_exact
                   (trl: TRL's fused LM head, trl.kernels.ChunkedLogProbFunction, which
                   trl.SFTTrainer installs by default, on the labelled rows as TRL calls
                   it on CUDA. t3s / t3s_exact: the defaults, filtering on / off, grad_weight summed
                   in fp32; at large V x H that fp32 accumulator exceeds buffer_bytes, so
                   the gradient is deferred to the backward. t3s_1pass(_exact):
                   accum_dtype=bf16, which lets the gradient-in-forward path run within
                   buffer_bytes: one logit GEMM plus the kept backward tiles.
                   liger_sm90: Liger's CuTe DSL Hopper FLCE; quack: quack-kernels'
                   chunked_linear_cross_entropy; both need nvidia-cutlass-dsl.)
    logprob        per-token log p(target), no grad, output [N] float32
                   torch_eager, liger, cce, trl, t3s
    logprob_stats  log p(target), entropy and argmax per token, no grad
                   torch_eager, t3s
    floor          the GEMM that every implementation must do at least once
                   gemm_all (h @ W^T, all N rows), gemm_kept (the M kept rows)

Masked tokens carry ``ignore_index=-100`` in the targets given to every
implementation (t3s included), so all of them see the same tensors.

Measurements (per row):

    ms              median of `triton.testing.do_bench` (L2 flushed before each
                    run); ms_p20 / ms_p80 are the 20th / 80th percentiles. On CPU:
                    median of --cpu-reps wall-clock runs after one warm-up.
    peak_extra_mib  (torch.cuda.max_memory_allocated() during one call
                     - torch.cuda.memory_allocated() just before it
                     - bytes of the call's outputs) / 2**20.
                    Inputs (hidden, weight, targets) exist before the call and are
                    not counted; the outputs every implementation must return
                    (loss task: loss + grad_hidden + grad_weight via
                    torch.autograd.grad; logprob tasks: the [N] vectors; floor:
                    the logits) are subtracted. What is left is workspace: logits,
                    buffers, fp32 accumulators. For an implementation whose peak
                    comes before its outputs are allocated, this is a lower bound.
                    None on CPU.
    max_err         max abs error against a float64 reference computed from the
                    same (rounded) inputs in row chunks; `err` holds the parts
                    (loss, grad_hidden, grad_weight | logprob, entropy and the
                    fraction of kept rows whose argmax differs). Only kept rows
                    are compared. max_err is the max of the float parts.
    tflops, gbps    useful work / ms, from the formulas in `work()`: FLOPs of the
                    GEMMs on the kept rows (recomputation is not counted), bytes
                    that must cross DRAM at least once.

The parts, one module each: `compare_harness.py` (inputs, the float64 reference,
timing and memory, the run loop), `compare_anchors.py` (the implementations: the
optional peers, torch, t3s) and `compare_report.py` (targets, the console table, the
RESULTS.md section). This file parses the command line and composes them; their public
names can be imported from it as well.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time

import torch

# The Triton interpreter is chosen when @triton.jit runs, i.e. when t3s_kernels
# is imported: decide before any Triton code is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import t3s_kernels  # noqa: E402

from benchmarks.compare_anchors import (  # noqa: E402,F401  (re-exported)
    ALL_IMPLS, CUDA_ONLY, IGNORE_INDEX, IMPLS_BY_TASK, T3S_LOSS, TASKS, Builder, Competitors,
    install_wheels, load_competitors, torch_loss)
from benchmarks.compare_harness import (  # noqa: E402,F401  (re-exported)
    DTYPES, PRESETS, Case, Inputs, MiB, call_measured, errors, fmt, fp64_reference, free_memory,
    is_oom, make_inputs, make_row, make_weight, max_abs_diff, output_bytes, plan, print_row,
    run_all, run_one, selected, time_cpu, time_cuda, work)
from benchmarks.compare_report import (  # noqa: E402,F401  (re-exported)
    CUTE_ANCHORS, TARGET_EXACT, TARGET_LOSS, TARGETS, RowIndex, Target, device_name,
    group_metrics, print_targets, results_markdown, slug, unique_path)


def _csv(kind):
    def parse(s):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="N=8192, V=151936, mask 0 and 0.5, peaked inputs "
                           "(sized for 5 min on an H100)")
    size.add_argument("--small", action="store_true",
                      help="tiny shapes (N=64, H=64, V=1000); runs on CPU under TRITON_INTERPRET=1")
    p.add_argument("--wheels", metavar="DIR",
                   help="pip install --no-index --no-deps every *.whl in DIR into a temp dir "
                        "first (competitors for machines without internet)")
    p.add_argument("--out", metavar="DIR", default=os.path.join(HERE, "results"),
                   help="directory of the JSON results (default: benchmarks/results)")
    p.add_argument("--md", metavar="FILE",
                   help="Markdown file the ratio table is appended to (default: "
                        "benchmarks/RESULTS.md, or <out>/RESULTS.md when --out is given)")
    p.add_argument("--impl", type=_csv(str), help=f"comma list of {', '.join(ALL_IMPLS)}")
    p.add_argument("--task", type=_csv(str), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--N", type=_csv(int), help="comma list of token counts (overrides preset)")
    p.add_argument("--H", type=int, help="hidden size (overrides preset)")
    p.add_argument("--V", type=_csv(int), help="comma list of vocab sizes (overrides preset)")
    p.add_argument("--mask-frac", type=_csv(float), help="comma list of masked fractions")
    p.add_argument("--dist", type=_csv(str), help="comma list of random, peaked")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (CUDA)")
    p.add_argument("--min-reps", type=int, default=10,
                   help="stretch do_bench's repetition time to at least this many runs (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=2, help="timed runs per row on CPU")
    p.add_argument("--ref-chunk-bytes", type=int, default=None,
                   help="bound on the fp64 reference's [rows, V] temporaries "
                        "(default 1 GiB on CUDA, 64 MiB on CPU)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the fp64 reference (no max_err)")
    p.add_argument("--try-cpu", action="store_true",
                   help="on CPU, also run torch.compile, Liger and CCE (slow; checks the wrappers)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
    args = p.parse_args(argv)
    for name, allowed in (("impl", ALL_IMPLS), ("task", TASKS), ("dist", ("random", "peaked"))):
        bad = [x for x in (getattr(args, name) or []) if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if args.mask_frac is not None and any(not 0.0 <= m < 1.0 for m in args.mask_frac):
        p.error("--mask-frac values must be in [0, 1)")
    if args.md is None:
        default_out = os.path.join(HERE, "results")
        same = os.path.abspath(args.out) == os.path.abspath(default_out)
        args.md = os.path.join(HERE, "RESULTS.md") if same else os.path.join(args.out, "RESULTS.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.ref_chunk_bytes is None:
        args.ref_chunk_bytes = 2**30 if device.type == "cuda" else 64 * MiB
    if args.wheels:
        install_wheels(args.wheels)
    comps = load_competitors()
    for name, why in sorted(comps.reasons.items()):
        print(f"[competitors] {name}: skipped: {why}")
    for name, ver in sorted(comps.versions.items()):
        print(f"[competitors] {name} {ver}")

    from t3s_kernels.triton.config import KERNELS_INTERPRETED
    if device.type == "cuda":
        t3s_backend = "triton"
    elif "triton" in t3s_kernels.available_backends() and KERNELS_INTERPRETED:
        t3s_backend = "triton"  # the real kernels, under the CPU interpreter
    else:
        t3s_backend = "torch"
        print("[t3s] Triton interpreter off: t3s rows use the PyTorch reference backend")
    if device.type == "cuda":
        try:  # several (N, V) shapes each compile once; keep dynamo from giving up
            import torch._dynamo as dynamo
            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, 64)
        except Exception:  # noqa: BLE001 - only a tuning knob
            pass

    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
          f"t3s backend {t3s_backend}{' (interpreted)' if KERNELS_INTERPRETED else ''}")
    builder = Builder(comps, t3s_backend, compiled={})
    t0 = time.time()
    rows = run_all(args, device, dtype, builder)
    elapsed = time.time() - t0

    date = _dt.date.today().isoformat()
    meta = {
        "date": date, "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "dtype": args.dtype, "t3s_backend": t3s_backend,
        "interpreted": bool(KERNELS_INTERPRETED),
        "command": "python benchmarks/compare.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
    }
    groups = group_metrics(rows)
    os.makedirs(args.out, exist_ok=True)
    json_path = unique_path(args.out, f"{date}_{slug(name)}", ".json")
    doc = dict(meta)
    doc.update({
        "competitors": {"versions": comps.versions, "missing": comps.reasons},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "md")},
        "elapsed_s": round(elapsed, 1),
        "definitions": {
            "ms": "median of triton.testing.do_bench (CUDA) or of wall-clock runs (CPU)",
            "peak_extra_mib": "(max_memory_allocated during one call - memory_allocated before "
                              "it - bytes of the call's outputs) / 2**20; None on CPU",
            "max_err": "max abs error vs a float64 reference over kept rows (max of err's "
                       "float parts)",
            "tflops": "useful FLOPs / ms: loss 6*M*V*H, logprob(_stats) 2*M*V*H, "
                      "floor 2*R*V*H (R = N or M); M = kept tokens",
        },
        "rows": rows,
        "targets": groups,
    })
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {json_path} ({len(rows)} rows, {elapsed:.0f} s)")
    md = results_markdown(groups, meta, json_path)
    md_dir = os.path.dirname(os.path.abspath(args.md))
    os.makedirs(md_dir, exist_ok=True)
    new_file = not os.path.exists(args.md)
    with open(args.md, "a") as f:
        if new_file:
            f.write("# Benchmark results\n\nAppended by `benchmarks/compare.py`, one section per "
                    "run.\n\n")
        f.write("\n" + md)
    print(f"appended the ratio table to {args.md}")
    print_targets(groups, name, meta["interpreted"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
