"""CPU: a plain `trl.SFTTrainer` on a `t3s.patch`-ed model against the same trainer unpatched.

    python benchmarks/trl_sft.py                                   # SmolLM-135M's shape, fp32
    python benchmarks/trl_sft.py --dtype bf16 --results benchmarks/RESULTS.md
    python benchmarks/trl_sft.py --layers 1 --vocab 1024 --steps 1 --rounds 1 --batch 2 \\
        --max-length 64 --prompt-len 8,24 --completion-len 8,40        # smoke run

The only difference between the two rows is one line, ``t3s.patch(model)`` before the
trainer is built: `trl.SFTTrainer` installs its own fused LM head and calls
``model(..., labels=..., fused_lm_head=True)``; on a patched model that call runs on
t3s's kernels (`t3s.hf.trl_head`), unpatched it runs on TRL's chunked head (which on a
CPU scores every position, padding included).

The model: SmolLM-135M's shape built from a config, nothing downloaded
(``LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
tie_word_embeddings=True)``), random init (seed 0), float32, or entirely bfloat16 with
``--dtype bf16``; ``--layers`` / ``--vocab`` shrink it for a smoke run. The data:
synthetic tokenized prompt / completion examples (seed 0; prompt and completion lengths
uniform in ``--prompt-len`` and ``--completion-len``, default 32-128 and 64-384 tokens),
given as a `datasets.Dataset` of ``input_ids`` and ``completion_mask``, from which TRL
builds the labels (-100 on the prompt; ``completion_only_loss=True``). Both rows train
on the same weights and the same batches in the same order.

The trainer is TRL's defaults but for: ``per_device_train_batch_size`` (``--batch``),
``max_length``, ``use_cpu=True``, ``bf16=False`` (TRL's default ``bf16=True`` would run
the fp32 model under bf16 autocast; ``--dtype bf16`` casts the model instead),
``report_to=[]``, ``save_strategy="no"``, ``disable_tqdm=True``, no logging before the
end, ``include_num_input_tokens_seen="non_padding"`` (for tokens/s), ``max_steps`` =
``--warmup`` + ``--steps``. So the optimizer is TRL's default, ``adamw_torch_fused``
(``--optim sgd`` for one without state), and TRL's default activation (gradient)
checkpointing is on: the header says both.

House style (as `cpu_compare.py`): every row runs in its own subprocess, so that its
peak RSS is its own, interleaved over ``--rounds`` rounds (patched, unpatched, patched,
...); the first ``--warmup`` optimizer steps are not measured (the C++ extension's load
or build, the optimizer state, the allocator); a figure is the best over rounds (the
least disturbed by other processes on a shared machine):

- steps/s, tokens/s: the measured steps over their summed wall clock, each step timed
  from ``on_step_begin`` to ``on_step_end`` of a `transformers.TrainerCallback`
  (forward, backward, clipping, optimizer step; not the collation); tokens are non-pad
  input tokens;
- extra peak MiB: the peak RSS over the measured steps (high-water mark reset through
  /proc/self/clear_refs when they start) minus the RSS before ``trainer.train()``;
  optimizer state and gradients included; glibc's mmap threshold is pinned so that freed
  buffers go back to the system;
- step peak MiB: the same peak minus the RSS when the measured steps start (what one
  step adds on top of the model, its optimizer state and the data);
- peak RSS GiB: the process's high-water mark over the measured steps;
- mean loss: TRL's training loss over all the steps (both rows should agree);
- LM head: which head ran, counted in each subprocess: calls of
  `t3s_kernels.linear_cross_entropy` (with the path it took: 'cpp', 'dense', ...) and of
  TRL's ``ChunkedLogProbFunction``. A patched row whose steps did not all run on t3s, or
  an unpatched row that touched t3s, fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # `python benchmarks/trl_sft.py` imports the `benchmarks` package
    sys.path.insert(0, REPO)

from benchmarks.cpu_compare import reset_peak, rss_kib, cpu_description  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
IMPLS = ("patched", "unpatched")  # the interleaving order
ROW_NAMES = {"unpatched": "SFTTrainer", "patched": "SFTTrainer + t3s.patch"}
RESULT_TAG = "T3S_TRL_SFT_RESULT "  # the subprocess's last line; the trainer prints too
SMOL_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 tie_word_embeddings=True, max_position_embeddings=2048)
PAD_ID, EOS_ID, FIRST_ID = 0, 1, 3  # the tokenizer's <pad>, </s>; data ids from FIRST_ID


# ---------------------------------------------------------------------------------------
# One measurement (runs in a subprocess)
# ---------------------------------------------------------------------------------------

def model_config(args):
    from transformers import LlamaConfig

    cfg = dict(SMOL_135M, bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        cfg["vocab_size"] = args.vocab
    return LlamaConfig(**cfg)


def tokenizer():
    """A three-token word-level tokenizer: TRL wants one for the pad token; the data is
    already tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<s>": 2}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")


