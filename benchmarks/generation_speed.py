"""Generation speed of the engines (`t3s.generation`): tokens/s of the Hugging Face engine
and of vLLM, on the same prompts, model and sampling settings.

    python benchmarks/generation_speed.py --model demo [--prompts 64] [--max-new-tokens 64]
    python benchmarks/generation_speed.py --model DIR   # any HF model directory

``--model demo`` is the demo's base student on held-out 3-term sums; a model directory gets
``What is a+b?`` prompts through its chat template (when it has one). Every engine runs
in a process of its own, interleaved with the others and repeated (``--repeats``); the
best of the repeats is reported. Tokens/s counts the generated tokens (eos included) of
one ``generate`` over all prompts, after a warm-up call; the engine's start-up time is
reported apart. Greedy by default; ``--temperature`` and ``--samples`` sample instead.
The last lines give vLLM's ratio over HF, measured in the same run on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from typing import List


def _prompts(model: str, n: int, tok) -> List[List[int]]:
    rng = random.Random(0)
    if model == "demo":
        from t3s.demo.task import make_problems
        return [tok(p.prompt)["input_ids"] for p in make_problems(n, 3, "held_out", seed=0)]
    out = []
    for _ in range(n):
        q = f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}?"
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids   # a BatchEncoding
        else:
            ids = tok(q)["input_ids"]
        out.append(list(ids))
    return out


def _worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from t3s.generation import HFEngine, SamplingParams, VLLMEngine
    path = args.model_dir
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(args.model, args.prompts, tok)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            samples=args.samples, seed=0)
    t0 = time.perf_counter()
    if args.worker == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        engine = HFEngine(model, tok, batch_size=args.batch_size)
    else:
        engine = VLLMEngine(path, path, dtype="float32", max_model_len=args.max_model_len)
    start = time.perf_counter() - t0
    engine.generate(prompts[:2], params)   # warm-up
    t0 = time.perf_counter()
    answers = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(a) for per in answers for a in per)
    print("RESULT " + json.dumps({"engine": args.worker, "startup_s": start, "seconds": seconds,
                                  "tokens": tokens, "tokens_per_s": tokens / seconds,
                                  "threads": torch.get_num_threads()}), flush=True)
    os._exit(0)   # vLLM's in-process engine holds threads that may delay a normal exit


def _run(engine: str, args, model_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", args.model,
           "--model-dir", model_dir, "--prompts", str(args.prompts), "--max-new-tokens",
           str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--temperature",
           str(args.temperature), "--samples", str(args.samples), "--max-model-len",
           str(args.max_model_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the {engine} worker failed (exit {out.returncode}):\n"
                       f"{out.stderr[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="'demo' or a Hugging Face model directory")
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, choices=("hf", "vllm"), help=argparse.SUPPRESS)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="the HF engine's batch")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.model == "demo":
        from t3s.demo.model import BASE_DIR
        model_dir = str(BASE_DIR)
        args.max_model_len = min(args.max_model_len, 256)
    else:
        model_dir = args.model
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    best: dict = {}
    for r in range(args.repeats):   # interleaved: hf, vllm, hf, vllm, ...
        for e in engines:
            res = _run(e, args, model_dir)
            print(f"repeat {r}: {e}: {res['tokens_per_s']:.1f} tokens/s ({res['tokens']} tokens "
                  f"in {res['seconds']:.2f} s; start-up {res['startup_s']:.1f} s)", flush=True)
            if e not in best or res["tokens_per_s"] > best[e]["tokens_per_s"]:
                best[e] = res
    import torch
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(f"device: {device}; model: {args.model}; {args.prompts} prompts, "
          f"{args.max_new_tokens} new tokens at most, temperature {args.temperature}, "
          f"samples {args.samples}; best of {args.repeats}")
    for e, res in best.items():
        print(f"  {e}: {res['tokens_per_s']:.1f} tokens/s, start-up {res['startup_s']:.1f} s")
    if "hf" in best and "vllm" in best:
        print(f"  vllm / hf: {best['vllm']['tokens_per_s'] / best['hf']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": device, "model": args.model, "best": best}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
