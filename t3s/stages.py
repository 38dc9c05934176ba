"""The stages of a T3S run and the training pieces they share.

`STAGES` lists them in the order ``t3s run`` runs them (pilot, select, train,
baseline, eval, report; see `t3s.run` for what each does and needs). Each is a
function of a `t3s.run.StageContext`: it reads the settings and the outputs of
the stages before it and writes its own outputs into ``ctx.work``; the
run-directory machinery in `t3s.run` makes that atomic and resumable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .run import (
    Stage,
    StageContext,
    UsageError,
    _first_line,
    _write_json,
    canonical_rule,
    load_data,
    load_model,
    load_tokenizer,
    resolve_device,
    rule_params,
)

__all__ = ["STAGES", "STAGE_NAMES", "NEEDS_MODEL", "NEEDS_TRAIN", "ARMS", "eval_sets",
           "bottleneck_step"]


# --------------------------------------------------------------------------------------
# Training pieces shared by the pilot and the retraining stages
# --------------------------------------------------------------------------------------

def _training_args(cfg: Mapping[str, Any], out: Path, **overrides):
    from transformers import TrainingArguments
    device = resolve_device(cfg)
    kw = dict(output_dir=str(out), per_device_train_batch_size=cfg["batch_size"],
              gradient_accumulation_steps=cfg["grad_accum"], max_steps=cfg["steps"],
              learning_rate=cfg["lr"], lr_scheduler_type=cfg["lr_scheduler"],
              warmup_steps=cfg["warmup_steps"], weight_decay=cfg["weight_decay"],
              logging_steps=1, save_strategy="no", report_to=[], use_cpu=device == "cpu",
              disable_tqdm=True, seed=cfg["seed"], data_seed=cfg["seed"],
              dataloader_num_workers=0)
    kw.update(overrides)
    try:
        return TrainingArguments(**kw)
    except ValueError as e:
        raise UsageError(f"training settings: {_first_line(e)}") from None


def _after_start_tracker():
    """A `t3s.BottleneckTracker` that records step 0 (θ0) without counting it as a
    bottleneck candidate (see the module docstring); checkpoint pruning follows
    the same minimum."""
    from .bottleneck import BottleneckTracker

    class AfterStartTracker(BottleneckTracker):
        def update(self, step, acc):
            if int(step) == 0 and not self.history:
                self.history[0] = float(acc)
                return False
            return super().update(step, acc)

    return AfterStartTracker()


def bottleneck_step(train_acc: Mapping[int, float]) -> Optional[int]:
    """argmin of training accuracy over the evaluated steps after step 0 (ties: earliest)."""
    from .bottleneck import find_bottleneck
    after = {s: a for s, a in train_acc.items() if s > 0}
    return find_bottleneck(after) if after else None


def _accuracy_callback(cfg, tok, train, heldout, *, prune: bool):
    from .trainer import AccuracyCallback
    subset = cfg["eval_subset"] or None
    return AccuracyCallback(tok, train, heldout=heldout, eval_steps=cfg["eval_steps"],
                            verifier=cfg["verifier"], subset_size=subset,
                            heldout_subset_size=subset, max_new_tokens=cfg["max_new_tokens"],
                            batch_size=cfg["eval_batch_size"], seed=cfg["seed"],
                            tracker=_after_start_tracker(), prune_checkpoints=prune,
                            progress=cfg["progress"])


def _progress_bar(trainer, cfg, desc: str) -> None:
    """Replace the Trainer's printing with one bar showing loss and accuracies."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if cfg["progress"]:
        trainer.add_callback(_bar_callback(desc))


