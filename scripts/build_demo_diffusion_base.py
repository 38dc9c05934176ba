#!/usr/bin/env python
"""Build the demo's diffusion student θ0 and write it to t3s/demo/assets/diffusion_base/.

The model is `t3s.demo.dlm.build_dlm(seed)` (a ~0.70M-parameter bidirectional
masked LM with the AR demo's tokenizer and one extra mask id), trained with
the masked-diffusion SFT loss (`t3s.dllm.diffusion_sft_loss`: t ~ U(eps, 1)
per sequence, response tokens masked with probability t, 1/t weights
normalised as in LLaDA) on the AR base's data: sums of two-digit numbers from
the training pool, half with two terms and half with three, in the student's
compact style, ``23+45+12=`` -> ``23+45=68;68+12=80;\\boxed{80}``. Rows are
padded with EOS, which is part of the response (LLaDA's SFT), to a fixed
``--length``. It never sees four-term sums nor the teacher's layout.

AdamW (betas 0.9/0.98, weight decay 0.01), linear warmup, cosine decay to 10%
of ``--lr``, gradients clipped at norm 1. At the end it reports held-out accuracy
by iterative unmasking (block length `t3s.demo.dlm.DLM_BLOCK_LENGTH`, one
token per step) with the ``"math"`` verifier and writes it, the settings and
the wall time to ``build_info.json``.

Measured (seed 0, 2 CPU cores; one step costs ~0.34 s of CPU time, 0.2-0.4 s of wall
time): the shipped student is this script's default, 6000 steps (39 min of wall time on
2 cores shared with test runs). Held-out accuracy by iterative unmasking (100 sums each),
2- / 3-term sums, every 500 steps: 0.07 / 0.02, 0.06 / 0.09, 0.79 / 0.05, 0.99 / 0.05,
1.00 / 0.15, 1.00 / 0.43, 1.00 / 0.66, 1.00 / 0.99, 1.00 / 0.97, 1.00 / 0.95, 1.00 / 1.00,
final 1.00 / 0.98 (4-term sums, never trained on: 0.00). The 2-term sums come first; the
3-term ones, whose second step adds a number the model wrote itself, take the second half
of the schedule. Shorter schedules stop short: 3000 steps end at 0.96 / 0.29 and 1500 at
0.07 / 0.09 after 1000 steps. The AR base is at 0.985 after 500 steps of the same data.

    python scripts/build_demo_diffusion_base.py                  # rebuild the shipped model
    python scripts/build_demo_diffusion_base.py --out /tmp/d --steps 300
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t3s import dllm  # noqa: E402
from t3s.demo import dlm as demo_dlm  # noqa: E402
from t3s.demo import model as demo_model  # noqa: E402
from t3s.demo import task  # noqa: E402
from t3s.verify import get_verifier  # noqa: E402


def encode_batch(problems, length: int):
    """input_ids / response [B, length]: <bos> prompt answer <eos>, EOS-padded (response)."""
    ids = torch.full((len(problems), length), demo_model.EOS_ID, dtype=torch.long)
    resp = torch.zeros((len(problems), length), dtype=torch.bool)
    for i, p in enumerate(problems):
        prompt = [demo_model.BOS_ID] + demo_model.encode(p.prompt)
        seq = prompt + demo_model.encode(p.response("steps")) + [demo_model.EOS_ID]
        if len(seq) > length:
            raise ValueError(f"--length {length} is shorter than {p.prompt} ({len(seq)} tokens)")
        ids[i, :len(seq)] = torch.tensor(seq)
        resp[i, len(prompt):] = True
    return ids, resp


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step <= warmup:
        return lr * step / max(1, warmup)
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def accuracy(adapter, tok, problems, gen_length: int, verify) -> float:
    prompts = [list(tok(p.prompt)["input_ids"]) for p in problems]
    gens = dllm.diffusion_generate(adapter, prompts, gen_length=gen_length, steps=gen_length,
                                   block_length=demo_dlm.DLM_BLOCK_LENGTH,
                                   eos_token_id=demo_model.EOS_ID, batch_size=256)
    preds = [tok.decode(g, skip_special_tokens=True) for g in gens]
    return sum(bool(verify(p, prob.answer)) for p, prob in zip(preds, problems)) / len(problems), preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(demo_dlm.DLM_DIR), help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--length", type=int, default=48, help="tokens per training row (EOS-padded)")
    ap.add_argument("--eval-every", type=int, default=500, help="held-out check every N steps (0: off)")
    ap.add_argument("--eval-size", type=int, default=100, help="held-out problems per number of terms")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = demo_model.build_tokenizer()
    model = demo_dlm.build_dlm(args.seed).train()
    adapter = dllm.MaskedLMAdapter(model, mask_token_id=demo_dlm.MASK_ID)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; seed {args.seed}; {args.steps} steps of {args.batch_size}",
          flush=True)
    sets = {f"heldout{k}": task.make_problems(args.eval_size, k, "held_out", seed=args.seed)
            for k in (2, 3, 4)}
    gen_length = 32                                                    # 3-term answers are <= 32
    verify = get_verifier("math")
    streams = {k: task.iter_problems(k, "train", seed=args.seed * 1000 + k) for k in (2, 3)}
    half = args.batch_size // 2
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0, eval_s, running = time.perf_counter(), 0.0, []

    def evaluate():
        model.eval()
        out = {k: accuracy(adapter, tok, v, gen_length if k != "heldout4" else 48, verify)
               for k, v in sets.items()}
        model.train()
        return out

    for step in range(1, args.steps + 1):
        probs = [next(streams[2]) for _ in range(half)] + [next(streams[3]) for _ in range(args.batch_size - half)]
        ids, resp = encode_batch(probs, args.length)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = dllm.diffusion_sft_loss(adapter, ids, resp).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(float(loss.detach()))
        if step % 100 == 0:
            print(f"step {step:5d}  loss {sum(running) / len(running):.4f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            running = []
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            te = time.perf_counter()
            accs = evaluate()
            eval_s += time.perf_counter() - te
            print("  held-out: " + "  ".join(f"{k} {v[0]:.3f}" for k, v in accs.items())
                  + f"   e.g. {sets['heldout3'][0].prompt} -> {accs['heldout3'][1][0]!r}", flush=True)
    train_s = time.perf_counter() - t0
    te = time.perf_counter()
    accs = evaluate()
    eval_s += time.perf_counter() - te
    print("final held-out accuracy: " + "  ".join(f"{k} {v[0]:.3f}" for k, v in accs.items()), flush=True)
    for k in ("heldout2", "heldout3", "heldout4"):
        print(f"  e.g. {sets[k][0].prompt} -> {accs[k][1][0]!r} (gold {sets[k][0].answer})")

    import transformers
    info = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup": args.warmup, "length": args.length, "schedule": "linear warmup, cosine to 0.1*lr",
        "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), grad clip 1.0",
        "loss": "masked-diffusion SFT (t ~ U(1e-3, 1), 1/t weights, LLaDA normalisation), EOS padding",
        "data": "half 2-term and half 3-term sums of two-digit numbers (training pool), student style",
        "generation": {"block_length": demo_dlm.DLM_BLOCK_LENGTH, "steps": "one per position",
                       "gen_length": {"heldout2": gen_length, "heldout3": gen_length, "heldout4": 48}},
        "parameters": n_params,
        "heldout_accuracy": {k: round(v[0], 4) for k, v in accs.items()},
        "heldout_sizes": {k: len(v) for k, v in sets.items()},
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    model.eval()
    out = demo_model.save_base(model, tok, args.out, build_info=info)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB); training {train_s:.0f}s, evaluation {eval_s:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
