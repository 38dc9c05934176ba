#!/usr/bin/env python
"""Build the demo's diffusion student θ0 and write it to t3s/demo/assets/diffusion_base/.

The model is `t3s.dllm.demo_model.build_dlm(seed)` (a ~0.70M-parameter bidirectional
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
by iterative unmasking (block length `t3s.dllm.demo_model.DLM_BLOCK_LENGTH`, one
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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo_build_common as common  # noqa: E402
from t3s import dllm  # noqa: E402
from t3s.dllm import demo_model as demo_dlm  # noqa: E402
from t3s.demo import model as demo_model  # noqa: E402
from t3s.verify import get_verifier  # noqa: E402


def encode_batch(problems, length: int):
    """input_ids / response [B, length]: <bos> prompt answer <eos>, EOS-padded (response)."""
    ids = torch.full((len(problems), length), demo_model.EOS_ID, dtype=torch.long)
    resp = torch.zeros((len(problems), length), dtype=torch.bool)
    for i, p in enumerate(problems):
        prompt, seq = common.tokens(p, "steps")
        if len(seq) > length:
            raise ValueError(f"--length {length} is shorter than {p.prompt} ({len(seq)} tokens)")
        ids[i, :len(seq)] = torch.tensor(seq)
        resp[i, len(prompt):] = True
    return ids, resp


def accuracy(adapter, tok, problems, gen_length: int, verify) -> float:
    prompts = [list(tok(p.prompt)["input_ids"]) for p in problems]
    gens = dllm.diffusion_generate(adapter, prompts, gen_length=gen_length, steps=gen_length,
                                   block_length=demo_dlm.DLM_BLOCK_LENGTH,
                                   eos_token_id=demo_model.EOS_ID, batch_size=256)
    preds = [tok.decode(g, skip_special_tokens=True) for g in gens]
    return sum(bool(verify(p, prob.answer)) for p, prob in zip(preds, problems)) / len(problems), preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(ap, out=str(demo_dlm.DLM_DIR), steps=6000)
    ap.add_argument("--length", type=int, default=48, help="tokens per training row (EOS-padded)")
    common.add_eval_args(ap, eval_size=100)
    args = ap.parse_args(argv)
    common.seed_and_threads(args)
    tok = demo_model.build_tokenizer()
    model = demo_dlm.build_dlm(args.seed).train()
    adapter = dllm.MaskedLMAdapter(model, mask_token_id=demo_dlm.MASK_ID)
    n_params = demo_model.count_parameters(model)
    print(f"model: {n_params:,} parameters; seed {args.seed}; {args.steps} steps of {args.batch_size}",
          flush=True)
    sets = common.heldout_sets(args.eval_size, args.seed)
    gen_length = 32                                                    # 3-term answers are <= 32
    verify = get_verifier("math")
    streams = common.train_streams((2, 3), args.seed)
    half = args.batch_size // 2
    opt = common.make_optimizer(model, args.lr)

    def evaluate():
        model.eval()
        out = {k: accuracy(adapter, tok, v, gen_length if k != "heldout4" else 48, verify)
               for k, v in sets.items()}
        model.train()
        return out

    def loss_at(step):
        probs = [next(streams[2]) for _ in range(half)] + [next(streams[3]) for _ in range(args.batch_size - half)]
        ids, resp = encode_batch(probs, args.length)
        return dllm.diffusion_sft_loss(adapter, ids, resp).loss

    def show(accs):
        print("  held-out: " + "  ".join(f"{k} {v[0]:.3f}" for k, v in accs.items())
              + f"   e.g. {sets['heldout3'][0].prompt} -> {accs['heldout3'][1][0]!r}", flush=True)

    accs, train_s, eval_s = common.train(model, opt, args, loss_at, evaluate, show)
    print("final held-out accuracy: " + "  ".join(f"{k} {v[0]:.3f}" for k, v in accs.items()), flush=True)
    for k in ("heldout2", "heldout3", "heldout4"):
        print(f"  e.g. {sets[k][0].prompt} -> {accs[k][1][0]!r} (gold {sets[k][0].answer})")

    info = common.build_info(
        args, parameters=n_params, sets=sets, train_s=train_s, eval_s=eval_s,
        length=args.length,
        loss="masked-diffusion SFT (t ~ U(1e-3, 1), 1/t weights, LLaDA normalisation), EOS padding",
        data="half 2-term and half 3-term sums of two-digit numbers (training pool), student style",
        generation={"block_length": demo_dlm.DLM_BLOCK_LENGTH, "steps": "one per position",
                    "gen_length": {"heldout2": gen_length, "heldout3": gen_length, "heldout4": 48}},
        heldout_accuracy={k: round(v[0], 4) for k, v in accs.items()},
    )
    common.save(model, tok, args.out, info, train_s, eval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
