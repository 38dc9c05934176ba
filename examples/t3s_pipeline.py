"""T3S end to end on a tiny model: pilot -> bottleneck -> Δc -> mask -> retrain from θ0.

    python examples/t3s_pipeline.py [--out DIR] [--seed N]

Runs on a CPU in well under a minute. Everything is built here, nothing is
downloaded:

1. **Data.** Single-digit sums, written as JSONL. The student's own style is a
   direct answer (``3+4=`` -> ``\\boxed{7}``); the teacher's traces work it out
   first (``3+4=`` -> ``3+4=7;\\boxed{7}``). `t3s.TraceDataset` tokenizes them
   with a character-level tokenizer; the loss covers the response only.
2. **θ0.** A tiny Llama built from a config and trained briefly on direct
   answers with `t3s.trainer.T3STrainer` (plain SFT), then saved.
3. **Pilot SFT** from θ0 on the teacher traces, with `T3STrainer` recording
   every trained token's log-prob at every step (``trajectory_dir=``) and
   `t3s.trainer.AccuracyCallback` measuring training accuracy (greedy
   generation, boxed-answer verifier) and held-out accuracy every few steps,
   keeping only the checkpoints that can still be the bottleneck.
4. **Bottleneck** b = `t3s.find_bottleneck` of the training-accuracy history
   (θ0, step 0, is no candidate: Δc would be 0).
5. **Δc = c(θb) - c(θ0).** Exact: `t3s.profile` at θ0 and at the kept
   checkpoint θb, `t3s.exact_delta`. Online (no checkpoint needed):
   `t3s.online_delta` takes c(θb) from each token's recorded visit nearest b.
   `t3s.compare_deltas` reports how well the two agree.
6. **Selection.** `t3s.anchor_mask` (anchors, Δc > 0, leave the loss) on the
   online Δc; a `t3s.SelectionArtifact` is saved, loaded back (checked against
   the tokenizer and the data) and turned into per-example loss masks.
7. **Retrain** from θ0 with the masks (same data order and schedule as the
   pilot) and compare accuracies.

``main(out_dir)`` returns (and writes to ``out_dir/summary.json``) the numbers
it prints. On a model this small the curves are noisy; the point is the
pipeline, which is the same at scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from typing import Any, Dict, Optional

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

import t3s
from t3s.trainer import AccuracyCallback, T3STrainer, read_accuracy_history

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+=;\\{}boxed")

# The run's settings (chosen so that the whole pipeline takes seconds on 2 CPU cores).
N_PILOT = 48          # teacher traces the pilot trains on
N_HELDOUT = 16        # problems never trained on in the pilot (held-out accuracy)
BASE_STEPS = 150      # θ0: direct answers to all 100 problems, batch 100, lr 5e-3
PILOT_STEPS = 20      # pilot and retraining: batch 16, lr 3e-3, constant schedule
EVAL_STEPS = 2        # training / held-out accuracy every 2 steps (16 prompts each)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <pad> <s> </s> <unk>; no chat template, so
    `t3s.tokenize_trace` builds ``<s> prompt response </s>``."""
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_model(tok, seed: int) -> LlamaForCausalLM:
    """A ~60k-parameter Llama (hidden 64, 2 layers, tied embeddings)."""
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def record(a: int, b: int, style: str) -> Dict[str, str]:
    c = a + b
    response = f"{a}+{b}={c};\\boxed{{{c}}}" if style == "teacher" else f"\\boxed{{{c}}}"
    return {"prompt": f"{a}+{b}=", "response": response, "answer": str(c)}


