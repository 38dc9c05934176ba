"""The diffusion-LM side of a run: ``objective: diffusion`` in train, baseline and eval.

Pipeline layer: the stages of `t3s.pipeline.stages` call it; the method modules of
`t3s.dllm` never import it.

T3S for a masked-diffusion LM in one run directory:

=========  ==============================================================
stage      with ``objective: diffusion``
=========  ==============================================================
pilot      unchanged: SFT of the AR selector (``model``) with recording
select     unchanged: Δc on the selector; ``rule: forced`` writes the forced
           set S = {Δc < −τ} (τ: ``--rule-param tau=...``, default 0.2)
train      masked-diffusion SFT of ``diffusion_model`` from its θ0
           (`t3s.dllm.DiffusionTrainer`), every step masking the forced
           set on top of the random corruption (``rule: forced``), or
           plain diffusion SFT (``rule: none``)
baseline   the same with a random forced set of the same size
           (``baseline: random``, drawn with the run's seed) or plain
           diffusion SFT (``baseline: sft``)
eval       accuracy of the diffusion θ0 (``base``), of ``sft_model`` when
           given (``sft``: a plain diffusion-SFT model, e.g. from a run with
           ``rule: none``) and of the trained diffusion models (``t3s``,
           ``baseline``) by iterative unmasking
           (`t3s.dllm.diffusion_accuracy`: ``block_length``,
           ``diffusion_steps``, answers up to ``max_new_tokens`` rounded up to
           a whole block) with the run's verifier; the AR pilot is not scored
=========  ==============================================================

Rows are padded with EOS, which is part of the response (maskable, in the
loss), as in LLaDA's SFT, so the model learns to end its answer inside the
fixed number of generated positions.

The selector's artifact is checked against the diffusion model's tokenizer
(its fingerprint must match) and training data; a mismatch stops the stage
with what differs. Training accuracy during training is evaluated as for AR
models (``eval_steps``, ``eval_subset``), with diffusion generation.
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Dict, Mapping, Optional

from .._util import one_line
from ..pipeline import rundir
from ..pipeline.console import show_progress
from ..pipeline.engine import StageContext
from ..pipeline.loaders import check_model_dir, ensure_pad_token, load_data, resolve_device
from ..pipeline.rundir import write_json
from ..pipeline.settings import UsageError
from ..pipeline.training import (checkpoint_args, checkpoint_step_of, checkpoints, continue_from,
                                 finals, progress_bar, save_log, training_args)

__all__ = ["DIFFUSION_KEYS", "DIFFUSION_EVAL_KEYS", "is_diffusion", "load_diffusion", "diffusion_train_stage",
           "diffusion_eval_stage", "DIFFUSION_ARMS"]

#: settings the diffusion stages depend on (besides the AR stages' own)
DIFFUSION_KEYS = ("objective", "diffusion_model", "forced_weight", "mask_token_id",
                  "block_length", "diffusion_steps")
#: settings only the eval stage depends on
DIFFUSION_EVAL_KEYS = DIFFUSION_KEYS + ("sft_model",)

#: arm -> (stage, directory inside the stage); None: a model named by a setting
DIFFUSION_ARMS = (("base", None, "diffusion_model"), ("sft", None, "sft_model"),
                  ("t3s", "train", rundir.MODEL_DIR), ("baseline", "baseline", rundir.MODEL_DIR))

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def is_diffusion(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("objective") == "diffusion"


def load_diffusion(cfg: Mapping[str, Any], path: Optional[str] = None, *, device: Optional[str] = None):
    """(`t3s.dllm.MaskedLMAdapter`, tokenizer) of ``path`` (default: ``diffusion_model``)."""
    import torch

    from .models import load_diffusion_lm
    path = path or cfg["diffusion_model"]
    if path is None:
        raise UsageError("objective diffusion needs --diffusion-model DIR (the diffusion LM's θ0, a "
                         "local bidirectional masked-LM directory)")
    check_model_dir(path, trust_remote_code=cfg["trust_remote_code"], what="model")
    try:
        adapter, tok = load_diffusion_lm(path, trust_remote_code=cfg["trust_remote_code"],
                                         dtype=getattr(torch, _DTYPES[cfg["dtype"]]),
                                         mask_token_id=cfg["mask_token_id"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a diffusion LM from {path}: {one_line(e)}") from None
    ensure_pad_token(tok, path)
    if device is not None:
        adapter.model.to(device)
    return adapter, tok


def _gen(cfg: Mapping[str, Any]) -> Dict[str, int]:
    from .evaluate import round_up
    length = round_up(cfg["max_new_tokens"], cfg["block_length"])
    return {"gen_length": length, "block_length": cfg["block_length"],
            "steps": cfg["diffusion_steps"] or length}


def _forced(ctx: StageContext, arm: str, train, tok):
    """(forced masks or None, description) of the arm under the settings."""
    from .selector import forced_masks, random_forced_masks
    cfg = ctx.cfg
    which = cfg["rule"] if arm == "train" else cfg["baseline"]
    if which in ("none", "sft"):
        return None, "plain diffusion SFT (no forced set)"
    path = ctx.dir("select") / rundir.SELECTION_FILE
    try:
        masks = forced_masks(path, train, tok)
    except ValueError as e:
        raise UsageError(f"{path}: {one_line(e)}") from None
    if which == "random":
        masks = random_forced_masks(masks, train, seed=cfg["seed"])
        return masks, "a random forced set of the same size"
    return masks, "T3S's forced set (Δc < −τ from the AR selector)"


def diffusion_train_stage(ctx: StageContext, arm: str) -> Dict[str, Any]:
    """Masked-diffusion SFT of ``diffusion_model`` from θ0 for ``arm`` ("train" / "baseline")."""
    from .selector import forced_fraction_of
    from .trainer import DiffusionAccuracyCallback, DiffusionCollator, DiffusionTrainer
    from ..trainer import read_accuracy_history
    cfg, work = ctx.cfg, ctx.work
    adapter, tok = load_diffusion(cfg)
    train = load_data(cfg, "train", tok)
    heldout = load_data(cfg, "heldout", tok, required=False)
    forced, what = _forced(ctx, arm, train, tok)
    fraction = 0.0 if forced is None else forced_fraction_of(forced, train)
    ctx.say(f"[{arm}] diffusion SFT of {cfg['diffusion_model']} from θ0 with {what}: "
            f"{100 * fraction:.1f}% of trace tokens forced (forced weight {cfg['forced_weight']})")
    resume_from = continue_from(work, ctx.resume, ctx.say, arm)
    subset = cfg["eval_subset"] or None
    gen = _gen(cfg)
    callback = DiffusionAccuracyCallback(
        tok, train, heldout=heldout, eval_steps=cfg["eval_steps"], verifier=cfg["verifier"],
        subset_size=subset, heldout_subset_size=subset, max_new_tokens=gen["gen_length"],
        batch_size=cfg["eval_batch_size"], seed=cfg["seed"], block_length=gen["block_length"],
        steps=gen["steps"], mask_token_id=adapter.mask_token_id,
        progress=show_progress(cfg["progress"]), history_file=rundir.ACCURACY_FILE)
    try:
        trainer = DiffusionTrainer(
            model=adapter.model, processing_class=tok, train_dataset=train, callbacks=[callback],
            args=training_args(cfg, work, remove_unused_columns=False,
                               **checkpoint_args(cfg, pilot=False)),
            data_collator=DiffusionCollator(tok.pad_token_id, forced_masks=forced,
                                            eos_token_id=tok.eos_token_id),
            mask_token_id=adapter.mask_token_id, forced_weight=cfg["forced_weight"], verify=False)
    except ValueError as e:
        raise UsageError(f"[{arm}] {one_line(e)}") from None
    progress_bar(trainer, cfg, arm)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    save_log(trainer, work)
    trainer.save_model(str(work / rundir.MODEL_DIR))
    tok.save_pretrained(str(work / rundir.MODEL_DIR))
    for path in checkpoints(work).values():  # only for resuming; the model is in model/
        shutil.rmtree(path)
    history = read_accuracy_history(work / rundir.ACCURACY_FILE)
    logged = [h["t3s/forced_fraction"] for h in trainer.state.log_history if "t3s/forced_fraction" in h]
    return {"objective": "diffusion", "rule": cfg["rule"] if arm == "train" else cfg["baseline"],
            "forced_fraction": fraction,
            "logged_forced_fraction": sum(logged) / len(logged) if logged else None,
            "forced_weight": cfg["forced_weight"], "final_step": int(trainer.state.global_step),
            "resumed_from_step": checkpoint_step_of(resume_from),
            **finals(history)}


def diffusion_eval_stage(ctx: StageContext, sets) -> Dict[str, Any]:
    """Accuracy of the diffusion θ0 and of the trained diffusion models on ``sets``
    ([(key, path)], the primary set first); the same files as the AR eval stage."""
    from .evaluate import diffusion_accuracy
    cfg, work = ctx.cfg, ctx.work
    device = resolve_device(cfg)
    _, tok = load_diffusion(cfg)
    data = {key: load_data(cfg, key, tok) for key, _ in sets}
    gen = _gen(cfg)
    by_set: Dict[str, Dict[str, Any]] = {key: {} for key, _ in sets}
    for arm, stage, sub in DIFFUSION_ARMS:
        if stage is None:
            path = cfg[sub]
            if path is None:
                continue
        elif ctx.dir(stage) is not None:
            path = str(ctx.dir(stage) / sub)
        else:
            continue
        adapter, _ = load_diffusion(cfg, path, device=device)
        for i, (key, _) in enumerate(sets):
            acc, details = diffusion_accuracy(adapter, tok, data[key], verifier=cfg["verifier"],
                                              batch_size=cfg["eval_batch_size"], seed=cfg["seed"],
                                              return_details=True, **gen)
            fname = rundir.predictions_file(arm, None if i == 0 else key)
            with open(work / fname, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in details)
            by_set[key][arm] = {"accuracy": acc, "n": len(details),
                                "n_correct": int(sum(d["correct"] for d in details)), "model": path}
            ctx.say(f"[eval] {key}: diffusion {arm}: {acc:.3f} "
                    f"({by_set[key][arm]['n_correct']}/{len(details)})")
        del adapter
    key = sets[0][0]
    out = {"test_set": cfg[key], "test_key": key, "n": len(data[key]), "verifier": cfg["verifier"],
           "objective": "diffusion", "generation": gen, "arms": by_set[key],
           "sets": {k: {"path": p, "n": len(data[k]), "arms": by_set[k]} for k, p in sets}}
    write_json(work / rundir.RESULTS_FILE, out)
    return {k: v for k, v in out.items() if k not in ("arms", "sets")} | {
        "accuracy": {a: v["accuracy"] for a, v in by_set[key].items()},
        "accuracy_by_set": {k: {a: v["accuracy"] for a, v in by_set[k].items()} for k, _ in sets}}
