"""The stages of a T3S run and the training pieces they share.

`STAGES` lists them in the order ``t3s run`` runs them; importing this module
registers them with `t3s.pipeline.engine`. Each is a function of a
`t3s.pipeline.engine.StageContext`: it reads the settings and the outputs of
the stages before it and writes its own outputs into ``ctx.work`` (file names:
`t3s.pipeline.rundir`); the engine makes that atomic and resumable.

=========  ========================================================  ================
stage      what it does                                               needs
=========  ========================================================  ================
pilot      SFT from θ0 on the traces, recording every trained         model, data
           token's log-prob at every step (`t3s.TrajectoryRecorder`)
           and evaluating training / held-out accuracy every
           ``eval_steps`` (`t3s.trainer.AccuracyCallback`); only the
           checkpoint θb is kept (every evaluated step with
           ``keep_checkpoints``). The pilot is also the plain-SFT
           arm of the comparison.
select     bottleneck b, Δc = c(θb) − c(θ0) (online from the          pilot
           trajectory, or exact), the mask under ``rule``, the
           baseline's and each arm's mask, as `t3s.SelectionArtifact`
           files
train      retraining from θ0 with the artifact's loss masks          select (none
           (plain SFT with ``rule: none``)                            with rule none)
baseline   the same with the baseline's masks (only when              select
           ``baseline`` is set)
arms       the same for each arm of ``arms``, into arms/<name>/       select
           (`t3s.pipeline.arms`; only when ``arms`` is set)
eval       accuracy with the verifier on the test set (``test``),    model, test set
           the held-out set (``heldout``) and ``extra_test``, of
           θ0 and of every trained model that is current (SFT,
           T3S, baseline, arms); the headline numbers come from
           ``test``, else ``heldout`` (`eval_sets`); greedy, or
           avg@k over ``samples`` answers sampled at
           ``temperature`` / ``top_p``
analyze    the diagnostics (`t3s.pipeline.diagnostics`): shock        pilot, select
           curves, gradient ratio and cosine per retained
           checkpoint, loss-transfer matrices, static-signal AUC
           (only with ``analyze``, or as ``t3s analyze``)
sensitivity  T3S retrained from the anchor masks at other bottleneck  pilot, select
           choices, each scored on the eval sets
           (`t3s.pipeline.sensitivity`; only with ``sensitivity``,
           or as ``t3s sensitivity``; one process)
report     figures, ``metrics.json`` and ``report.md``                any stage
           (`t3s.pipeline.report`)
=========  ========================================================  ================

Under a launcher (`t3s.pipeline.engine`) pilot, train and baseline train with
every rank on its slice of each batch (DDP, or the launcher's FSDP), each rank
recording its own trajectory shard; select profiles each rank's share of the
examples into its own shard of the profile store (every token once), then
rank 0 alone computes Δc and writes the artifacts; eval splits the generation
across ranks and gathers it; analyze and report run on rank 0. Files are
written by rank 0 only.

The bottleneck is the argmin of training accuracy over the evaluations
*after* step 0 *(choice: θ0 is the reference of Δc, so b = 0 would give
Δc ≡ 0)*; ties go to the earliest step.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import dist
from .._util import one_line
from . import rundir
from .console import show_progress
from ..dllm.pipeline import (DIFFUSION_EVAL_KEYS, DIFFUSION_KEYS, diffusion_eval_stage,
                             diffusion_train_stage, is_diffusion)
from .diagnostics import check_analyze, stage_analyze
from .sensitivity import check_sensitivity, stage_sensitivity
from .arms import (arm_models, check_signals, needs_signals, signal_columns, stage_arms,
                   write_selection_outputs)
from .batching import ATTENTION_KEYS, is_packed, train_collator, use_packing
from .engine import Stage, StageContext, register_stages
from .loaders import load_data, load_model, load_tokenizer, resolve_device
from ..dllm.report import diffusion_report
from .rundir import STAGE_NAMES, write_json
from .generators import EvalEngine
from .scoring import score_on_sets
from .settings import UsageError, baseline_loss_options, rule_params
from .student import import_selection, student_settings
from .training import (accuracy_callback, checkpoint_args, checkpoint_step_of, checkpoints,
                       continue_from, finals, progress_bar, resume_state_retention, save_log,
                       strip_resume_state, training_args)

__all__ = ["STAGES", "STAGE_NAMES", "NEEDS_MODEL", "NEEDS_TRAIN", "ARMS", "FORCED_MSG",
           "eval_sets", "bottleneck_step"]


# --------------------------------------------------------------------------------------
# Helpers of the stages
# --------------------------------------------------------------------------------------

def bottleneck_step(train_acc: Mapping[int, float]) -> Optional[int]:
    """`t3s.find_bottleneck` (θ0 excluded, ties: earliest); None when no step after θ0
    was evaluated."""
    from ..bottleneck import INITIAL_STEP, find_bottleneck
    if not set(train_acc) - {INITIAL_STEP}:
        return None
    return find_bottleneck(train_acc)


def _training_data(cfg: Mapping[str, Any]):
    """(tokenizer, training traces, held-out problems or None) of a training stage."""
    tok = load_tokenizer(cfg)
    return tok, load_data(cfg, "train", tok), load_data(cfg, "heldout", tok, required=False)


def parallelism(trainer) -> str:
    """How the trainer's accelerator ran the model: ``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"``,
    ``"ddp"`` (several processes, each with the whole model) or ``"none"`` (one process).
    Recorded in the stage summary: a launcher's config may ask for more than applies
    (accelerate applies FSDP to GPU processes only)."""
    from accelerate.utils import DistributedType
    acc = trainer.accelerator
    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp2" if acc.is_fsdp2 else "fsdp1"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "none"


def _save_model(trainer, tok, path: Path) -> None:
    trainer.save_model(str(path))   # collective under FSDP; rank 0 writes
    if dist.is_main():
        tok.save_pretrained(str(path))


# --------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------

def _stage_pilot(ctx: StageContext) -> Dict[str, Any]:
    """SFT from θ0 with trajectory recording, accuracy every eval_steps, checkpoint pruning."""
    from ..trainer import T3STrainer, read_accuracy_history
    cfg, work = ctx.cfg, ctx.work
    tok, train, heldout = _training_data(cfg)
    ctx.say(f"[pilot] {len(train)} traces ({train.num_response_tokens()} trace tokens)"
            + (f", {len(heldout)} held-out problems" if heldout is not None else "")
            + f"; {cfg['steps']} steps, evaluating every {cfg['eval_steps']}")
    model = load_model(cfg["model"], cfg)
    resume_from = dist.on_main(continue_from, work, ctx.resume, ctx.say, "pilot")
    keep = bool(cfg.get("keep_checkpoints"))
    callback = accuracy_callback(cfg, tok, train, heldout, prune=not keep)
    collator = train_collator(model, cfg, tok.pad_token_id)
    trainer = T3STrainer(
        model=model, processing_class=tok, train_dataset=train,
        callbacks=[callback, resume_state_retention()],
        args=training_args(cfg, work, packed=is_packed(collator),
                           **checkpoint_args(cfg, pilot=True)),
        data_collator=collator,
        trajectory_dir=str(work / rundir.TRAJECTORY_DIR))
    progress_bar(trainer, cfg, "pilot")
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    _save_model(trainer, tok, work / rundir.FINAL_MODEL_DIR)
    if not dist.is_main():   # rank 0 keeps θb, prunes and writes the summary
        return {}
    save_log(trainer, work)
    history = read_accuracy_history(work / rundir.ACCURACY_FILE)
    last = int(trainer.state.global_step)
    b = bottleneck_step(history["train_acc"])
    # θb is the only checkpoint kept (the final model is in final/), as weights only;
    # with keep_checkpoints every evaluated one is kept too (weights only).
    thetab = None
    for step, path in sorted(checkpoints(work).items()):
        if step == b and b != last:
            thetab = path.name
            strip_resume_state(path)
        elif keep and step != last:
            strip_resume_state(path)
        else:
            shutil.rmtree(path)
    if b is not None and b == last:
        thetab = rundir.FINAL_MODEL_DIR
    if b is not None:
        start = history["train_acc"].get(0, float("nan"))
        ctx.say(f"[pilot] bottleneck: step {b} (training accuracy "
                f"{history['train_acc'][b]:.3f}; θ0 had {start:.3f})")
    return {"bottleneck_step": b, "thetab": thetab, "final_step": last,
            "parallelism": parallelism(trainer), "packed": is_packed(collator),
            "resumed_from_step": checkpoint_step_of(resume_from),
            "train_acc_at_bottleneck": None if b is None else history["train_acc"][b],
            "n_train": len(train), "trace_tokens": train.num_response_tokens(),
            "n_heldout": None if heldout is None else len(heldout), **finals(history)}


def _delta_table(c0, chosen):
    """A `TokenTable` over every profiled token (c0's keys) with delta, c0 and cb;
    tokens missing from ``chosen`` (never visited by the pilot) get Δc = 0 and
    cb = c0 *(choice: they stay in the loss under the anchor rule)*."""
    import numpy as np
    import pyarrow.compute as pc

    from ..data import TokenTable
    base = c0.select(["example_id", "position", "logprob"]).rename_columns(
        ["example_id", "position", "c0"])
    joined = base.join(chosen.select(["example_id", "position", "delta", "c_b"]),
                       keys=["example_id", "position"], join_type="left outer")
    missing = joined["delta"].null_count
    delta = pc.fill_null(joined["delta"], 0.0).to_numpy().astype(np.float32)
    cb = pc.coalesce(joined["c_b"], joined["c0"]).to_numpy().astype(np.float32)
    table = TokenTable(joined["example_id"].to_numpy(), joined["position"].to_numpy(),
                       delta=delta, c0=joined["c0"].to_numpy().astype(np.float32), cb=cb)
    return table.sorted(), int(missing)


def _stage_select(ctx: StageContext) -> Dict[str, Any]:
    """Bottleneck, Δc (online and, when possible, exact), the mask artifacts (with
    ``artifact``: the reused selection's)."""
    import numpy as np
    import pyarrow.parquet as pq

    from .. import compare_deltas, exact_delta, online_delta, profile
    from ..artifact import SelectionArtifact, dataset_fingerprint, tokenizer_fingerprint
    from ..data import TokenTable
    from ..trajectory import TrajectoryReader
    cfg, work = ctx.cfg, ctx.work
    if cfg.get("artifact"):
        return import_selection(ctx)
    pilot_dir, pilot = ctx.dir("pilot"), ctx.input_record("pilot")["summary"]
    b = pilot["bottleneck_step"]
    if b is None:
        raise UsageError("the pilot evaluated no step after θ0, so it has no bottleneck")
    tok = load_tokenizer(cfg)
    train = load_data(cfg, "train", tok)
    fp, tfp = dataset_fingerprint(train), tokenizer_fingerprint(tok)
    device = resolve_device(cfg)
    # every rank profiles its share of the examples into its own shard (each token once)
    prof = dict(store_dir=str(work / rundir.PROFILE_DIR), dataset_fingerprint=fp,
                tokenizer_fingerprint=tfp, split_across_ranks=True,
                batch_size=cfg["eval_batch_size"], progress=show_progress(cfg["progress"]))

    def profile_at(path: Path, step: int):
        model = load_model(str(path), cfg, device=device)
        try:
            return profile(model, train, step=step, model_id=str(path),
                           packing=use_packing(model, cfg), **prof)
        finally:
            del model

    thetab = pilot_dir / pilot["thetab"] if pilot.get("thetab") else None
    if thetab is None and cfg["delta"] == "exact":
        raise UsageError("delta: exact needs the pilot's θb checkpoint, which is missing; "
                         "use delta: online")
    check_signals(cfg, thetab)   # before the profiling: the signal rules need θb
    c0 = profile_at(Path(cfg["model"]), 0)
    want_exact = thetab is not None and (cfg["delta"] == "exact" or cfg["agreement"])
    cb = profile_at(thetab, b) if want_exact else None
    # Rho-1 offline *(choice)*: L_θ at θ0, the reference is the pilot's final model
    # (trained on the traces).
    cf = (profile_at(pilot_dir / rundir.FINAL_MODEL_DIR, int(pilot["final_step"]))
          if "rho1" in (cfg["rule"], cfg["baseline"], *(cfg.get("arms") or ())) else None)
    if not dist.is_main():   # rank 0 computes Δc and writes the artifacts
        return {}
    try:  # a missing, damaged or foreign trajectory must stop the selection, not zero Δc
        reader = TrajectoryReader(pilot_dir / rundir.TRAJECTORY_DIR, dataset_fingerprint=fp,
                                  tokenizer_fingerprint=tfp)
        online = online_delta(reader, b, initial=c0)
    except ValueError as exc:
        raise UsageError(f"the pilot's trajectory cannot be used: {one_line(exc)}; run the "
                         "pilot again (--redo pilot)") from None
    pq.write_table(online, work / rundir.delta_file("online"))
    exact = agreement = None
    if cfg["delta"] == "exact" or cfg["agreement"]:
        if thetab is None:
            ctx.say("[select] no θb checkpoint: online-vs-exact agreement not computed")
        else:
            exact = exact_delta(c0, cb)
            pq.write_table(exact, work / rundir.delta_file("exact"))
            agreement = compare_deltas(online, exact, bottleneck_step=b)
            ctx.say(f"[select] Δc {agreement.summary()}")
    table, unvisited = _delta_table(c0, exact if cfg["delta"] == "exact" else online)
    if unvisited:
        ctx.say(f"[select] {unvisited} trace tokens were never trained on in the pilot; their "
                "Δc is set to 0")
    if cf is not None:
        ref = table.align(TokenTable(cf["example_id"].to_numpy(), cf["position"].to_numpy(),
                                     c=cf["logprob"].to_numpy()))
        table = table.with_columns(loss_theta=-table["c0"], loss_ref=-ref["c"])
    if needs_signals(cfg):   # rank 0 alone: two models over every trace (θ0 and θb)
        table = signal_columns(cfg, train, tok.pad_token_id, thetab, table, ctx.say)

    rule = cfg["rule"]
    extra = {"delta_source": cfg["delta"], "bottleneck_step": b, "unvisited_tokens": unvisited,
             "agreement": None if agreement is None else agreement.as_dict()}
    params = rule_params(cfg, "rule")
    try:
        art = SelectionArtifact.create(
            table, examples=train, tokenizer=tok, rule="sft" if rule == "none" else rule,
            params=params, selector=cfg["model"], theta0=cfg["model"],
            thetab=None if thetab is None else str(thetab), extra=extra)
    except ValueError as e:
        raise UsageError(f"rule {rule!r}: {one_line(e)}") from None
    return write_selection_outputs(ctx, art, {
        "bottleneck_step": b, "delta_source": cfg["delta"], "unvisited_tokens": unvisited,
        "mask_agreement": None if agreement is None else agreement.mask_agreement,
        "agreement": extra["agreement"]})


def _retrain(ctx: StageContext, artifact: Optional[Path], desc: str,
             loss_options: Optional[Dict[str, Any]] = None, *, work: Optional[Path] = None,
             resume: Optional[bool] = None) -> Dict[str, Any]:
    """Retraining from θ0 (the student's with ``student``) with the loss masks of the
    artifact file ``artifact`` (None: plain SFT) into ``work`` (default the stage's
    directory), continuing an interrupted attempt there when ``resume`` (default
    `StageContext.resume`)."""
    from ..artifact import SelectionArtifact
    from ..cross_model import check_student
    from ..trainer import T3STrainer, read_accuracy_history
    cfg, work = student_settings(ctx.cfg), ctx.work if work is None else work
    resume = ctx.resume if resume is None else resume
    tok, train, heldout = _training_data(cfg)
    masks, kept_fraction = None, 1.0
    if artifact is not None:
        path = artifact
        try:
            art = SelectionArtifact.load(path, columns=())   # keys and mask: what training reads
            check_student(art, tok, train)   # said before the run when tokenizers differ
            masks = art.loss_masks(train, check=False)
        except ValueError as e:
            raise UsageError(f"{path}: {one_line(e)}") from None
        total = sum(int((ex["labels"] != -100).sum()) for ex in train)
        kept_fraction = sum(float(m.float().sum()) for m in masks.values()) / max(total, 1)
        ctx.say(f"[{desc}] retraining from θ0 with rule {art.rule!r}: "
                f"{100 * kept_fraction:.1f}% of trace tokens in the loss"
                + (f", loss options {loss_options}" if loss_options else ""))
    else:
        ctx.say(f"[{desc}] plain SFT from θ0 (every trace token in the loss)")
    model = load_model(cfg["model"], cfg)
    resume_from = dist.on_main(continue_from, work, resume, ctx.say, desc)
    callback = accuracy_callback(cfg, tok, train, heldout, prune=False)
    # keep_checkpoints: save at every evaluation and keep them all, as the pilot does
    keep = bool(cfg.get("keep_checkpoints"))
    collator = train_collator(model, cfg, tok.pad_token_id, masks)
    args = training_args(cfg, work, packed=is_packed(collator), **checkpoint_args(cfg, pilot=keep))
    trainer = T3STrainer(model=model, processing_class=tok, train_dataset=train,
                         patch_options=loss_options, args=args, data_collator=collator,
                         callbacks=[callback] + ([resume_state_retention()] if keep else []))
    progress_bar(trainer, cfg, desc)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    _save_model(trainer, tok, work / rundir.MODEL_DIR)
    if not dist.is_main():   # rank 0 removes the checkpoints and writes the summary
        return {}
    save_log(trainer, work)
    for step, path in checkpoints(work).items():
        # for resuming (the model is in model/); with keep_checkpoints the earlier
        # ones stay, as weights only, for `t3s analyze`
        if keep and step != int(trainer.state.global_step):
            strip_resume_state(path)
        else:
            shutil.rmtree(path)
    history = read_accuracy_history(work / rundir.ACCURACY_FILE)
    return {"rule": None if artifact is None else art.rule, "kept_fraction": kept_fraction,
            "loss_options": dict(loss_options or {}),
            "final_step": int(trainer.state.global_step), "parallelism": parallelism(trainer),
            "packed": is_packed(collator), "resumed_from_step": checkpoint_step_of(resume_from),
            **finals(history)}


def _stage_train(ctx: StageContext) -> Dict[str, Any]:
    """Retraining from θ0 with the selection artifact's loss masks."""
    if is_diffusion(ctx.cfg):
        return diffusion_train_stage(ctx, "train")
    if ctx.cfg["rule"] == "forced":
        raise UsageError(FORCED_MSG)
    return _retrain(ctx, None if ctx.cfg["rule"] == "none"
                    else ctx.dir("select") / rundir.SELECTION_FILE, "train")


def _stage_baseline(ctx: StageContext) -> Dict[str, Any]:
    """Retraining from θ0 with the baseline's loss masks."""
    if is_diffusion(ctx.cfg):
        return diffusion_train_stage(ctx, "baseline")
    return _retrain(ctx, ctx.dir("select") / rundir.BASELINE_FILE, "baseline",
                    baseline_loss_options(ctx.cfg["baseline"]))


def _stage_arms(ctx: StageContext) -> Dict[str, Any]:
    """Retraining from θ0 with each arm's loss masks (`t3s.pipeline.arms.stage_arms`)."""
    return stage_arms(ctx, _retrain)


#: why ``rule: forced`` cannot be trained here
FORCED_MSG = ("rule 'forced' marks the tokens a diffusion LM must reconstruct; it is not a loss "
               "mask, and `t3s train` trains autoregressive models. Use `t3s select --rule forced` "
               "to write the artifact for a diffusion trainer")

#: the models `t3s eval` compares: arm -> (stage, directory inside the stage)
ARMS = (("base", None, None), ("sft", "pilot", rundir.FINAL_MODEL_DIR),
        ("t3s", "train", rundir.MODEL_DIR), ("baseline", "baseline", rundir.MODEL_DIR))


def eval_sets(cfg: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(name, path) of the sets the eval stage scores, the primary one first: the test
    set (``test``) when given, the held-out set (``heldout``) and ``extra_test``, each
    unless it is a file already listed *(choice: all are reported, the headline numbers
    come from the first)*."""
    out = []
    for key in ("test", "heldout", "extra_test"):
        if cfg.get(key) and all(path != cfg[key] for _, path in out):
            out.append((key, cfg[key]))
    return out


def _stage_eval(ctx: StageContext) -> Dict[str, Any]:
    """Accuracy of θ0 (the student's with ``student``) and of every trained model
    available on the test set and the held-out set."""
    cfg, work = student_settings(ctx.cfg), ctx.work
    sets = eval_sets(cfg)
    if not sets:
        ctx.say("[eval] no test set (--test or --heldout): nothing to evaluate")
        out = {"skipped": "no test set", "arms": {}}
        write_json(work / rundir.RESULTS_FILE, out)
        return out
    if is_diffusion(cfg):
        return diffusion_eval_stage(ctx, sets)
    tok = load_tokenizer(cfg)
    data = {key: load_data(cfg, key, tok) for key, _ in sets}
    device = resolve_device(cfg)
    by_set: Dict[str, Dict[str, Any]] = {key: {} for key, _ in sets}
    with EvalEngine(cfg, tok) as gen:
        # with a student, its plain SFT is the arm 'sft' (the pilot's is the selector's)
        own = [a for a in ARMS if not (cfg.get("student") and a[0] == "sft")]
        for arm, stage, sub in own + arm_models(ctx):
            if stage is None:
                path = cfg["model"]
            elif ctx.dir(stage) is not None:
                path = str(ctx.dir(stage) / sub)
            else:
                continue
            engine = gen.for_model(path)
            model = load_model(path, cfg, device=device) if engine is None else None
            label = f"t3s (rule {cfg['rule']})" if arm == "t3s" else arm
            for key, score in score_on_sets(model, tok, data, sets, cfg, work, arm,
                                            engine).items():
                by_set[key][arm] = {**score, "model": path}
                ctx.say(f"[eval] {key}: {label}: {_score_line(score)}")
            del model
    if not dist.is_main():
        return {}
    key = sets[0][0]
    out = {"test_set": cfg[key], "test_key": key, "n": len(data[key]), "verifier": cfg["verifier"],
           "arms": by_set[key],
           "sets": {k: {"path": p, "n": len(data[k]), "arms": by_set[k]} for k, p in sets}}
    if cfg["temperature"] > 0:   # sampled answers: say how (greedy, the default, needs no note)
        out["sampling"] = {k: cfg[k] for k in _SAMPLING}
    write_json(work / rundir.RESULTS_FILE, out)
    return {k: v for k, v in out.items() if k not in ("arms", "sets")} | {
        "accuracy": {a: v["accuracy"] for a, v in by_set[key].items()},
        "accuracy_by_set": {k: {a: v["accuracy"] for a, v in by_set[k].items()}
                            for k, _ in sets}}


def _score_line(score: Mapping[str, Any]) -> str:
    """An eval score as the [eval] lines show it: ``0.667 (4/6)``; with k samples
    ``0.667 ± 0.105 avg@3 (12/18 answers, pass@3 0.833)``."""
    if "k" not in score:
        return f"{score['accuracy']:.3f} ({score['n_correct']}/{score['n']})"
    se = "" if score["se"] is None else f" ± {score['se']:.3f}"
    return (f"{score['accuracy']:.3f}{se} avg@{score['k']} ({score['n_correct']}/"
            f"{score['n'] * score['k']} answers, pass@{score['k']} {score['pass_at_k']:.3f})")


def _stage_sensitivity(ctx: StageContext) -> Dict[str, Any]:
    """The bottleneck-sensitivity sweep, retraining as the train stage does."""
    return stage_sensitivity(ctx, retrain=_retrain, delta_table=_delta_table,
                             sets=eval_sets(ctx.cfg))


def _stage_report(ctx: StageContext) -> Dict[str, Any]:
    """Figures, metrics.json and report.md from the current stages."""
    from .report import build_report
    dirs = {name: ctx.dir(name) for name in STAGE_NAMES if name != "report"}
    if not any(dirs.values()):
        raise UsageError(f"nothing to report in {ctx.run.path}: no stage has finished; run "
                         "`t3s run` (or `t3s pilot`) first")
    if is_diffusion(ctx.cfg):
        metrics = diffusion_report(ctx.work, dirs, ctx.cfg)
        ctx.say(f"[report] {ctx.run.stage_dir('report') / rundir.REPORT_FILE}")
        return {"metrics": metrics}
    metrics = build_report(ctx.run.path, out_dir=ctx.work, stage_dirs=dirs, config=ctx.cfg)
    ctx.say(f"[report] {ctx.run.stage_dir('report') / rundir.REPORT_FILE}")
    return {"metrics": metrics}


# the attention settings: the training and profiling passes batch by them
_DATA = ("model", "tokenizer", "train", "max_length", "truncation", "dtype",
         "seed") + ATTENTION_KEYS
_TRAINING = ("batch_size", "grad_accum", "lr", "steps", "lr_scheduler", "warmup_steps",
             "weight_decay", "eval_steps", "eval_subset", "heldout", "max_new_tokens", "verifier",
             "engine")
# the stages that run on the student (`t3s.pipeline.student`)
_STUDENT = ("student",)
# how the eval stage and the sensitivity sweep generate (the training curves stay greedy)
_SAMPLING = ("samples", "temperature", "top_p")

STAGES: Tuple[Stage, ...] = (
    Stage("pilot", _stage_pilot, _DATA + _TRAINING, lambda cfg: (),
          enabled=lambda cfg: not cfg.get("artifact"),
          help="SFT from θ0 with trajectory recording and training-accuracy evaluation",
          resumable=True),
    Stage("select", _stage_select,
          ("delta", "agreement", "rule", "rule_params", "baseline", "baseline_params",
           "objective", "arms", "artifact") + ATTENTION_KEYS,
          lambda cfg: () if cfg.get("artifact") else ("pilot",),
          help="bottleneck, Δc and the mask artifact"),
    Stage("train", _stage_train, _DATA + _TRAINING + _STUDENT + ("rule",) + DIFFUSION_KEYS,
          lambda cfg: () if cfg["rule"] == "none" else ("select",),
          help="masked retraining from θ0 with the artifact's masks", resumable=True),
    Stage("baseline", _stage_baseline,
          _DATA + _TRAINING + _STUDENT + ("baseline",) + DIFFUSION_KEYS,
          lambda cfg: ("select",), enabled=lambda cfg: cfg["baseline"] != "none",
          help="retraining from θ0 with the baseline's masks", resumable=True),
    Stage("arms", _stage_arms, _DATA + _TRAINING + _STUDENT + ("arms",),
          lambda cfg: ("select",),
          enabled=lambda cfg: bool(cfg.get("arms")),
          help="retraining from θ0 with each extra arm's masks (--arms), one after another",
          resumable=True),
    Stage("eval", _stage_eval, ("model", "tokenizer", "test", "heldout", "extra_test",
                                "max_new_tokens",
                                "verifier", "dtype", "max_length", "truncation", "seed",
                                "engine", "attn_implementation") + _STUDENT
          + _SAMPLING + DIFFUSION_EVAL_KEYS,
          lambda cfg: (), optional=("pilot", "train", "baseline", "arms"),
          help="accuracy on a JSONL test set with the verifier"),
    Stage("analyze", stage_analyze, _DATA + ("analysis_params",),
          lambda cfg: ("pilot", "select"), optional=("train",),
          enabled=lambda cfg: bool(cfg.get("analyze")),
          help="the diagnostics: shock curves, gradient ratio and cosine, loss-transfer "
               "matrix, static-signal AUC", ranks="main", check=check_analyze),
    # train and eval: the default bottleneck's model and numbers are reused when current
    Stage("sensitivity", _stage_sensitivity,
          _DATA + _TRAINING + ("test", "extra_test", "sensitivity_params") + _SAMPLING,
          lambda cfg: ("pilot", "select"), optional=("train", "eval"),
          enabled=lambda cfg: bool(cfg.get("sensitivity")),
          help="T3S retrained from the masks at other bottleneck choices, with the accuracy "
               "of each", resumable=True, ranks="main", check=check_sensitivity),
    Stage("report", _stage_report, (), lambda cfg: (),
          optional=("pilot", "select", "train", "baseline", "arms", "eval", "analyze",
                    "sensitivity"),
          help="figures and a Markdown summary", ranks="main"),
)
register_stages(STAGES)   # checks that their names are rundir.STAGE_NAMES
#: stages that load the model or the training data
NEEDS_MODEL = ("pilot", "select", "train", "baseline", "arms", "eval", "analyze", "sensitivity")
NEEDS_TRAIN = ("pilot", "select", "train", "baseline", "arms", "analyze", "sensitivity")