def _bar_callback(desc: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    shown = {"loss": "loss", "t3s/train_acc": "train_acc", "t3s/heldout_acc": "heldout_acc"}

    class Bar(TrainerCallback):
        def __init__(self):
            self.bar, self.postfix = None, {}

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc,
                                unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs:
                return
            for key, label in shown.items():
                if isinstance(logs.get(key), (int, float)):
                    self.postfix[label] = f"{logs[key]:.3g}"
            self.bar.set_postfix(self.postfix, refresh=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Bar()


def _save_log(trainer, work: Path) -> None:
    _write_json(work / "log_history.json", list(trainer.state.log_history))


def _save_model(trainer, tok, path: Path) -> None:
    trainer.save_model(str(path))
    tok.save_pretrained(str(path))


def _checkpoints(directory: Path) -> Dict[int, Path]:
    found = {}
    for p in directory.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit():
            found[int(tail)] = p
    return found


def _finals(history: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for key in ("train_acc", "heldout_acc"):
        h = history.get(key) or {}
        out[f"final_{key}"] = h[max(h)] if h else None
    return out


# --------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------

def _stage_pilot(ctx: StageContext) -> Dict[str, Any]:
    """SFT from θ0 with trajectory recording, accuracy every eval_steps, checkpoint pruning."""
    from .trainer import T3STrainer, read_accuracy_history
    cfg, work = ctx.cfg, ctx.work
    tok = load_tokenizer(cfg)
    train = load_data(cfg, "train", tok)
    heldout = load_data(cfg, "heldout", tok, required=False)
    ctx.say(f"[pilot] {len(train)} traces ({train.num_response_tokens()} trace tokens)"
            + (f", {len(heldout)} held-out problems" if heldout is not None else "")
            + f"; {cfg['steps']} steps, evaluating every {cfg['eval_steps']}")
    model = load_model(cfg["model"], cfg)
    callback = _accuracy_callback(cfg, tok, train, heldout, prune=True)
    trainer = T3STrainer(
        model=model, processing_class=tok, train_dataset=train, callbacks=[callback],
        args=_training_args(cfg, work, save_strategy="steps", save_steps=cfg["eval_steps"],
                            save_only_model=True),
        trajectory_dir=str(work / "trajectory"))
    _progress_bar(trainer, cfg, "pilot")
    trainer.train()
    _save_log(trainer, work)
    _save_model(trainer, tok, work / "final")
    history = read_accuracy_history(work)
    last = int(trainer.state.global_step)
    b = bottleneck_step(history["train_acc"])
    # θb is the only checkpoint kept (the final model is in final/).
    thetab = None
    for step, path in sorted(_checkpoints(work).items()):
        if step == b and b != last:
            thetab = path.name
        else:
            shutil.rmtree(path)
    if b is not None and b == last:
        thetab = "final"
    if b is not None:
        start = history["train_acc"].get(0, float("nan"))
        ctx.say(f"[pilot] bottleneck: step {b} (training accuracy "
                f"{history['train_acc'][b]:.3f}; θ0 had {start:.3f})")
    return {"bottleneck_step": b, "thetab": thetab, "final_step": last,
            "train_acc_at_bottleneck": None if b is None else history["train_acc"][b],
            "n_train": len(train), "trace_tokens": train.num_response_tokens(),
            "n_heldout": None if heldout is None else len(heldout), **_finals(history)}


def _delta_table(c0, chosen):
    """A `TokenTable` over every profiled token (c0's keys) with delta, c0 and cb;
    tokens missing from ``chosen`` (never visited by the pilot) get Δc = 0 and
    cb = c0 *(choice: they stay in the loss under the anchor rule)*."""
    import numpy as np
    import pyarrow.compute as pc

    from .data import TokenTable
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
    """Bottleneck, Δc (online and, when possible, exact), the mask artifacts."""
    import numpy as np
    import pyarrow.parquet as pq

    from .artifact import SelectionArtifact, dataset_fingerprint, tokenizer_fingerprint
    from .data import TokenTable
    from .profile import compare_deltas, exact_delta, online_delta, profile
    from .store import TrajectoryReader
    cfg, work = ctx.cfg, ctx.work
    pilot_dir, pilot = ctx.dir("pilot"), ctx.record("pilot")["summary"]
    b = pilot["bottleneck_step"]
    if b is None:
        raise UsageError("the pilot evaluated no step after θ0, so it has no bottleneck")
    tok = load_tokenizer(cfg)
    train = load_data(cfg, "train", tok)
    fp, tfp = dataset_fingerprint(train), tokenizer_fingerprint(tok)
    device = resolve_device(cfg)
    prof = dict(store_dir=str(work / "profile"), dataset_fingerprint=fp, tokenizer_fingerprint=tfp,
                batch_size=cfg["eval_batch_size"], progress=cfg["progress"])

    def profile_at(path: Path, step: int):
        model = load_model(str(path), cfg, device=device)
        try:
            return profile(model, train, step=step, model_id=str(path), **prof)
        finally:
            del model

    c0 = profile_at(Path(cfg["model"]), 0)
    reader = TrajectoryReader(pilot_dir / "trajectory", dataset_fingerprint=fp,
                              tokenizer_fingerprint=tfp)
    online = online_delta(reader, b, initial=c0)
    pq.write_table(online, work / "delta_online.parquet")
    thetab = pilot_dir / pilot["thetab"] if pilot.get("thetab") else None
    exact = agreement = None
    if cfg["delta"] == "exact" or cfg["agreement"]:
        if thetab is None:
            if cfg["delta"] == "exact":
                raise UsageError("delta: exact needs the pilot's θb checkpoint, which is missing; "
                                 "use delta: online")
            ctx.say("[select] no θb checkpoint: online-vs-exact agreement not computed")
        else:
            cb = profile_at(thetab, b)
            exact = exact_delta(c0, cb)
            pq.write_table(exact, work / "delta_exact.parquet")
            agreement = compare_deltas(online, exact, bottleneck_step=b)
            ctx.say(f"[select] Δc {agreement.summary()}")
    table, unvisited = _delta_table(c0, exact if cfg["delta"] == "exact" else online)
    if unvisited:
        ctx.say(f"[select] {unvisited} trace tokens were never trained on in the pilot; their "
                "Δc is set to 0")
    if "rho1" in (cfg["rule"], cfg["baseline"]):
        # Rho-1 offline *(choice)*: L_θ at θ0, the reference is the pilot's final model
        # (trained on the traces).
        cf = profile_at(pilot_dir / "final", int(pilot["final_step"]))
        ref = table.align(TokenTable(cf["example_id"].to_numpy(), cf["position"].to_numpy(),
                                     c=cf["logprob"].to_numpy()))
        table = table.with_columns(loss_theta=-table["c0"], loss_ref=-ref["c"])

    rule = cfg["rule"]
    extra = {"delta_source": cfg["delta"], "bottleneck_step": b, "unvisited_tokens": unvisited,
             "agreement": None if agreement is None else agreement.as_dict()}
    params = rule_params(cfg, "rule")
    if isinstance(params.get("like"), str):
        params["like"] = canonical_rule(params["like"], "rule in like=")
    try:
        art = SelectionArtifact.create(
            table, examples=train, tokenizer=tok, rule="sft" if rule == "none" else rule,
            params=params, selector=cfg["model"], theta0=cfg["model"],
            thetab=None if thetab is None else str(thetab), extra=extra)
    except ValueError as e:
        raise UsageError(f"rule {rule!r}: {_first_line(e)}") from None
    art.save(work / "selection.parquet")
    summary = art.summary()
    kept = (int(np.count_nonzero(art.table["loss_mask"]))
            if art.mask_column == "loss_mask" else None)
    out = {"bottleneck_step": b, "delta_source": cfg["delta"], "rule": rule,
           "rule_params": art.params, "mask_column": art.mask_column,
           "n_tokens": summary.n_tokens, "n_examples": summary.n_examples,
           "masked_fraction": summary.fraction_masked, "kept_tokens": kept,
           "anchor_fraction": summary.fraction_positive, "unvisited_tokens": unvisited,
           "mask_agreement": None if agreement is None else agreement.mask_agreement,
           "agreement": extra["agreement"], "baseline": cfg["baseline"]}
    ctx.say(f"[select] rule {rule}: {summary.n_masked} of {summary.n_tokens} trace tokens "
            f"{'forced' if art.mask_column == 'forced' else 'left out of the loss'} "
            f"({100 * (summary.fraction_masked or 0):.1f}%)")
    if cfg["baseline"] != "none":
        bparams = rule_params(cfg, "baseline", budget=kept)
        if isinstance(bparams.get("like"), str):
            bparams["like"] = canonical_rule(bparams["like"], "rule in like=")
        try:
            base_art = art.reapply(cfg["baseline"], **bparams)
        except ValueError as e:
            raise UsageError(f"baseline {cfg['baseline']!r}: {_first_line(e)}") from None
        base_art.save(work / "baseline.parquet")
        bs = base_art.summary()
        out.update(baseline_params=base_art.params, baseline_masked_fraction=bs.fraction_masked)
        ctx.say(f"[select] baseline {cfg['baseline']}: {bs.n_masked} of {bs.n_tokens} tokens "
                f"left out ({100 * (bs.fraction_masked or 0):.1f}%)")
    _write_json(work / "summary.json", out)
    return out


def _retrain(ctx: StageContext, artifact: Optional[str], desc: str) -> Dict[str, Any]:
    from .artifact import SelectionArtifact
    from .data import PaddedCollator
    from .trainer import T3STrainer, read_accuracy_history
    cfg, work = ctx.cfg, ctx.work
    tok = load_tokenizer(cfg)
    train = load_data(cfg, "train", tok)
    heldout = load_data(cfg, "heldout", tok, required=False)
    masks, kept_fraction = None, 1.0
    if artifact is not None:
        path = ctx.dir("select") / artifact
        try:
            art = SelectionArtifact.load(path, tokenizer=tok, examples=train)
            masks = art.loss_masks(train)
        except ValueError as e:
            raise UsageError(f"{path}: {_first_line(e)}") from None
        total = sum(int((ex["labels"] != -100).sum()) for ex in train)
        kept_fraction = sum(float(m.float().sum()) for m in masks.values()) / max(total, 1)
        ctx.say(f"[{desc}] retraining from θ0 with rule {art.rule!r}: "
                f"{100 * kept_fraction:.1f}% of trace tokens in the loss")
    else:
        ctx.say(f"[{desc}] plain SFT from θ0 (every trace token in the loss)")
    model = load_model(cfg["model"], cfg)
    callback = _accuracy_callback(cfg, tok, train, heldout, prune=False)
    trainer = T3STrainer(model=model, processing_class=tok, train_dataset=train,
                         callbacks=[callback], args=_training_args(cfg, work),
                         data_collator=PaddedCollator(tok.pad_token_id, loss_masks=masks))
    _progress_bar(trainer, cfg, desc)
    trainer.train()
    _save_log(trainer, work)
    _save_model(trainer, tok, work / "model")
    history = read_accuracy_history(work)
    return {"rule": None if artifact is None else art.rule, "kept_fraction": kept_fraction,
            "final_step": int(trainer.state.global_step), **_finals(history)}


def _stage_train(ctx: StageContext) -> Dict[str, Any]:
    """Retraining from θ0 with the selection artifact's loss masks."""
    if ctx.cfg["rule"] == "forced":
        raise UsageError(_FORCED_MSG)
    return _retrain(ctx, None if ctx.cfg["rule"] == "none" else "selection.parquet", "train")


def _stage_baseline(ctx: StageContext) -> Dict[str, Any]:
    """Retraining from θ0 with the baseline's loss masks."""
    return _retrain(ctx, "baseline.parquet", "baseline")


_FORCED_MSG = ("rule 'forced' marks the tokens a diffusion LM must reconstruct; it is not a loss "
               "mask, and `t3s train` trains autoregressive models. Use `t3s select --rule forced` "
               "to write the artifact for a diffusion trainer")

#: the models `t3s eval` compares: arm -> (stage, directory inside the stage)
ARMS = (("base", None, None), ("sft", "pilot", "final"), ("t3s", "train", "model"),
        ("baseline", "baseline", "model"))


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
    """Accuracy of θ0 and of every trained model available on the test set and the
    held-out set."""
    from .bottleneck import training_accuracy
    cfg, work = ctx.cfg, ctx.work
    sets = eval_sets(cfg)
    if not sets:
        ctx.say("[eval] no test set (--test or --heldout): nothing to evaluate")
        out = {"skipped": "no test set", "arms": {}}
        _write_json(work / "results.json", out)
        return out
    tok = load_tokenizer(cfg)
    data = {key: load_data(cfg, key, tok) for key, _ in sets}
    device = resolve_device(cfg)
    by_set: Dict[str, Dict[str, Any]] = {key: {} for key, _ in sets}
    for arm, stage, sub in ARMS:
        if stage is None:
            path = cfg["model"]
        elif ctx.dir(stage) is not None:
            path = str(ctx.dir(stage) / sub)
        else:
            continue
        model = load_model(path, cfg, device=device)
        for i, (key, _) in enumerate(sets):
            acc, details = training_accuracy(
                model, tok, data[key], verifier=cfg["verifier"], subset_size=None,
                max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["eval_batch_size"],
                seed=cfg["seed"], progress=cfg["progress"], return_details=True)
            # predictions: <arm>.jsonl for the primary set, <arm>.<set>.jsonl for the others
            fname = f"{arm}.jsonl" if i == 0 else f"{arm}.{key}.jsonl"
            with open(work / fname, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in details)
            by_set[key][arm] = {"accuracy": acc, "n": len(details),
                                "n_correct": int(sum(d["correct"] for d in details)),
                                "model": path}
            label = f"t3s (rule {cfg['rule']})" if arm == "t3s" else arm
            ctx.say(f"[eval] {key}: {label}: {acc:.3f} "
                    f"({by_set[key][arm]['n_correct']}/{len(details)})")
        del model
    key = sets[0][0]
    out = {"test_set": cfg[key], "test_key": key, "n": len(data[key]), "verifier": cfg["verifier"],
           "arms": by_set[key],
           "sets": {k: {"path": p, "n": len(data[k]), "arms": by_set[k]} for k, p in sets}}
    _write_json(work / "results.json", out)
    return {k: v for k, v in out.items() if k not in ("arms", "sets")} | {
        "accuracy": {a: v["accuracy"] for a, v in by_set[key].items()},
        "accuracy_by_set": {k: {a: v["accuracy"] for a, v in by_set[k].items()}
                            for k, _ in sets}}


def _stage_report(ctx: StageContext) -> Dict[str, Any]:
    """Figures, metrics.json and report.md from the current stages."""
    from .report import build_report
    dirs = {name: ctx.dir(name) for name in STAGE_NAMES if name != "report"}
    if not any(dirs.values()):
        raise UsageError(f"nothing to report in {ctx.run.path}: no stage has finished; run "
                         "`t3s run` (or `t3s pilot`) first")
    metrics = build_report(ctx.run.path, out_dir=ctx.work, stage_dirs=dirs, config=ctx.cfg)
    ctx.say(f"[report] {ctx.run.stage_dir('report') / 'report.md'}")
    return {"metrics": metrics}


_DATA = ("model", "tokenizer", "train", "max_length", "truncation", "dtype", "seed")
_TRAINING = ("batch_size", "grad_accum", "lr", "steps", "lr_scheduler", "warmup_steps",
             "weight_decay", "eval_steps", "eval_subset", "heldout", "max_new_tokens", "verifier")

STAGES: Tuple[Stage, ...] = (
    Stage("pilot", _stage_pilot, _DATA + _TRAINING, lambda cfg: (),
          help="SFT from θ0 with trajectory recording and training-accuracy evaluation"),
    Stage("select", _stage_select,
          ("delta", "agreement", "rule", "rule_params", "baseline", "baseline_params"),
          lambda cfg: ("pilot",),
          help="bottleneck, Δc and the mask artifact"),
    Stage("train", _stage_train, _DATA + _TRAINING + ("rule",),
          lambda cfg: () if cfg["rule"] == "none" else ("select",),
          help="masked retraining from θ0 with the artifact's masks"),
    Stage("baseline", _stage_baseline, _DATA + _TRAINING + ("baseline",),
          lambda cfg: ("select",), enabled=lambda cfg: cfg["baseline"] != "none",
          help="retraining from θ0 with the baseline's masks"),
    Stage("eval", _stage_eval, ("model", "tokenizer", "test", "heldout", "extra_test",
                                "max_new_tokens",
                                "verifier", "dtype", "max_length", "truncation", "seed"),
          lambda cfg: (), optional=("pilot", "train", "baseline"),
          help="accuracy on a JSONL test set with the verifier"),
    Stage("report", _stage_report, (), lambda cfg: (),
          optional=("pilot", "select", "train", "baseline", "eval"),
          help="figures and a Markdown summary"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
#: stages that load the model or the training data
NEEDS_MODEL = ("pilot", "select", "train", "baseline", "eval")
NEEDS_TRAIN = ("pilot", "select", "train", "baseline")
