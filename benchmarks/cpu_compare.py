"""CPU comparison: the fused loss and the log-probs against torch eager, time and extra memory.

    python benchmarks/cpu_compare.py                       # N=4096 (50% masked), H=512, V=32000
    python benchmarks/cpu_compare.py --dtypes fp32 --reps 5 --results benchmarks/RESULTS.md

Each implementation runs in its own subprocess (so that its peak RSS is its own), on
the same inputs (seed 0), with a warm-up call first (the C++ build, allocator). Then:

- time: the fastest of ``--reps`` calls (min is the least disturbed by other processes),
  wall clock and CPU time of the process (all threads; the steadier of the two when other
  processes share the cores, though it also counts OpenMP threads spinning at barriers);
- extra peak memory: peak RSS during one call minus RSS before it (the kernel's high-water
  mark is reset through /proc/self/clear_refs), outputs (gradients) included. glibc's
  mmap threshold is pinned so that freed buffers go back to the system between calls.

Rows, task 'loss' (forward + backward of the mean loss over the kept tokens):

- torch eager: ``F.cross_entropy(F.linear(h, w).float(), labels)``, masked tokens as
  ignore_index (the N x V logits materialised), the baseline of every ratio;
- torch chunked: torch's own ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  when this torch has it;
- three GEMMs: ``h_kept @ W^T``, ``G @ W``, ``G^T @ h_kept`` on the kept rows, the
  arithmetic floor of any exact implementation (G a stand-in of the right shape);
- t3s torch: the reference backend through `linear_cross_entropy`;
- t3s cpp: the C++ backend through `linear_cross_entropy` (for 'mean' the op calls its
  one-pass `loss_forward_backward`; autograd then scales the saved gradients);
- t3s cpp one-pass: the C++ backend's `loss_forward_backward` (the gradient computed in
  the forward pass, three GEMMs), called on the compacted rows.

Task 'logprobs' (forward only, every token): torch eager ``log_softmax(...).gather(...)``
against `target_logprobs` on each backend (and the C++ one with entropy and argmax).
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
IMPLS = {
    "loss": ("torch_eager", "torch_chunked", "three_gemms", "t3s_torch", "t3s_cpp",
             "t3s_cpp_onepass"),
    "logprobs": ("torch_eager", "t3s_torch", "t3s_cpp", "t3s_cpp_stats"),
}


# ---------------------------------------------------------------------------------------
# One measurement (runs in a subprocess)
# ---------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(task: str, impl: str, args):
    """(the call to measure, the reset before each call, its scalar result) or
    (None, None, why it cannot run)."""
    import torch
    import torch.nn.functional as F

    import t3s_kernels
    from t3s_kernels.backends import get_backend
    from t3s_kernels.prepare import LossOptions, resolve_filter_eps

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=gen)
    keep = torch.rand(args.n, generator=gen) >= args.mask_frac
    masked_labels = torch.where(keep, labels, torch.full_like(labels, -100))
    out = {}

    def clear():  # called before each measured call: outputs count in its extra memory
        hidden.grad = weight.grad = None
        out.clear()

    if task == "logprobs":
        def run():
            with torch.no_grad():
                if impl == "torch_eager":
                    logits = F.linear(hidden, weight).float()
                    out["v"] = torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum()
                else:
                    backend = {"t3s_torch": "torch"}.get(impl, "cpp")
                    stats = impl == "t3s_cpp_stats"
                    r = t3s_kernels.target_logprobs(hidden, weight, labels, backend=backend,
                                                    return_entropy=stats, return_argmax=stats)
                    out["v"] = (r.logprobs if stats else r).sum()
        return run, clear, lambda: float(out["v"])

    if impl == "torch_eager":
        def run():
            loss = F.cross_entropy(F.linear(hidden, weight).float(), masked_labels)
            loss.backward()
            out["v"] = loss.detach()
    elif impl == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy"):
            return None, None, "this torch has no F.linear_cross_entropy"

        def run():
            loss = F.linear_cross_entropy(hidden, weight, masked_labels, ignore_index=-100,
                                          options=torch.nn.LinearCrossEntropyOptions())
            loss.backward()
            out["v"] = loss.detach()
    elif impl == "three_gemms":
        rows = torch.nonzero(keep).squeeze(1)

        def run():
            with torch.no_grad():
                h = hidden[rows]
                g = h @ weight.T  # the logits; reused as the stand-in for G
                grad_h = g @ weight
                grad_w = g.T @ h
                out["v"] = grad_h[0, 0] + grad_w[0, 0]
    elif impl in ("t3s_torch", "t3s_cpp"):
        backend = impl[4:]

        def run():
            loss = t3s_kernels.linear_cross_entropy(hidden, weight, labels, loss_mask=keep,
                                                    backend=backend)
            loss.backward()
            out["v"] = loss.detach()
    elif impl == "t3s_cpp_onepass":
        cpp = get_backend("cpp")
        if cpp.unavailable_reason() is not None:
            return None, None, cpp.unavailable_reason()
        rows = torch.nonzero(keep).squeeze(1)
        targets = labels[rows].contiguous()
        opts = LossOptions(filter_eps=resolve_filter_eps("auto", dtype))

        def run():
            with torch.no_grad():
                scale = torch.full((rows.numel(),), 1.0 / rows.numel())
                losses, grads = cpp.loss_forward_backward(hidden, weight, None, rows, targets,
                                                          scale, opts, False,
                                                          (True, True, False))
                out["v"] = (losses.loss * scale).sum()
                out["grads"] = grads
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
    times, cpu_times, peaks = [], [], []
    for _ in range(args.reps):
        clear()
        gc.collect()
        reset = _reset_peak()
        before = _rss_kib("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append((_rss_kib("VmHWM") - before) / 1024 if reset else float("nan"))
    return {"task": task, "impl": impl, "seconds": min(times), "cpu_seconds": min(cpu_times),
            "extra_mib": min(peaks), "value": value}


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

def run_in_subprocess(task: str, impl: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", task, impl, "--dtypes", args.dtype,
           "--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--mask-frac",
           str(args.mask_frac), "--reps", str(args.reps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"task": task, "impl": impl, "skipped": f"failed: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(rows, dtype: str) -> str:
    lines = [f"| task | implementation ({dtype}) | seconds | time / eager | CPU seconds | "
             "CPU time / eager | extra peak MiB | memory / eager | result |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["task"]: r for r in rows if r["impl"] == "torch_eager" and "seconds" in r}
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['task']} | {r['impl']} | - | - | - | - | - | - | {r['skipped']} |")
            continue
        b = base.get(r["task"])
        t_ratio = r["seconds"] / b["seconds"] if b else float("nan")
        c_ratio = r["cpu_seconds"] / b["cpu_seconds"] if b else float("nan")
        m_ratio = r["extra_mib"] / b["extra_mib"] if b and b["extra_mib"] else float("nan")
        lines.append(f"| {r['task']} | {r['impl']} | {r['seconds']:.3f} | {t_ratio:.2f} | "
                     f"{r['cpu_seconds']:.2f} | {c_ratio:.2f} | {r['extra_mib']:.0f} | "
                     f"{m_ratio:.2f} | {r['value']:.5g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens")
    p.add_argument("--h", type=int, default=512, help="hidden size")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--mask-frac", type=float, default=0.5, help="fraction of tokens dropped")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--tasks", default="loss,logprobs", help="comma-separated: loss, logprobs")
    p.add_argument("--reps", type=int, default=3, help="timed calls per implementation")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--results", help="append the tables to this markdown file")
    p.add_argument("--one", nargs=2, metavar=("TASK", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.dtype = args.dtypes
        print(json.dumps(measure(*args.one, args)))
        return 0
    import torch

    head = (f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}; "
            f"N={args.n} ({args.mask_frac:.0%} masked), H={args.h}, V={args.v}; min of "
            f"{args.reps} calls; load average before: {os.getloadavg()[0]:.1f}")
    print(head)
    tables = []
    for dtype in args.dtypes.split(","):
        args.dtype = dtype
        rows = []
        for task in args.tasks.split(","):
            for impl in IMPLS[task]:
                rows.append(run_in_subprocess(task, impl, args))
                r = rows[-1]
                print(f"  {dtype} {task} {impl}: "
                      + (f"{r['seconds']:.3f} s, {r['extra_mib']:.0f} MiB" if "seconds" in r
                         else r["skipped"]), flush=True)
        tables.append(table(rows, dtype))
        print(tables[-1])
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(f"\n## CPU: fused loss and log-probs ({time.strftime('%Y-%m-%d')})\n\n"
                    f"`python benchmarks/cpu_compare.py`. {head}.\n\n"
                    + "\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