def write_data(data_dir: str, seed: int) -> Dict[str, str]:
    """base.jsonl (all 100 problems, direct), pilot.jsonl (teacher traces), heldout.jsonl."""
    os.makedirs(data_dir, exist_ok=True)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    files = {
        "base": [record(a, b, "direct") for a, b in pairs],
        "pilot": [record(a, b, "teacher") for a, b in pairs[:N_PILOT]],
        "heldout": [record(a, b, "teacher") for a, b in pairs[N_PILOT:N_PILOT + N_HELDOUT]],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(data_dir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def training_args(output_dir: str, seed: int, **kw) -> TrainingArguments:
    base = dict(output_dir=output_dir, per_device_train_batch_size=16, max_steps=PILOT_STEPS,
                learning_rate=3e-3, lr_scheduler_type="constant", weight_decay=0.0,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def quiet(trainer):
    """No per-step printing: this script prints its own summary."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def accuracy_callback(tok, pilot, heldout) -> AccuracyCallback:
    return AccuracyCallback(tok, pilot, heldout=heldout, eval_steps=EVAL_STEPS, verifier="math",
                            subset_size=16, heldout_subset_size=16, max_new_tokens=16,
                            batch_size=16, prune_checkpoints=True)


def main(out_dir: Optional[str] = None, *, seed: int = 0, verbose: bool = True) -> Dict[str, Any]:
    """Run the pipeline in ``out_dir`` (a new temporary directory when None); return the summary."""
    t_start = time.perf_counter()
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="t3s-pipeline-")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    hf_logger = logging.getLogger("transformers")
    hf_level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars
    try:
        return _run(out_dir, seed, say, t_start)
    finally:
        torch.set_num_threads(threads)
        hf_logger.setLevel(hf_level)
        if bars:
            hf_logging.enable_progress_bar()


def _run(out_dir: str, seed: int, say, t_start: float) -> Dict[str, Any]:
    # 1. data
    tok = build_tokenizer()
    paths = write_data(os.path.join(out_dir, "data"), seed)
    base_ds = t3s.TraceDataset.from_jsonl(paths["base"], tok)
    pilot = t3s.TraceDataset.from_jsonl(paths["pilot"], tok)
    heldout = t3s.TraceDataset.from_jsonl(paths["heldout"], tok)
    fingerprint = t3s.dataset_fingerprint(pilot)
    say(f"data: {len(pilot)} teacher traces ({pilot.num_response_tokens()} trace tokens), "
        f"{len(heldout)} held-out problems, in {out_dir}")

    # 2. θ0: the student, trained briefly on its own (direct) style
    theta0_dir = os.path.join(out_dir, "theta0")
    model = build_model(tok, seed)
    quiet(T3STrainer(model=model, args=training_args(os.path.join(out_dir, "base_run"), seed,
                                                     per_device_train_batch_size=100,
                                                     max_steps=BASE_STEPS, learning_rate=5e-3,
                                                     logging_steps=BASE_STEPS),
                     train_dataset=base_ds, processing_class=tok)).train()
    t3s.unpatch(model)  # a plain model on disk and for profiling
    model.save_pretrained(theta0_dir)
    tok.save_pretrained(theta0_dir)

    # 3. pilot SFT from θ0 on the teacher traces: record trajectories, evaluate, prune
    pilot_dir = os.path.join(out_dir, "pilot")
    trajectory_dir = os.path.join(pilot_dir, "trajectory")
    pilot_cb = accuracy_callback(tok, pilot, heldout)
    pilot_trainer = quiet(T3STrainer(
        model=LlamaForCausalLM.from_pretrained(theta0_dir),
        args=training_args(pilot_dir, seed, save_strategy="steps", save_steps=EVAL_STEPS,
                           save_only_model=True),
        train_dataset=pilot, processing_class=tok, trajectory_dir=trajectory_dir,
        callbacks=[pilot_cb]))
    pilot_trainer.train()

    # 4. the bottleneck: argmin of training accuracy over the checkpoints evaluated after θ0
    history = read_accuracy_history(pilot_dir)
    b = t3s.find_bottleneck(history["train_acc"])
    kept_checkpoints = sorted(int(n.split("-")[1]) for n in os.listdir(pilot_dir)
                              if n.startswith("checkpoint-"))
    thetab_dir = os.path.join(pilot_dir, f"checkpoint-{b}")
    say(f"pilot: training accuracy {_curve(history['train_acc'])}")
    say(f"       held-out accuracy {_curve(history['heldout_acc'])}")
    say(f"bottleneck: step {b} (training accuracy {history['train_acc'][b]:.2f}); checkpoints "
        f"kept on disk: {kept_checkpoints} (deleted {history['deleted_checkpoints']})")

    # 5. Δc: exact (forward-only passes at θ0 and θb) and online (from the trajectory)
    profile_dir = os.path.join(out_dir, "profile")
    theta0 = LlamaForCausalLM.from_pretrained(theta0_dir)
    c0 = t3s.profile(theta0, pilot, step=0, store_dir=profile_dir, dataset_fingerprint=fingerprint,
                     progress=False)
    cb = t3s.profile(LlamaForCausalLM.from_pretrained(thetab_dir), pilot, step=b,
                     store_dir=profile_dir, dataset_fingerprint=fingerprint, progress=False)
    exact = t3s.exact_delta(c0, cb)
    reader = t3s.TrajectoryReader(trajectory_dir, dataset_fingerprint=fingerprint,
                                  tokenizer_fingerprint=t3s.tokenizer_fingerprint(tok))
    online = t3s.online_delta(reader, b, initial=c0)
    agreement = t3s.compare_deltas(online, exact, bottleneck_step=b)
    say(f"Δc: {agreement.summary()}")

    # 6. selection: the AR rule on the online Δc, stored as a reusable artifact
    delta = t3s.TokenTable(online["example_id"].to_numpy(), online["position"].to_numpy(),
                           delta=online["delta"].to_numpy(), c0=online["c_0"].to_numpy(),
                           cb=online["c_b"].to_numpy())
    mask = t3s.anchor_mask(delta)
    artifact = t3s.SelectionArtifact.create(
        delta, examples=pilot, tokenizer=tok, rule="anchor", mask=mask, selector="theta0",
        theta0=theta0_dir, thetab=thetab_dir,
        extra={"delta_source": "online", "bottleneck_step": b, "agreement": agreement.as_dict()})
    artifact_path = os.path.join(out_dir, "selection.parquet")
    artifact.save(artifact_path)
    artifact = t3s.SelectionArtifact.load(artifact_path, tokenizer=tok, examples=pilot)
    loss_masks = artifact.loss_masks(pilot)
    kept = int(sum(int(m.sum()) for m in loss_masks.values()))
    total = pilot.num_response_tokens()
    say(f"selection: {total - kept} of {total} trace tokens are anchors (Δc > 0) and leave the "
        f"loss; {kept} ({kept / total:.0%}) are kept")

    # 7. retrain from θ0 with the masks: same data order, schedule and evaluation
    t3s_dir = os.path.join(out_dir, "t3s")
    t3s_cb = accuracy_callback(tok, pilot, heldout)
    t3s_trainer = quiet(T3STrainer(
        model=LlamaForCausalLM.from_pretrained(theta0_dir), args=training_args(t3s_dir, seed),
        train_dataset=pilot, processing_class=tok, callbacks=[t3s_cb],
        data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=loss_masks)))
    t3s_trainer.train()
    t3s_hist = read_accuracy_history(t3s_dir)
    say(f"T3S:   training accuracy {_curve(t3s_hist['train_acc'])}")
    say(f"       held-out accuracy {_curve(t3s_hist['heldout_acc'])}")

    def final(h, key):
        return h[key][max(h[key])]

    summary = {
        "out_dir": out_dir,
        "bottleneck_step": b,
        "pilot_train_acc": history["train_acc"],
        "pilot_heldout_acc": history["heldout_acc"],
        "t3s_train_acc": t3s_hist["train_acc"],
        "t3s_heldout_acc": t3s_hist["heldout_acc"],
        "kept_checkpoints": kept_checkpoints,
        "trace_tokens": total,
        "kept_tokens": kept,
        "anchor_fraction": (total - kept) / total,
        "agreement": agreement.as_dict(),
        "trajectory_rows": reader.num_rows,
        "paths": {"theta0": theta0_dir, "thetab": thetab_dir, "trajectory": trajectory_dir,
                  "profile": profile_dir, "artifact": artifact_path,
                  "pilot_history": os.path.join(pilot_dir, "t3s_accuracy.json"),
                  "t3s_history": os.path.join(t3s_dir, "t3s_accuracy.json")},
        "seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    # "worst" is the lowest *training* accuracy after step 0 (the shock's depth; θ0 is not
    # a candidate, as for the bottleneck), so the summary names its column.
    t3s_worst = min(a for s, a in t3s_hist["train_acc"].items() if s > 0)
    say(f"\nafter {PILOT_STEPS} steps   training acc   held-out acc")
    say(f"  θ0 (step 0)       {history['train_acc'][0]:12.2f}   {history['heldout_acc'][0]:12.2f}")
    say(f"  SFT (pilot)       {final(history, 'train_acc'):12.2f}   "
        f"{final(history, 'heldout_acc'):12.2f}   (worst training acc "
        f"{history['train_acc'][b]:.2f}, at step {b}: the bottleneck)")
    say(f"  T3S               {final(t3s_hist, 'train_acc'):12.2f}   "
        f"{final(t3s_hist, 'heldout_acc'):12.2f}   (worst training acc {t3s_worst:.2f})")
    say(f"done in {summary['seconds']:.1f} s; summary in {os.path.join(out_dir, 'summary.json')}")
    return summary


def _curve(history: Dict[int, float]) -> str:
    return " ".join(f"{s}:{a:.2f}" for s, a in sorted(history.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    main(ns.out, seed=ns.seed)
