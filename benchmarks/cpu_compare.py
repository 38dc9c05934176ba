"""CPU comparison: t3s's fused loss and log-probs against every peer, time and memory.

    python benchmarks/cpu_compare.py                          # the anchor: N=4096 (50% masked), H=512, V=32000
    python benchmarks/cpu_compare.py --preset large --dtypes bf16   # N=8192, H=2048, V=128256
    python benchmarks/cpu_compare.py --results benchmarks/RESULTS.md
    python benchmarks/cpu_compare.py --n 64 --h 32 --v 512 --rounds 1 --reps 1   # smoke run
    python benchmarks/cpu_compare.py --sweep n=1024,4096,16384 --dtypes bf16   # scaling

Every implementation runs in its own subprocess, so that its peak RSS is its own, on
the same inputs (seed 0), with a warm-up call first (compilation, the C++ build, the
allocator). The implementations are interleaved: ``--rounds`` passes over the whole list,
each subprocess timing ``--reps`` calls. A figure is the best over rounds and calls (the
least disturbed by other processes on a shared machine):

- time: wall clock of one call;
- extra peak: peak RSS during one call minus RSS before it (the kernel's high-water mark is
  reset through /proc/self/clear_refs), outputs (gradients) included; glibc's mmap
  threshold is pinned so that freed buffers go back to the system between calls;
- peak RSS: the process's high-water mark during the call, inputs included.

Rows (``--impls`` picks a subset):

- ``torch_eager``: ``F.linear`` then ``F.cross_entropy`` / ``log_softmax`` on the
  materialised logits (float32), masked tokens as ignore_index;
- ``torch_linear_ce``: torch's ``F.linear_cross_entropy`` (chunked), where this torch has it;
- ``cce_compile``: Cut Cross-Entropy's ``linear_cross_entropy(..., impl="torch_compile")``
  (``pip install -e .[bench]``), which compacts the kept rows itself;
- ``trl_head``: TRL's fused LM head, ``trl.kernels.ChunkedLogProbFunction`` (what
  ``trl.SFTTrainer`` installs by default), given the kept rows only and no optional
  outputs (its leanest use; on CPU SFTTrainer itself scores every position);
- ``dense_gemms``: the bare products of an exact method through ``torch.mm`` on the kept
  rows: the logits ``h @ W^T`` (log-probs: on every row) and, for the loss, ``G @ W`` and
  ``G^T @ h`` (G a stand-in of the right shape). A reference, not a peer;
- ``t3s_gemms``: the same products inside t3s's C++ kernels (same blocking, packing and
  oneDNN micro-kernel, no elementwise work): t3s's GEMM share, for the breakdown;
- ``t3s``: `t3s_kernels.linear_cross_entropy` / `target_logprobs` with the automatic
  backend (what a user gets); ``t3s_stats``: log-probs with entropy and argmax too.

Every figure is reported as a ratio to the fastest / leanest *peer* of the same run
(torch_eager, torch_linear_ce, cce_compile, trl_head) and to the dense GEMMs.

``--temperature T`` and ``--class-weight`` (a drawn per-class weight [V], the loss task
only) run every row with that option, as far as each takes it: torch eager (and torch's
``F.linear_cross_entropy`` for class weights) on its logits, TRL's head with its own
temperature, t3s with ``temperature=`` / ``class_weight=``. A row that cannot take it is
skipped with the reason. ``python benchmarks/cpu_compare.py --impls torch_eager,t3s``
with and without them shows what the options cost.

``--sweep KEY=A,B,...`` (KEY: n, h, v or mask_frac; repeatable, the grid is their
product) measures how t3s grows instead: per point, t3s, its GEMM share and the dense
GEMMs (``--impls`` overrides), in one summary table per task and dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PRESETS = {"anchor": dict(n=4096, h=512, v=32000), "large": dict(n=8192, h=2048, v=128256)}
PEERS = ("torch_eager", "torch_linear_ce", "cce_compile", "trl_head")
IMPLS = {
    "loss": PEERS + ("dense_gemms", "t3s_gemms", "t3s"),
    "logprobs": PEERS + ("dense_gemms", "t3s_gemms", "t3s", "t3s_stats"),
}
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                     "avx_vnni", "amx_bf16", "amx_tile", "avx512_fp16")


# ---------------------------------------------------------------------------------------
# One measurement (runs in a subprocess)
# ---------------------------------------------------------------------------------------

def rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(args):
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=gen)
    keep = torch.rand(args.n, generator=gen) >= args.mask_frac
    class_weight = (0.5 + torch.rand(args.v, generator=gen)) if args.class_weight else None
    return hidden, weight, labels, keep, class_weight


def build(task: str, impl: str, args):
    """(the call to measure, the reset before each call, its scalar result) or
    (None, None, why it cannot run)."""
    import torch
    import torch.nn.functional as F

    import t3s_kernels

    torch.set_num_threads(args.threads)
    hidden, weight, labels, keep, class_weight = _inputs(args)
    temp = args.temperature
    if class_weight is not None and (task != "loss" or impl in ("cce_compile", "trl_head")):
        return None, None, "no per-class weights" + (" for log-probs" if task != "loss" else "")
    if temp != 1.0 and impl in ("torch_linear_ce", "cce_compile"):
        return None, None, "no temperature option"
    masked_labels = torch.where(keep, labels, torch.full_like(labels, -100))
    rows = torch.nonzero(keep).squeeze(1)
    out = {}
    logprobs = task == "logprobs"

    def clear():  # called before each measured call: outputs count in its extra memory
        hidden.grad = weight.grad = None
        out.clear()

    def measured(logprob_of, loss_of):
        """The call to time: log-probs without gradient (summed, NaN rows skipped), or
        the loss with its backward."""
        def run():
            if logprobs:
                with torch.no_grad():
                    out["v"] = logprob_of().float().nansum()
            else:
                loss = loss_of()
                loss.backward()
                out["v"] = loss.detach()
        return run

    if impl == "torch_eager":
        run = measured(
            lambda: torch.log_softmax(F.linear(hidden, weight).float() / temp, -1).gather(
                1, labels[:, None]),
            lambda: F.cross_entropy(F.linear(hidden, weight).float() / temp, masked_labels,
                                    weight=class_weight))
    elif impl == "torch_linear_ce":
        if not hasattr(F, "linear_cross_entropy"):
            return None, None, "this torch has no F.linear_cross_entropy"
        options = torch.nn.LinearCrossEntropyOptions()
        run = measured(
            lambda: -F.linear_cross_entropy(hidden, weight, labels, reduction="none",
                                            options=options),
            lambda: F.linear_cross_entropy(hidden, weight, masked_labels, ignore_index=-100,
                                           weight=class_weight, options=options))
    elif impl == "cce_compile":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError as exc:
            return None, None, f"cut-cross-entropy is not installed ({exc}; extra 'bench')"
        run = measured(
            lambda: -cce(hidden, weight, labels, impl="torch_compile", reduction="none"),
            lambda: cce(hidden, weight, masked_labels, impl="torch_compile"))
    elif impl == "trl_head":
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except ImportError as exc:
            return None, None, f"TRL's fused head is not importable ({exc})"

        def trl_logprobs(h, y):
            return ChunkedLogProbFunction.apply(h, weight, None, y, temp, chunk, None, 1.0, ())[0]
        run = measured(lambda: trl_logprobs(hidden, labels),
                       lambda: -trl_logprobs(hidden[rows], labels[rows]).sum()
                       / max(rows.numel(), 1))
    elif impl == "dense_gemms" and (temp != 1.0 or class_weight is not None):
        return None, None, "a reference of the products alone: no options"
    elif impl == "dense_gemms":
        def run():
            with torch.no_grad():
                h = hidden if logprobs else hidden[rows]
                g = h @ weight.T  # the logits; reused as the stand-in for G
                if logprobs:
                    out["v"] = g[0, 0].float()
                    return
                grad_h = g @ weight
                grad_w = g.T @ h
                out["v"] = (grad_h[0, 0] + grad_w[0, 0]).float()
    elif impl == "t3s_gemms":
        from t3s_kernels.backends import get_backend

        cpp = get_backend("cpp")
        if temp != 1.0 or class_weight is not None:
            return None, None, "the products alone: no options"
        if cpp.unavailable_reason() is not None:
            return None, None, cpp.unavailable_reason()
        all_rows = torch.arange(args.n)

        def run():
            out["v"] = torch.tensor(cpp.gemms_only(hidden, weight, all_rows if logprobs else rows,
                                                   backward=not logprobs, slab=not logprobs))
    elif impl in ("t3s", "t3s_stats"):
        def t3s_logprobs():
            if impl == "t3s":
                return t3s_kernels.target_logprobs(hidden, weight, labels, temperature=temp)
            return t3s_kernels.target_logprobs(hidden, weight, labels, return_entropy=True,
                                               return_argmax=True, temperature=temp).logprobs
        run = measured(
            t3s_logprobs,
            lambda: t3s_kernels.linear_cross_entropy(hidden, weight, labels, loss_mask=keep,
                                                     temperature=temp,
                                                     class_weight=class_weight))
    else:
        raise ValueError(impl)
    return run, clear, lambda: float(out["v"])


def measure(task: str, impl: str, args) -> dict:
    import gc

    run, clear, result = build(task, impl, args)
    if run is None:
        return {"task": task, "impl": impl, "skipped": result}
    run()  # warm-up: compilation, first-touch of the allocator
    value = result()
    times, extra, peaks = [], [], []
    for _ in range(args.reps):
        clear()
        gc.collect()
        reset = reset_peak()
        before = rss_kib("VmRSS")
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        peak = rss_kib("VmHWM")
        extra.append((peak - before) / 1024 if reset else float("nan"))
        peaks.append(peak / 2**20 if reset else float("nan"))
    return {"task": task, "impl": impl, "seconds": min(times), "extra_mib": min(extra),
            "peak_gib": min(peaks), "value": value}


# ---------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------

def run_in_subprocess(task: str, impl: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", task, impl, "--dtypes", args.dtype,
           "--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--mask-frac",
           str(args.mask_frac), "--reps", str(args.reps), "--threads", str(args.threads),
           "--temperature", str(args.temperature)] + (["--class-weight"] if args.class_weight
                                                       else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"task": task, "impl": impl, "skipped": f"failed: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_description() -> str:
    """The CPU model and the flags that matter for these kernels."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in INTERESTING_FLAGS if f in flags]
    return f"{model} ({os.cpu_count()} CPUs; flags: {' '.join(have) or 'none of interest'})"


