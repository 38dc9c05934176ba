"""Run the fused masked cross-entropy on random data; print loss, time and memory.

    python examples/quickstart.py            # CPU anchor shape: N=4096 (50% masked), H=512, V=32000
    python examples/quickstart.py --n 8192 --h 4096 --v 151936 --dtype bf16   # on a GPU

Each implementation runs in its own subprocess so that peak memory (CUDA:
max_memory_allocated; CPU: peak RSS) belongs to it alone. "torch eager"
materialises the N x V logits; t3s never does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_one(args) -> dict:
    import torch
    import torch.nn.functional as F

    import t3s

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(device, dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=gen).to(device)
    loss_mask = (torch.rand(args.n, generator=gen) >= args.mask_frac).to(device)

    def step():
        hidden.grad = weight.grad = None
        if args.impl == "t3s":
            loss = t3s.masked_ce(hidden, weight, labels, loss_mask)
        else:
            logits = F.linear(hidden, weight).float()
            loss = F.cross_entropy(logits, torch.where(loss_mask, labels, -100))
        loss.backward()
        return loss

    step()  # warm-up (compilation, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        mem = f"{peak_mib:.0f} MiB extra peak GPU memory"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"
    ms = (time.perf_counter() - t0) / args.repeats * 1e3
    return {"impl": args.impl, "loss": float(loss), "ms": ms, "memory": mem,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens")
    p.add_argument("--h", type=int, default=512, help="hidden size")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--mask-frac", type=float, default=0.5, help="fraction of tokens dropped")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--impl", choices=["t3s", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    print(f"loss forward+backward, N={args.n} ({args.mask_frac:.0%} masked), H={args.h}, "
          f"V={args.v}, {args.dtype}")
    results = []
    for impl in ("t3s", "torch"):
        cmd = [sys.executable, __file__, "--impl", impl] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {impl}: failed\n{out.stderr[-2000:]}")
            sys.exit(1)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"  device: {results[0]['device']}")
    for r in results:
        name = "t3s.masked_ce" if r["impl"] == "t3s" else "torch eager (materialised logits)"
        print(f"  {name:36s} loss {r['loss']:.5f}   {r['ms']:8.1f} ms   {r['memory']}")
    diff = abs(results[0]["loss"] - results[1]["loss"])
    print(f"  |loss difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
