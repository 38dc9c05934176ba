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
    python scripts/build_demo_base.py --size large --out /tmp/large  # the ~4x sibling
"""


from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo_build_common as common  # noqa: E402
import t3s  # noqa: E402
from t3s.data import IGNORE_INDEX  # noqa: E402
from t3s.demo import model as demo_model  # noqa: E402
from t3s.demo.evaluate import Evaluator  # noqa: E402


def encode_batch(problems, style: str = "steps"):
    """input_ids / attention_mask / labels [B, L] (right-padded, loss on the answer + EOS)."""
    seqs, prompt_lens = [], []
    for p in problems:
        prompt, seq = common.tokens(p, style)
        seqs.append(seq)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(ap, out=str(demo_model.BASE_DIR), steps=1200)
    ap.add_argument("--direct-fraction", type=float, default=0.0,
                    help="share of training examples answered directly (the rest step by step)")
    ap.add_argument("--size", choices=tuple(demo_model.SIZES), default="base",
                    help="the model's size (t3s.demo.model.SIZES): base, the shipped student, "
                         "or large, its ~4x sibling (default: %(default)s)")
    ap.add_argument("--terms", default="2,3",
                    help="numbers of terms of the training sums, comma-separated (default: %(default)s)")
    common.add_eval_args(ap, eval_size=200, threads_help="torch threads (default: torch's choice)")
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

    common.seed_and_threads(args)
    tokenizer = demo_model.build_tokenizer()
    model = demo_model.build_model(args.seed, **demo_model.SIZES[args.size])
    n_params = demo_model.count_parameters(model)
    print(f"model: {n_params:,} parameters; seed {args.seed}; {args.steps} steps of {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    sets = common.heldout_sets(args.eval_size, args.seed)
    evaluator = Evaluator(tokenizer, sets, verifier="math")
    streams = common.train_streams(args.terms, args.seed)
    style_rng = random.Random(f"t3s-demo/base-style/{args.seed}")

    opt = common.make_optimizer(model, args.lr)
    model.train()

    def loss_at(step):
        # an equal share of the batch for each number of terms (the first ones take the rest)
        probs = [next(streams[args.terms[i * len(args.terms) // args.batch_size]])
                 for i in range(args.batch_size)]
        styles = ["direct" if style_rng.random() < args.direct_fraction else "steps" for _ in probs]
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
        return loss

    def show(accs):
        print("  held-out: " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)

    accs, train_s, eval_s = common.train(model, opt, args, loss_at, lambda: evaluator(model), show)
    print("final held-out accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)
    stepwise = {k: sum(";" in d["prediction"] for d in v) / len(v)
                for k, v in evaluator.last_details.items()}
    print("share of step-by-step answers: " + "  ".join(f"{k} {v:.3f}" for k, v in stepwise.items()))
    for d in evaluator.last_details["heldout4"][:3]:
        print(f"  e.g. {d['prompt']} -> {d['prediction']!r} (gold {d['answer']})")

    info = common.build_info(
        args, parameters=n_params, sets=sets, train_s=train_s, eval_s=eval_s,
        direct_fraction=args.direct_fraction,
        terms=args.terms,
        size=args.size, config_overrides=demo_model.SIZES[args.size],
        data=(f"sums of {'/'.join(map(str, args.terms))} two-digit numbers in equal shares "
              "(training pool); "
              f"{args.direct_fraction:.0%} direct answers, the rest step by step "
              "(the student's style)"),
        step_style_share={k: round(v, 4) for k, v in stepwise.items()},
        heldout_accuracy={k: round(v, 4) for k, v in accs.items()},
    )
    common.save(model, tokenizer, args.out, info, train_s, eval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