def best(results):
    """Best figures over rounds of one (task, impl): min time, min memory."""
    done = [r for r in results if "seconds" in r]
    if not done:
        return results[-1]
    out = dict(done[0])
    for key in ("seconds", "extra_mib", "peak_gib"):
        out[key] = min(r[key] for r in done)
    return out


def table(rows, dtype: str, task: str) -> str:
    peers = [r for r in rows if r["impl"] in PEERS and "seconds" in r]
    fastest = min(peers, key=lambda r: r["seconds"]) if peers else None
    leanest = min(peers, key=lambda r: r["extra_mib"]) if peers else None
    dense = next((r for r in rows if r["impl"] == "dense_gemms" and "seconds" in r), None)
    head = (f"| {task} ({dtype}) | seconds | time / fastest peer | time / dense GEMMs | "
            "extra peak MiB | memory / leanest peer | peak RSS GiB | result |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "-"

    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['impl']} | - | - | - | - | - | - | {r['skipped']} |")
            continue
        lines.append(
            f"| {r['impl']} | {r['seconds']:.3f} | "
            f"{ratio(r['seconds'], fastest['seconds']) if fastest else '-'} | "
            f"{ratio(r['seconds'], dense['seconds']) if dense else '-'} | "
            f"{r['extra_mib']:.0f} | "
            f"{ratio(r['extra_mib'], leanest['extra_mib']) if leanest else '-'} | "
            f"{r['peak_gib']:.2f} | {r['value']:.6g} |")
    if fastest and leanest:
        lines.append("")
        lines.append(f"Fastest peer: {fastest['impl']} ({fastest['seconds']:.3f} s); "
                     f"leanest peer: {leanest['impl']} ({leanest['extra_mib']:.0f} MiB).")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="anchor",
                   help="shape preset (--n/--h/--v override it)")
    p.add_argument("--n", type=int, help="tokens")
    p.add_argument("--h", type=int, help="hidden size")
    p.add_argument("--v", type=int, help="vocabulary size")
    p.add_argument("--mask-frac", type=float, default=0.5, help="fraction of tokens dropped")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--tasks", default="loss,logprobs", help="comma-separated: loss, logprobs")
    p.add_argument("--impls", help="comma-separated subset of the rows (default: all)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide the logits by this in every row that takes it")
    p.add_argument("--class-weight", action="store_true",
                   help="per-class weights [V] in the loss rows that take them")
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over the rows")
    p.add_argument("--reps", type=int, default=2, help="timed calls per subprocess")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--results", help="append the tables to this markdown file")
    p.add_argument("--json", help="write every measurement to this JSON file")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=A,B,...",
                   help="scaling grid over n, h, v or mask_frac (repeatable)")
    p.add_argument("--one", nargs=2, metavar=("TASK", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.one:
        args.dtype = args.dtypes
        print(json.dumps(measure(*args.one, args)))
        return 0
    tasks = args.tasks.split(",")
    if args.sweep and args.impls is None:
        args.impls = "dense_gemms,t3s_gemms,t3s"
    wanted = None if args.impls is None else set(args.impls.split(","))
    for task in tasks:
        if task not in IMPLS:
            p.error(f"unknown task {task!r}; choose from {', '.join(IMPLS)}")
    for dtype in args.dtypes.split(","):
        if dtype not in DTYPES:
            p.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if min(args.n, args.h, args.v, args.rounds, args.reps, args.threads) < 1 or not (
            0.0 <= args.mask_frac < 1.0) or not args.temperature > 0:
        p.error("--n, --h, --v, --rounds, --reps and --threads must be >= 1, --mask-frac "
                "in [0, 1) and --temperature > 0")
    if wanted is not None and wanted - set(IMPLS["loss"] + IMPLS["logprobs"]):
        p.error(f"unknown rows: {', '.join(sorted(wanted - set(IMPLS['loss'] + IMPLS['logprobs'])))}")
    grid = sweep_grid(p, args.sweep)
    import torch

    shape = ("N=varied" if "n" in grid[0] else f"N={args.n}") + " " + (
        f"({args.mask_frac:.0%} masked for the loss)" if "mask_frac" not in grid[0] else
        "(masked fraction varied)")
    head = (f"CPU: {cpu_description()}; {args.threads} threads, torch {torch.__version__}; "
            f"{shape}, H={'varied' if 'h' in grid[0] else args.h}, "
            f"V={'varied' if 'v' in grid[0] else args.v}"
            + (f", temperature {args.temperature:g}" if args.temperature != 1.0 else "")
            + (", per-class weights" if args.class_weight else "")
            + f"; best of {args.rounds} interleaved "
            f"rounds x {args.reps} calls; load average before: {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    tables, records = [], []
    for dtype in args.dtypes.split(","):
        args.dtype = dtype
        for task in tasks:
            impls = [i for i in IMPLS[task] if wanted is None or i in wanted]
            points = []
            for point in grid:
                vars(args).update(point)
                rows = measure_interleaved(task, impls, args)
                records += [{**r, "dtype": dtype, **point} for r in rows]
                points.append((point, rows))
                if not args.sweep:
                    tables.append(table(rows, dtype, task))
                    print(tables[-1], flush=True)
            if args.sweep:
                tables.append(sweep_table(points, dtype, task))
                print(tables[-1], flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"head": head, "rows": records}, f, indent=1)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(f"\n## CPU: fused loss and log-probs {'scaling' if args.sweep else 'against the peers'} "
                    f"({time.strftime('%Y-%m-%d')})\n\n"
                    f"`python benchmarks/cpu_compare.py {' '.join(argv or sys.argv[1:])}`. "
                    f"{head}.\n\n" + "\n\n".join(tables) + "\n")
    return 0


def measure_interleaved(task: str, impls, args):
    """``args.rounds`` passes over the rows, one subprocess each; the best of each row."""
    runs = {impl: [] for impl in impls}
    for rnd in range(args.rounds):
        for impl in impls:
            r = run_in_subprocess(task, impl, args)
            runs[impl].append(r)
            print(f"  round {rnd + 1} {args.dtype} {task} N={args.n} H={args.h} V={args.v} "
                  f"masked={args.mask_frac} {impl}: "
                  + (f"{r['seconds']:.3f} s, {r['extra_mib']:.0f} MiB" if "seconds" in r
                     else r["skipped"]), flush=True)
    return [best(runs[impl]) for impl in impls]


SWEEP_KEYS = {"n": int, "h": int, "v": int, "mask_frac": float}


def sweep_grid(parser, sweeps):
    """[{key: value}] for every point of the product of the --sweep axes ([{}] without)."""
    grid = [{}]
    for spec in sweeps:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in SWEEP_KEYS or not values:
            parser.error(f"--sweep takes KEY=A,B,... with KEY in {', '.join(SWEEP_KEYS)}; "
                         f"got {spec!r}")
        try:
            vals = [SWEEP_KEYS[key](v) for v in values.split(",")]
        except ValueError:
            parser.error(f"--sweep {spec!r}: values must be {SWEEP_KEYS[key].__name__}s")
        grid = [{**g, key: v} for g in grid for v in vals]
    return grid


def sweep_table(points, dtype: str, task: str) -> str:
    """One line per grid point: t3s time and memory, its GEMM share, the dense GEMMs."""
    keys = list(points[0][0])
    lines = ["| " + " | ".join(keys) + f" | t3s s ({task}, {dtype}) | t3s GEMMs s | "
             "GEMM share | dense GEMMs s | t3s / dense | t3s extra MiB |",
             "|" + "---:|" * (len(keys) + 6)]
    for point, rows in points:
        by = {r["impl"]: r for r in rows if "seconds" in r}
        t3s, gem, dense = by.get("t3s"), by.get("t3s_gemms"), by.get("dense_gemms")

        def f(r, key="seconds", spec=".3f"):
            return format(r[key], spec) if r else "-"
        share = f"{gem['seconds'] / t3s['seconds']:.0%}" if t3s and gem else "-"
        ratio = f"{t3s['seconds'] / dense['seconds']:.2f}" if t3s and dense else "-"
        lines.append("| " + " | ".join(str(point[k]) for k in keys) + f" | {f(t3s)} | {f(gem)} "
                     f"| {share} | {f(dense)} | {ratio} | {f(t3s, 'extra_mib', '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
