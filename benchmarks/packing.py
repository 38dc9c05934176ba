"""Padded against packed (padding-free) batches: padding fraction and tokens/s.

Two workloads, each timed for a training step (forward + backward of t3s's fused
masked loss on a `t3s.patch`-ed model, the pilot's and retrainings' pass) and for the
profiling pass (`t3s.profile`, forward only, the select stage's pass):

- ``demo``: the demo's base student (t3s/demo/assets/base, 0.8M parameters) on the
  demo's training traces (`t3s.demo.write_data`, the `style` task's sizes), in random
  batches of 64 (the demo's batch size);
- ``llama135m``: a Llama of SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV heads,
  MLP 1536, vocabulary 49152; ``--layers``, default 6 of its 30, random weights) on
  random token ids with lognormal lengths (median 300, clipped to 64..2048), in
  batches of 8.

Padded batches are right-padded to their longest example (`t3s.PaddedCollator`);
packed ones are one row (`t3s.PackedCollator`) whose attention comes from the restarting
``position_ids``. The padding fraction is padding / (rows x padded length). Run:

    OMP_NUM_THREADS=2 python -m benchmarks.packing --threads 2 [--attn sdpa] [--quick]

It prints one Markdown table (the rows of benchmarks/RESULTS.md). Only torch,
transformers and t3s are used; the demo data are generated, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

import t3s
from t3s.data import PackedCollator, PaddedCollator
from t3s.hf.packing import packing_support


def demo_workload(n_batches: int, batch: int, seed: int):
    """(model, examples, batches of examples) of the demo."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t3s.data import TraceDataset
    from t3s.demo.model import BASE_DIR
    from t3s.demo.runner import DATA_SIZES, write_data
    tok = AutoTokenizer.from_pretrained(str(BASE_DIR))
    with tempfile.TemporaryDirectory() as d:
        paths = write_data(d, **DATA_SIZES)
        ds = TraceDataset.from_jsonl(paths["train"], tok)
        examples = [ds[i] for i in range(len(ds))]
    model = AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype=torch.float32)
    return model, examples, _random_batches(len(examples), n_batches, batch, seed), tok.pad_token_id


def llama_workload(n_batches: int, batch: int, seed: int, layers: int):
    """(model, examples, batches) of the 135M-shaped Llama on lognormal lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(seed)
    n = n_batches * batch
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(300), 0.8, n))), 64, 2048).astype(int)
    examples = []
    for i, length in enumerate(lengths):
        ids = rng.integers(1, cfg.vocab_size, length)
        labels = ids.copy()
        labels[: length // 4] = -100   # a prompt
        examples.append({"example_id": i, "input_ids": ids.tolist(), "labels": labels.tolist()})
    batches = [list(range(b * batch, (b + 1) * batch)) for b in range(n_batches)]
    return model, examples, batches, 0


def _random_batches(n: int, n_batches: int, batch: int, seed: int) -> List[List[int]]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[b * batch:(b + 1) * batch].tolist() for b in range(n_batches)]


def padding_fraction(examples, batches) -> float:
    real = padded = 0
    for idx in batches:
        lens = [len(examples[i]["input_ids"]) for i in idx]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return 1 - real / padded


def time_training(model, examples, batches, pad_id: int, packed: bool, repeats: int) -> float:
    """Tokens/s (real tokens) of forward + backward over ``batches``, best of ``repeats``."""
    collate = PackedCollator() if packed else PaddedCollator(pad_id)
    inputs = []
    for idx in batches:
        b = collate([examples[i] for i in idx])
        b.pop("example_id")
        inputs.append(b)
    tokens = sum(len(examples[i]["input_ids"]) for idx in batches for i in idx)
    model.train()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in inputs:
            kw = dict(b)
            kw.setdefault("use_cache", False)
            model(**kw).loss.backward()
        best = min(best, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return tokens / best


def time_profile(model, examples, batch: int, packed: bool, repeats: int):
    """(tokens/s, padding fraction of its length-sorted batches) of `t3s.profile`."""
    tokens = sum(len(e["input_ids"]) for e in examples)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        t3s.profile(model, examples, batch_size=batch, packing=packed, progress=False,
                    verify=False)
        best = min(best, time.perf_counter() - t0)
    # profile's batches: longest first within windows of 64 batches, `batch` examples each
    lens = [len(e["input_ids"]) for e in examples]
    real = padded = 0
    for w in range(0, len(lens), 64 * batch):
        window = sorted(lens[w:w + 64 * batch], reverse=True)
        for b in range(0, len(window), batch):
            chunk = window[b:b + batch]
            real += sum(chunk)
            padded += chunk[0] * len(chunk)
    return tokens / best, 1 - real / padded


def run(name: str, model, examples, batches, pad_id: int, batch: int, repeats: int,
        attn: str) -> Dict[str, object]:
    model.config._attn_implementation = attn
    t3s.patch(model)
    ok, why = packing_support(model)
    assert ok, why
    subset = [examples[i] for idx in batches for i in idx]
    out = {"workload": name, "attn": attn, "examples": len(subset),
           "tokens": sum(len(e["input_ids"]) for e in subset),
           "train_padding": padding_fraction(examples, batches)}
    for packed in (False, True):
        key = "packed" if packed else "padded"
        out[f"train_{key}"] = time_training(model, examples, batches, pad_id, packed, repeats)
        with torch.no_grad():
            tps, pad = time_profile(model, subset, batch, packed, repeats)
        out[f"profile_{key}"] = tps
        out["profile_padding"] = pad
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--layers", type=int, default=6,
                    help="layers of the 135M-shaped Llama (SmolLM2-135M has 30; each costs the "
                         "same in both layouts, so fewer keep the ratio and the run short)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer batches (a smoke test)")
    ap.add_argument("--only", choices=("demo", "llama135m"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "demo"):
        model, ex, batches, pad = demo_workload(2 if args.quick else 4, 64, seed=0)
        rows.append(run("demo", model, ex, batches, pad, 64, args.repeats, args.attn))
    if args.only in (None, "llama135m"):
        model, ex, batches, pad = llama_workload(1 if args.quick else 2, 8, seed=0,
                                                 layers=args.layers)
        rows.append(run(f"llama135m ({args.layers} layers)", model, ex, batches, pad, 8,
                        args.repeats, args.attn))
    print("| workload | attention | examples / tokens | padding (train / profile) | train "
          "tok/s padded → packed | profile tok/s padded → packed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['attn']} | {r['examples']} / {r['tokens']} | "
              f"{100 * r['train_padding']:.0f}% / {100 * r['profile_padding']:.0f}% | "
              f"{r['train_padded']:.0f} → {r['train_packed']:.0f} "
              f"(×{r['train_packed'] / r['train_padded']:.2f}) | "
              f"{r['profile_padded']:.0f} → {r['profile_packed']:.0f} "
              f"(×{r['profile_packed'] / r['profile_padded']:.2f}) |")


if __name__ == "__main__":
    main()
