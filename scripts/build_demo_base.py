#!/usr/bin/env python
"""Build the demo's base student θ0 and write it to t3s/demo/assets/base/.

The base is `t3s.demo.model.build_model(seed)` (a ~0.86M-parameter Llama with
the demo's char-level tokenizer) trained on sums of two-digit numbers from the
training pool (`t3s.demo.task`; held-out problems are never drawn), half of
them with two terms and half with three, answered in the student's own
step-by-step style, ``23+45+12=`` -> ``23+45=68;68+12=80;\\boxed{80}``.
``--direct-fraction`` of them (default 0) are answered directly instead,
``\\boxed{80}``. The base never sees four-term sums, nor the teacher's
layout (``23 + 45 = 68`` one step per line), which the demo then distils.

Loss: `t3s.masked_ce` on the last hidden states and the tied lm_head weight,
over the answer tokens only (sum over tokens / number of tokens, each style in
its own forward pass so that short answers are not padded to long ones).
AdamW (betas 0.9/0.98, weight decay 0.01), linear warmup for ``--warmup``
steps, then cosine decay to 10% of ``--lr``; gradients clipped at norm 1.

Defaults (the shipped base): ``--seed 0 --steps 1200 --batch-size 128
--lr 1e-3 --direct-fraction 0``. The seed sets the initialisation, the problem
stream and the style draw; rebuilding with the same seed gives the same data
and, up to floating-point non-determinism of the CPU kernels, the same
weights.

At the end the script reports greedy accuracy (verified by `t3s.verify`'s
``"math"`` verifier on the boxed answer) on held-out 2-, 3- and 4-term sums
and the share of answers given in the step-by-step style, and writes them, the
settings and the wall time to ``build_info.json`` next to the weights.

    python scripts/build_demo_base.py                 # rebuild the shipped base
    python scripts/build_demo_base.py --out /tmp/base --steps 300   # a quick look
"""


from __future__ import annotations

import argparse
import math
import os
import random
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t3s  # noqa: E402
from t3s.data import IGNORE_INDEX  # noqa: E402
from t3s.demo import model as demo_model  # noqa: E402
from t3s.demo import task  # noqa: E402
from t3s.demo.evaluate import Evaluator  # noqa: E402


def encode_batch(problems, style: str = "steps"):
    """input_ids / attention_mask / labels [B, L] (right-padded, loss on the answer + EOS)."""
    seqs, prompt_lens = [], []
    for p in problems:
        prompt = [demo_model.BOS_ID] + demo_model.encode(p.prompt)
        seqs.append(prompt + demo_model.encode(p.response(style)) + [demo_model.EOS_ID])
        prompt_lens.append(len(prompt))
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), demo_model.PAD_ID, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        labels[i, n:len(s)] = ids[i, n:len(s)]
    return ids, att, labels


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step <= warmup:
        return lr * step / max(1, warmup)
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(demo_model.BASE_DIR), help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--direct-fraction", type=float, default=0.0,
                    help="share of training examples answered directly (the rest step by step)")
    ap.add_argument("--terms", default="2,3",
                    help="numbers of terms of the training sums, comma-separated (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=500, help="held-out check every N steps (0: off)")
    ap.add_argument("--eval-size", type=int, default=200, help="held-out problems per number of terms")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1:
        ap.error("--batch-size must be >= 2 and --steps >= 1")
    if not 0.0 <= args.direct_fraction <= 1.0:
        ap.error("--direct-fraction must be in [0, 1]")
    try:
        args.terms = sorted({int(k) for k in args.terms.split(",")})
    except ValueError:
        ap.error(f"--terms must be integers separated by commas, got {args.terms!r}")
    if not args.terms or min(args.terms) < 2:
        ap.error("--terms needs numbers of terms >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    tokenizer = demo_model.build_tokenizer()
    model = demo_model.build_model(args.seed)
    n_params = demo_model.count_parameters(model)
    print(f"model: {n_params:,} parameters; seed {args.seed}; {args.steps} steps of {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    sets = {f"heldout{k}": task.make_problems(args.eval_size, k, "held_out", seed=args.seed)
            for k in (2, 3, 4)}
    evaluator = Evaluator(tokenizer, sets, verifier="math")
    streams = {k: task.iter_problems(k, "train", seed=args.seed * 1000 + k) for k in args.terms}
    style_rng = random.Random(f"t3s-demo/base-style/{args.seed}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    eval_s = 0.0
    running = []
    for step in range(1, args.steps + 1):
        # an equal share of the batch for each number of terms (the first ones take the rest)
        probs = [next(streams[args.terms[i * len(args.terms) // args.batch_size]])
                 for i in range(args.batch_size)]
        styles = ["direct" if style_rng.random() < args.direct_fraction else "steps" for _ in probs]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        parts = []
        for style in ("direct", "steps"):
            group = [p for p, st in zip(probs, styles) if st == style]
            if group:
                parts.append(encode_batch(group, style))
        n_tok = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, _, labels in parts)
        loss = 0.0
        for ids, att, labels in parts:
            h = model.model(input_ids=ids, attention_mask=att).last_hidden_state
            loss = loss + t3s.masked_ce(h[:, :-1], model.lm_head.weight, labels[:, 1:], normalizer=n_tok)
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
            accs = evaluator(model)
            eval_s += time.perf_counter() - te
            print("  held-out: " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)
    train_s = time.perf_counter() - t0

    te = time.perf_counter()
    accs = evaluator(model)
    eval_s += time.perf_counter() - te
    print("final held-out accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)
    stepwise = {k: sum(";" in d["prediction"] for d in v) / len(v)
                for k, v in evaluator.last_details.items()}
    print("share of step-by-step answers: " + "  ".join(f"{k} {v:.3f}" for k, v in stepwise.items()))
    for d in evaluator.last_details["heldout4"][:3]:
        print(f"  e.g. {d['prompt']} -> {d['prediction']!r} (gold {d['answer']})")

    import transformers
    info = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup": args.warmup, "schedule": "linear warmup, cosine to 0.1*lr",
        "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), grad clip 1.0",
        "direct_fraction": args.direct_fraction,
        "terms": args.terms,
        "data": (f"sums of {'/'.join(map(str, args.terms))} two-digit numbers in equal shares "
                 "(training pool); "
                 f"{args.direct_fraction:.0%} direct answers, the rest step by step "
                 "(the student's style)"),
        "step_style_share": {k: round(v, 4) for k, v in stepwise.items()},
        "parameters": n_params,
        "heldout_accuracy": {k: round(v, 4) for k, v in accs.items()},
        "heldout_sizes": {k: len(v) for k, v in sets.items()},
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    model.eval()
    out = demo_model.save_base(model, tokenizer, args.out, build_info=info)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB); training {train_s:.0f}s, evaluation {eval_s:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
