"""The extra comparison arms of a run (the ``arms`` setting): their masks and retraining.

An arm is a rule of `t3s.selection.RULES` (or an objective of
`t3s.pipeline.settings.BASELINE_OBJECTIVES`, e.g. ``dft``) retrained from θ0 with
the same steps and learning rate as T3S, like the baseline, so that one run compares
T3S with several of them.

* The select stage calls `signal_columns` when the rule, the baseline or an arm reads
  a trajectory signal (`t3s.selection.SIGNAL_COLUMNS`; `needs_signals`), and
  `select_arms`, which writes one mask artifact per arm (`rundir.arm_file`).
* The arms stage (`stage_arms`) retrains each arm into ``arms/<name>/`` (the train
  stage's files) and writes its summary there last (`rundir.SUMMARY_FILE`): an
  interrupted stage skips the arms that finished and continues the one that was cut
  off from its last checkpoint.
* `arm_models` lists the models the eval stage scores, as `t3s.pipeline.stages.ARMS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .. import dist
from .._util import one_line
from . import rundir
from .engine import StageContext
from .loaders import load_model, resolve_device
from .rundir import read_json, write_json
from ..dllm.pipeline import is_diffusion
from .settings import UsageError, arm_params, baseline_loss_options, mask_rule, rule_params

__all__ = ["needs_signals", "check_signals", "signal_columns", "write_comparison_mask",
           "select_arms", "write_selection_outputs", "stage_arms", "arm_models"]


def _signal_users(cfg: Mapping[str, Any]) -> List[str]:
    """The rule, baseline and arms that read a trajectory signal."""
    from ..selection import SIGNAL_COLUMNS
    names = [cfg["rule"], cfg["baseline"], *(cfg.get("arms") or ())]
    return [n for n in names if n in SIGNAL_COLUMNS]


def needs_signals(cfg: Mapping[str, Any]) -> bool:
    """Whether the select stage must compute the trajectory signals (θ0 vs θb)."""
    return bool(_signal_users(cfg))


def check_signals(cfg: Mapping[str, Any], thetab: Optional[Path]) -> None:
    """UsageError when a rule, the baseline or an arm reads a trajectory signal but the
    pilot's θb checkpoint ``thetab`` is missing."""
    users = _signal_users(cfg)
    if users and (thetab is None or not Path(thetab).is_dir()):
        raise UsageError(f"the trajectory-signal rules ({', '.join(dict.fromkeys(users))}) "
                         "compare θ0 with the pilot's θb checkpoint, which is missing; run the "
                         "pilot again (--redo pilot)")


def signal_columns(cfg: Mapping[str, Any], train, pad_token_id: Optional[int],
                   thetab: Optional[Path], table, say: Callable[[str], None]):
    """``table`` (a `t3s.TokenTable` over the trace tokens [T]) with the columns
    ``delta_entropy``, ``delta_logit_grad`` and ``kl`` [T] float32 of
    `t3s.analysis.trajectory_signals` from θ0 (``cfg["model"]``) to the pilot's θb
    checkpoint ``thetab``, over every training example; tokens the signals do not
    cover get 0. UsageError when θb is missing."""
    from ..analysis import trajectory_signals
    check_signals(cfg, thetab)
    device = resolve_device(cfg)
    model_0 = load_model(cfg["model"], cfg, device=device)
    model_b = load_model(str(thetab), cfg, device=device)
    try:
        sig = trajectory_signals(model_0, model_b, list(train), batch_size=cfg["eval_batch_size"],
                                 pad_token_id=pad_token_id or 0)
    finally:
        del model_0, model_b
    # the signals come sorted by (example_id, position): one code per key, so each of the
    # table's keys (any row order) is found by bisection
    width = int(max(table.position.max(initial=0), sig["position"].max(initial=0))) + 1
    code = table.example_id.astype(np.int64) * width + table.position.astype(np.int64)
    sig_code = sig["example_id"].astype(np.int64) * width + sig["position"].astype(np.int64)
    at = np.minimum(np.searchsorted(sig_code, code), max(sig_code.size - 1, 0))
    found = sig_code[at] == code if sig_code.size else np.zeros(code.size, dtype=bool)
    if not found.all():
        say(f"[select] {int((~found).sum())} trace tokens have no trajectory signal; theirs "
            "is set to 0")
    columns = {name: np.where(found, sig[name][at] if sig_code.size else 0.0, 0.0)
               .astype(np.float32) for name in ("delta_entropy", "delta_logit_grad", "kl")}
    say("[select] trajectory signals θ0 → θb for "
        + ", ".join(dict.fromkeys(_signal_users(cfg))))
    return table.with_columns(columns)


def write_comparison_mask(ctx: StageContext, art, what: str, name: str,
                          params: Mapping[str, Any], path: Path):
    """Rank 0 of the select stage: the mask of the comparison ``name`` (the baseline or
    an arm: ``what``) from the main artifact ``art`` with ``params``, saved to ``path``
    and said in one line; returns (the artifact, its `t3s.selection.SelectionSummary`)."""
    try:
        derived = art.reapply(mask_rule(name), **params)
    except ValueError as e:
        raise UsageError(f"{what} {name!r}: {one_line(e)}") from None
    derived.save(path)
    s = derived.summary()
    objective = baseline_loss_options(name)
    ctx.say(f"[select] {what} {name}: {s.n_masked} of {s.n_tokens} tokens left out "
            f"({100 * (s.fraction_masked or 0):.1f}%)"
            + (f"; loss options {objective}" if objective else "")
            + ("; it keeps no token, so its retraining learns nothing"
               if s.n_masked == s.n_tokens else ""))
    return derived, s


