"""What the two demo builds share: `build_demo_base.py` (the AR base student) and
`build_demo_diffusion_base.py` (the diffusion student).

Both train a tiny model from `t3s.demo` on the training pool's sums of two-digit numbers
(`t3s.demo.task`), checked on held-out 2-, 3- and 4-term sums, with the same recipe:
AdamW (betas 0.9/0.98, weight decay 0.01), linear warmup for ``--warmup`` steps, then
cosine decay to 10% of ``--lr``, gradients clipped at norm 1, the loss printed every 100
steps and the held-out check every ``--eval-every`` steps. Each script supplies its loss
and its evaluation; this module has the command-line options they share, the data
streams, the loop, the common part of ``build_info.json`` and the save.

Build code, not library code: the demo itself only loads what these scripts wrote
(`t3s.demo.model.load_base`, `t3s.dllm.demo_model`).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t3s.demo import model as demo_model  # noqa: E402
from t3s.demo import task  # noqa: E402

SCHEDULE = "linear warmup, cosine to 0.1*lr"
OPTIMIZER = "AdamW(betas=(0.9, 0.98), weight_decay=0.01), grad clip 1.0"


def add_training_args(ap, *, out: str, steps: int) -> None:
    """--out (default ``out``), --seed, --steps (default ``steps``), --batch-size, --lr, --warmup."""
    ap.add_argument("--out", default=out, help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)


def add_eval_args(ap, *, eval_size: int, threads_help: Optional[str] = None) -> None:
    """--eval-every, --eval-size (default ``eval_size``), --threads."""
    ap.add_argument("--eval-every", type=int, default=500, help="held-out check every N steps (0: off)")
    ap.add_argument("--eval-size", type=int, default=eval_size, help="held-out problems per number of terms")
    ap.add_argument("--threads", type=int, default=None, help=threads_help)


def seed_and_threads(args) -> None:
    """torch threads (``--threads``, when given), then the seed of torch's generator."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def tokens(problem, style: str = "steps") -> Tuple[List[int], List[int]]:
    """(prompt, sequence): ``<bos> prompt`` and ``<bos> prompt answer <eos>`` as token ids."""
    prompt = [demo_model.BOS_ID] + demo_model.encode(problem.prompt)
    return prompt, prompt + demo_model.encode(problem.response(style)) + [demo_model.EOS_ID]


def heldout_sets(size: int, seed: int) -> Dict[str, list]:
    """``heldout2`` / ``heldout3`` / ``heldout4``: ``size`` held-out sums of 2, 3, 4 terms."""
    return {f"heldout{k}": task.make_problems(size, k, "held_out", seed=seed) for k in (2, 3, 4)}


def train_streams(terms: Iterable[int], seed: int) -> Dict[int, Iterator]:
    """One endless stream of training-pool problems per number of terms."""
    return {k: task.iter_problems(k, "train", seed=seed * 1000 + k) for k in terms}


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step <= warmup:
        return lr * step / max(1, warmup)
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def train(model, opt, args, loss_at: Callable[[int], torch.Tensor], evaluate: Callable[[], Any],
          show: Callable[[Any], None]) -> Tuple[Any, float, float]:
    """``args.steps`` optimizer steps of ``loss_at(step)``, then a final ``evaluate()``.

    Every step sets the learning rate (`lr_at`), backpropagates the loss and clips the
    gradients at norm 1; the mean loss is printed every 100 steps, and every
    ``args.eval_every`` steps (but the last) ``show(evaluate())`` prints a held-out
    check. Returns (the final evaluation, training seconds, evaluation seconds); the
    training seconds include the checks along the way.
    """
    t0, eval_s, running = time.perf_counter(), 0.0, []
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = loss_at(step)
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
            show(accs)
    train_s = time.perf_counter() - t0
    te = time.perf_counter()
    accs = evaluate()
    eval_s += time.perf_counter() - te
    return accs, train_s, eval_s


def build_info(args, *, parameters: int, sets: Dict[str, list], train_s: float, eval_s: float,
               **specific) -> Dict[str, Any]:
    """The settings, sizes, timings and versions of a build, plus the script's ``specific`` keys."""
    import transformers
    info = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup": args.warmup, "schedule": SCHEDULE, "optimizer": OPTIMIZER,
        "parameters": parameters,
        "heldout_sizes": {k: len(v) for k, v in sets.items()},
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    info.update(specific)
    return info


def save(model, tokenizer, out, info: Dict[str, Any], train_s: float, eval_s: float) -> Path:
    """Weights, config, tokenizer and ``build_info.json`` to ``out`` (`t3s.demo.model.save_base`)."""
    model.eval()
    path = demo_model.save_base(model, tokenizer, out, build_info=info)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB); training {train_s:.0f}s, evaluation {eval_s:.0f}s", flush=True)
    return path