def synthetic_dataset(args, vocab_size: int, n: int):
    """``n`` tokenized prompt / completion examples (seed 0) as a `datasets.Dataset` with
    ``input_ids`` and ``completion_mask``; also the prompt lengths."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    ids, masks, prompts = [], [], []
    for _ in range(n):
        p = int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        c = int(rng.integers(args.completion_len[0], args.completion_len[1] + 1))
        ids.append(rng.integers(FIRST_ID, vocab_size, p + c).tolist())
        masks.append([0] * p + [1] * c)
        prompts.append(p)
    return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks}), prompts


class HeadCounter:
    """Counts the calls of t3s's loss (wherever it was imported) and of TRL's chunked head."""

    def __init__(self):
        import t3s_kernels
        from t3s_kernels import dense
        from t3s_kernels.backends import resolve_backend

        self.t3s_calls, self.trl_calls, self.paths = 0, 0, set()
        original = t3s_kernels.linear_cross_entropy

        def counted(hidden, weight, *a, **kw):
            self.t3s_calls += 1
            if kw.get("backend") is None and dense.preferred(
                    hidden.reshape(-1, hidden.shape[-1]), weight):
                self.paths.add("dense")
            else:
                self.paths.add(resolve_backend(kw.get("backend"), hidden))
            return original(hidden, weight, *a, **kw)

        # t3s_kernels, t3s, t3s.hf.trl_head, ...; vars(), not getattr: a lazy module
        # (transformers) would import its submodules on a getattr miss
        for module in list(sys.modules.values()):
            if vars(module).get("linear_cross_entropy") is original:
                module.linear_cross_entropy = counted
        try:
            import trl.trainer.utils as trl_utils

            chunked = trl_utils._ChunkedLogProbFunction
        except (ImportError, AttributeError):  # another TRL: not counted
            self.trl_calls = None
            return
        counter = self

        class Counted(chunked):
            @classmethod
            def apply(cls, *a, **kw):
                counter.trl_calls += 1
                return chunked.apply(*a, **kw)

        trl_utils._ChunkedLogProbFunction = Counted


def measure(impl: str, args) -> dict:
    import gc

    import torch
    import trl
    from transformers import LlamaForCausalLM, TrainerCallback

    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, DTYPES[args.dtype])).train()
    if impl == "patched":
        import t3s

        t3s.patch(model)
    total = args.warmup + args.steps
    data, prompts = synthetic_dataset(args, cfg.vocab_size, args.batch * total)
    out = tempfile.mkdtemp(prefix="t3s_trl_sft_")
    config = trl.SFTConfig(
        output_dir=out, per_device_train_batch_size=args.batch, max_length=args.max_length,
        max_steps=total, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_steps=10**6, completion_only_loss=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=0,
        **({} if args.optim is None else {"optim": args.optim}))
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data,
                             processing_class=tokenizer())
    # TRL built the labels from completion_mask: -100 on the prompt, the tokens after it.
    labels = trainer.train_dataset[0]["labels"]
    if labels[:prompts[0]] != [-100] * prompts[0] or -100 in labels[prompts[0]:]:
        raise RuntimeError("TRL did not build the labels from completion_mask as expected")

    timed = {"seconds": 0.0, "tokens": 0, "start_rss": None, "peak": 0, "each": []}
    reset_ok = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step < args.warmup:
                return
            if timed["start_rss"] is None:  # the first measured step
                gc.collect()
                reset_ok.append(reset_peak())
                timed["start_rss"] = rss_kib("VmRSS")
            timed["tokens0"] = state.num_input_tokens_seen
            timed["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if "t0" not in timed:
                return
            timed["each"].append(time.perf_counter() - timed.pop("t0"))
            timed["seconds"] += timed["each"][-1]
            timed["tokens"] += int(state.num_input_tokens_seen - timed.pop("tokens0"))
            timed["peak"] = max(timed["peak"], rss_kib("VmHWM"))

    trainer.add_callback(StepClock())
    heads = HeadCounter()
    gc.collect()
    before = rss_kib("VmRSS")
    result = trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    reset = bool(reset_ok and reset_ok[0])
    nan = float("nan")
    record = {
        "impl": impl, "seconds": timed["seconds"], "steps": args.steps,
        "step_seconds": timed["each"],
        "steps_per_s": args.steps / timed["seconds"], "tokens": timed["tokens"],
        "tokens_per_s": timed["tokens"] / timed["seconds"],
        "extra_mib": (timed["peak"] - before) / 1024 if reset else nan,
        "step_mib": (timed["peak"] - timed["start_rss"]) / 1024 if reset else nan,
        "peak_gib": timed["peak"] / 2**20 if reset else nan,
        "loss": float(result.training_loss),
        "t3s_calls": heads.t3s_calls, "trl_calls": heads.trl_calls,
        "paths": sorted(heads.paths),
        "optim": str(getattr(config.optim, "value", config.optim)),
        "checkpointing": bool(config.gradient_checkpointing),
    }
    if impl == "patched":
        from t3s_kernels.backends.cpp import LOAD_INFO

        record["cpp_compiled"] = bool(LOAD_INFO.get("compiled"))
    check_heads(record, total)
    return record


def check_heads(r: dict, total: int) -> None:
    """The patched row ran every step's head on t3s (and never on TRL's); the unpatched
    one never touched t3s. Raises otherwise."""
    if r["impl"] == "patched":
        ok = r["t3s_calls"] >= total and not r["trl_calls"]
    else:
        ok = r["t3s_calls"] == 0 and (r["trl_calls"] is None or r["trl_calls"] >= total)
    if not ok:
        raise RuntimeError(f"{r['impl']}: the LM head did not run where expected over {total} "
                           f"steps: t3s_kernels.linear_cross_entropy called {r['t3s_calls']} "
                           f"times (paths {r['paths']}), TRL's chunked head {r['trl_calls']}")


def head_label(r: dict) -> str:
    if r["t3s_calls"]:
        return f"t3s ({'/'.join(r['paths'])}) x{r['t3s_calls']}"
    return f"TRL chunked x{r['trl_calls']}" if r["trl_calls"] is not None else "TRL"


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

def child_args(args) -> list:
    out = ["--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--threads", str(args.threads),
           "--prompt-len", ",".join(map(str, args.prompt_len)),
           "--completion-len", ",".join(map(str, args.completion_len))]
    for flag, value in (("--layers", args.layers), ("--vocab", args.vocab),
                        ("--optim", args.optim)):
        if value is not None:
            out += [flag, str(value)]
    return out


def run_in_subprocess(impl: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, *child_args(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {impl} subprocess failed (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def best(results):
    """Best figures over rounds of one row: fastest, leanest."""
    out = dict(results[0])
    out["seconds"] = min(r["seconds"] for r in results)
    out["steps_per_s"] = max(r["steps_per_s"] for r in results)
    out["tokens_per_s"] = max(r["tokens_per_s"] for r in results)
    for key in ("extra_mib", "step_mib", "peak_gib"):
        out[key] = min(r[key] for r in results)
    return out


def table(rows: dict, dtype: str) -> str:
    lines = [f"| trl.SFTTrainer ({dtype}) | steps/s | tokens/s | extra peak MiB | "
             "step peak MiB | peak RSS GiB | mean loss | LM head |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for impl in ("unpatched", "patched"):
        r = rows[impl]
        lines.append(f"| {ROW_NAMES[impl]} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['extra_mib']:.0f} | {r['step_mib']:.0f} | {r['peak_gib']:.2f} | "
                     f"{r['loss']:.4f} | {head_label(r)} |")
    p, u = rows["patched"], rows["unpatched"]

    def ratio(key, spec=".2f"):
        return format(p[key] / u[key], spec) if u[key] else "-"
    lines.append(f"| patched / unpatched | {ratio('steps_per_s')} | {ratio('tokens_per_s')} | "
                 f"{ratio('extra_mib')} | {ratio('step_mib')} | {ratio('peak_gib')} | "
                 f"{ratio('loss', '.4f')} | |")
    return "\n".join(lines)


def parse_range(text: str):
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (integers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="the model's dtype (fp32, or bf16: the whole model in bfloat16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over the rows")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per subprocess")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps before the measured ones")
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
    p.add_argument("--max-length", type=int, default=512, help="SFTConfig.max_length")
    p.add_argument("--prompt-len", type=parse_range, default=(32, 128), metavar="MIN,MAX",
                   help="prompt lengths, uniform (default 32,128)")
    p.add_argument("--completion-len", type=parse_range, default=(64, 384), metavar="MIN,MAX",
                   help="completion lengths, uniform (default 64,384)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (30; smoke runs)")
    p.add_argument("--vocab", type=int, help="override vocab_size (49152; smoke runs)")
    p.add_argument("--optim", help="SFTConfig.optim (default: TRL's, adamw_torch_fused)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--results", help="append the table to this markdown file")
    p.add_argument("--json", help="write every measurement to this JSON file")
    p.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.batch, args.max_length, args.threads) < 1 or (
            args.warmup < 0 or (args.layers is not None and args.layers < 1)
            or (args.vocab is not None and args.vocab < FIRST_ID + 1)):
        p.error("--rounds, --steps, --batch, --max-length, --threads and --layers must be >= 1, "
                f"--warmup >= 0 and --vocab > {FIRST_ID}")
    if args.prompt_len[1] >= args.max_length:
        p.error(f"the longest prompt ({args.prompt_len[1]}) must be shorter than --max-length "
                f"({args.max_length}), so that every example keeps a completion token")
    if args.one:
        print(RESULT_TAG + json.dumps(measure(args.one, args)), flush=True)
        return 0

    from importlib.metadata import version  # not importing them: the rows' processes do

    layers = SMOL_135M["num_hidden_layers"] if args.layers is None else args.layers
    vocab = SMOL_135M["vocab_size"] if args.vocab is None else args.vocab
    head = (f"CPU: {cpu_description()}; {args.threads} threads, torch {version('torch')}, "
            f"transformers {version('transformers')}, trl {version('trl')}; model: "
            f"SmolLM-135M's shape (H=576, {layers} layers, V={vocab}, tied), random init, "
            f"{args.dtype}; batch {args.batch}, max_length {args.max_length}, prompts "
            f"{args.prompt_len[0]}-{args.prompt_len[1]} and completions "
            f"{args.completion_len[0]}-{args.completion_len[1]} tokens; {args.steps} measured "
            f"steps after {args.warmup} warm-up; best of {args.rounds} interleaved rounds; "
            f"load average before: {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    runs = {impl: [] for impl in IMPLS}
    try:
        for rnd in range(args.rounds):
            for impl in IMPLS:
                r = run_in_subprocess(impl, args)
                runs[impl].append(r)
                print(f"  round {rnd + 1} {args.dtype} {impl}: {r['steps_per_s']:.3f} steps/s, "
                      f"{r['tokens_per_s']:.0f} tokens/s, {r['extra_mib']:.0f} MiB extra, "
                      f"loss {r['loss']:.4f}, head: {head_label(r)}", flush=True)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = {impl: best(runs[impl]) for impl in IMPLS}
    r = rows["patched"]
    head += (f"; trainer: optim {r['optim']}, activation checkpointing "
             f"{'on' if r['checkpointing'] else 'off'}")
    text = table(rows, args.dtype)
    print(f"Trainer: optim {r['optim']}, activation checkpointing "
          f"{'on' if r['checkpointing'] else 'off'}.\n" + text, flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"head": head, "rows": [x for impl in IMPLS for x in runs[impl]]}, f,
                      indent=1)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(f"\n## CPU: trl.SFTTrainer with and without t3s.patch "
                    f"({time.strftime('%Y-%m-%d')})\n\n"
                    f"`python benchmarks/trl_sft.py {' '.join(argv or sys.argv[1:])}`. "
                    f"{head}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