def select_arms(ctx: StageContext, art, kept: Optional[int]) -> Dict[str, Any]:
    """Rank 0 of the select stage: the mask artifact of every arm, from the main
    artifact ``art`` (its stored columns), written as `rundir.arm_file`; ``kept`` is
    how many tokens the main rule keeps (`t3s.pipeline.settings.arm_params`).
    Returns {name: {"masked_fraction", "kept_tokens", "params"}}."""
    out: Dict[str, Any] = {}
    n_tokens = len(art.table)
    for name in ctx.cfg.get("arms") or ():
        if kept is None:   # refused by the settings (rule forced); an invariant here
            raise UsageError(f"arm {name!r} needs the rule's loss mask for its budget")
        arm_art, s = write_comparison_mask(ctx, art, "arm", name,
                                           arm_params(ctx.cfg, name, kept, n_tokens),
                                           ctx.work / rundir.arm_file(name))
        out[name] = {"masked_fraction": s.fraction_masked, "kept_tokens": s.n_tokens - s.n_masked,
                     "params": arm_art.params}
    return out


def write_selection_outputs(ctx: StageContext, art, fields: Mapping[str, Any]) -> Dict[str, Any]:
    """Rank 0 of the select stage: the main artifact ``art`` saved, the baseline's and the
    arms' masks derived from it, and the stage summary (``fields``, the source's own
    numbers: bottleneck, Δc source and agreement, plus the artifact's) written and
    returned."""
    cfg, work = ctx.cfg, ctx.work
    art.save(work / rundir.SELECTION_FILE)
    summary = art.summary()
    kept = (int(np.count_nonzero(art.table["loss_mask"]))
            if art.mask_column == "loss_mask" else None)
    out = {**fields, "rule": cfg["rule"], "rule_params": art.params,
           "mask_column": art.mask_column, "n_tokens": summary.n_tokens,
           "n_examples": summary.n_examples, "masked_fraction": summary.fraction_masked,
           "kept_tokens": kept, "anchor_fraction": summary.fraction_positive,
           "baseline": cfg["baseline"]}
    ctx.say(f"[select] rule {cfg['rule']}: {summary.n_masked} of {summary.n_tokens} trace "
            f"tokens {'forced' if art.mask_column == 'forced' else 'left out of the loss'} "
            f"({100 * (summary.fraction_masked or 0):.1f}%)")
    if cfg["baseline"] != "none" and not is_diffusion(cfg):  # diffusion: drawn by its stage
        base_art, bs = write_comparison_mask(ctx, art, "baseline", cfg["baseline"],
                                             rule_params(cfg, "baseline", budget=kept),
                                             work / rundir.BASELINE_FILE)
        out.update(baseline_params=base_art.params, baseline_masked_fraction=bs.fraction_masked)
    if cfg.get("arms"):
        out["arms"] = select_arms(ctx, art, kept)
    write_json(work / rundir.SUMMARY_FILE, out)
    return out


def _arm_state(work: Path) -> Tuple[Optional[Dict[str, Any]], bool]:
    """Rank 0: (the summary of an arm that finished, whether its directory was started);
    the directory made."""
    done = work / rundir.SUMMARY_FILE
    if done.is_file():
        return read_json(done), True
    started = work.is_dir()
    work.mkdir(parents=True, exist_ok=True)
    return None, started


def stage_arms(ctx: StageContext, retrain: Callable[..., Dict[str, Any]]) -> Dict[str, Any]:
    """The arms stage: every arm of ``arms`` retrained from θ0 with its mask (and its
    loss options: dft) by ``retrain`` (the train stage's retraining), into
    ``arms/<name>/``. Returns {name: that arm's retraining summary}."""
    results: Dict[str, Any] = {}
    for name in ctx.cfg["arms"]:
        work = ctx.work / name
        finished, started = dist.on_main(_arm_state, work)
        if finished is not None:
            ctx.say(f"[arms] {name}: finished before the interruption")
            results[name] = finished
            continue
        summary = retrain(ctx, ctx.dir("select") / rundir.arm_file(name), f"arms/{name}",
                          baseline_loss_options(name), work=work,
                          resume=bool(ctx.resume and started))
        if dist.is_main():   # written last: the arm is finished
            write_json(work / rundir.SUMMARY_FILE, summary)
        results[name] = summary
    return results if dist.is_main() else {}


def arm_models(ctx: StageContext) -> List[Tuple[str, str, str]]:
    """(arm, "arms", its model directory inside arms/) of every arm the current arms
    stage trained, for the eval stage."""
    record = ctx.input_record("arms") or {}
    return [(name, "arms", f"{name}/{rundir.MODEL_DIR}") for name in record.get("summary") or {}]
