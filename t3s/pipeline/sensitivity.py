"""The sensitivity stage: how much T3S's result depends on the bottleneck it chose.

T3S takes the bottleneck θb at the argmin of the pilot's training accuracy; the
paper names the sensitivity to that choice as its first limitation. This stage
retrains T3S from the anchor masks (Δc > 0 left out of the loss) taken at other
steps of the pilot and scores each retrained model on every eval set.

The choices (each a step of the pilot's evaluations after θ0; `sensitivity_steps`):

=================  ===================================================================
train_acc_min      argmin of training accuracy (the default bottleneck b)
heldout_acc_min    argmin of held-out accuracy (skipped without a held-out set)
train_loss_min     the evaluated step with the lowest training loss, where an evaluated
                   step's loss is the one logged at the latest logging step at or below
                   it *(choice: the Trainer logs at step s the loss of update s, taken
                   before that update, so it is the last loss known when θs is evaluated;
                   every evaluated step after θ0 then has one)*
before_k, after_k  the evaluated steps k evaluations before / after b (``offsets``)
random_i           ``n_random`` evaluated steps drawn uniformly without replacement
                   (seeded) within ±``radius`` evaluations of b, b excluded
=================  ===================================================================

Every mask is the anchor rule (threshold 0) on the online Δc at that step: the
pilot's trajectory at the step against c(θ0) from the select stage's profile, as
the select stage computes it for b. Choices that land on the same step are
trained once. The default b is not retrained when the train stage is current and
trained this very mask (rule anchor, online Δc): its model, and the eval stage's
numbers when that is current, are reused (``reused``).

Outputs, in the stage directory (names: `t3s.pipeline.rundir`): ``step-<s>/``
per trained step (``selection.parquet``, the retraining in ``retrain/``, its
``result.json`` written last: a finished step is skipped when an interrupted
stage resumes; an interrupted retraining continues from its checkpoint),
``sensitivity.json``, ``sensitivity.png`` and ``sensitivity.md`` (the report's
section; `t3s.pipeline.report.sensitivity`).

The stage runs in one process: under a launcher it is refused up front.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .. import dist
from .._util import one_line
from . import rundir
from .engine import StageContext
from .generators import EvalEngine
from .loaders import load_data, load_model, load_tokenizer, resolve_device
from .report.sensitivity import plot_sensitivity, render_section
from .rundir import read_json, write_json
from .scoring import score_on_sets
from .settings import UsageError, params_over_defaults

__all__ = ["SENSITIVITY_DEFAULTS", "CHOICE_KINDS", "choice_names", "sensitivity_settings",
           "logged_losses", "sensitivity_steps", "check_sensitivity", "stage_sensitivity"]

#: the sensitivity parameters (``--sensitivity-param KEY=VALUE``) and their defaults
SENSITIVITY_DEFAULTS: Dict[str, Any] = {
    "offsets": [1, 2],   # before_k / after_k for each k (evaluations from b)
    "n_random": 2,       # random_1 .. random_n
    "radius": 3,         # random steps within ±radius evaluations of b
    "choices": None,     # None: every choice; else kinds or names, e.g. "before,random_1"
    "seed": None,        # None: the run's seed (the random draws)
}

#: the kinds of choice, in the order they are listed
CHOICE_KINDS = ("train_acc_min", "heldout_acc_min", "train_loss_min", "before", "after",
                "random")


def choice_names(offsets: Sequence[int], n_random: int) -> List[str]:
    """Every choice name the parameters give, in listing order."""
    return (["train_acc_min", "heldout_acc_min", "train_loss_min"]
            + [f"before_{k}" for k in offsets] + [f"after_{k}" for k in offsets]
            + [f"random_{i}" for i in range(1, n_random + 1)])


def _int_param(p: Mapping[str, Any], key: str, low: int) -> int:
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UsageError(f"sensitivity parameter {key} must be an integer >= {low}, got {v!r}")
    return v


def _list_param(value: Any) -> List[Any]:
    """A list from a list, a single value or a comma-separated string."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [value]


def sensitivity_settings(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``sensitivity_params`` over `SENSITIVITY_DEFAULTS`, checked from the settings alone
    (UsageError on an unknown key or choice, a bad value, the diffusion objective, or a
    launcher). Returns the parameters with ``names``: the choices to run."""
    p = params_over_defaults(cfg.get("sensitivity_params"), SENSITIVITY_DEFAULTS, "sensitivity")
    offsets = []
    for k in _list_param(p["offsets"]):
        try:
            k = None if isinstance(k, bool) else int(str(k))
        except ValueError:
            k = None
        if k is None or k < 1:
            raise UsageError(f"sensitivity parameter offsets must be integers >= 1 (e.g. "
                             f"offsets=1,2), got {p['offsets']!r}")
        offsets.append(k)
    p["offsets"] = sorted(set(offsets))
    p["n_random"] = _int_param(p, "n_random", 0)
    p["radius"] = _int_param(p, "radius", 1)
    p["seed"] = cfg["seed"] if p["seed"] is None else _int_param(p, "seed", 0)
    names = choice_names(p["offsets"], p["n_random"])
    if p["choices"] is None:
        chosen = names
    else:
        asked = [str(c) for c in _list_param(p["choices"])]
        known = list(CHOICE_KINDS) + [n for n in names if n not in CHOICE_KINDS]
        bad = [c for c in asked if c not in known]
        if bad or not asked:
            raise UsageError(f"sensitivity parameter choices: unknown choice(s) "
                             f"{', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
        chosen = [n for n in names if n in asked or n.rsplit("_", 1)[0] in asked]
        if not chosen:
            raise UsageError(f"sensitivity parameter choices={p['choices']!r} selects nothing "
                             f"under offsets={p['offsets']} and n_random={p['n_random']}")
        p["choices"] = asked
    p["names"] = chosen
    if cfg.get("objective", "ar") != "ar":
        raise UsageError("the sensitivity stage retrains the autoregressive model; it does not "
                         "apply to objective diffusion")
    if dist.world_size() > 1 or dist.launched_world_size() > 1:
        raise UsageError("the sensitivity stage runs in one process; start `t3s sensitivity` "
                         "directly, not under a launcher (torchrun / accelerate launch)")
    return p


# --------------------------------------------------------------------------------------
# Choosing the steps (pure)
# --------------------------------------------------------------------------------------

def _argmin(series: Mapping[int, float], steps: Sequence[int]) -> Optional[int]:
    """The step of ``steps`` (ascending) with the lowest value; ties: the earliest."""
    best_step, best = None, float("inf")
    for s in steps:
        if s in series and float(series[s]) < best:
            best_step, best = s, float(series[s])
    return best_step


def logged_losses(log_history: Sequence[Mapping[str, Any]]) -> Dict[int, float]:
    """step -> training loss from a Trainer log history (`rundir.LOG_HISTORY_FILE`): the
    entries with ``loss`` (the end-of-training summary's ``train_loss`` is not one)."""
    return {int(e["step"]): float(e["loss"]) for e in log_history
            if isinstance(e, Mapping) and "loss" in e and "step" in e}


def sensitivity_steps(train_acc: Mapping[int, float], heldout_acc: Optional[Mapping[int, float]],
                      train_loss: Mapping[int, float], *, offsets: Sequence[int] = (1, 2),
                      n_random: int = 2, radius: int = 3, seed: int = 0,
                      choices: Optional[Sequence[str]] = None
                      ) -> Tuple[Dict[str, int], Dict[str, str]]:
    """The step of each choice (module docstring), from the pilot's curves.

    train_acc / heldout_acc: step -> accuracy at the evaluated steps (step 0 is θ0, never
    a choice); heldout_acc None or empty without a held-out set. train_loss: step ->
    logged training loss (`logged_losses`). choices: the names to compute (default every
    `choice_names`).

    Returns (name -> step, name -> why it was skipped), both in listing order; a
    name is in exactly one of them. ValueError when no step after θ0 was evaluated.
    """
    import numpy as np

    from ..bottleneck import INITIAL_STEP, find_bottleneck
    evaluated = sorted(s for s in train_acc if s != INITIAL_STEP)
    if not evaluated:
        raise ValueError("the pilot evaluated no step after θ0, so it has no bottleneck")
    b = find_bottleneck(train_acc)
    i = evaluated.index(b)
    steps: Dict[str, int] = {}
    skipped: Dict[str, str] = {}
    steps["train_acc_min"] = b
    held = sorted(s for s in (heldout_acc or {}) if s != INITIAL_STEP)
    if held:
        steps["heldout_acc_min"] = _argmin(heldout_acc, held)
    else:
        skipped["heldout_acc_min"] = "no held-out set (no held-out accuracy after θ0)"
    logged = sorted(train_loss)
    # the loss of each evaluated step: the latest logged at or below it
    at_eval = {}
    for e in evaluated:
        below = [s for s in logged if s <= e]
        if below:
            at_eval[e] = float(train_loss[below[-1]])
    if at_eval:
        steps["train_loss_min"] = _argmin(at_eval, evaluated)
    else:
        skipped["train_loss_min"] = "no training loss was logged at or before an evaluated step"
    first, last = evaluated[0], evaluated[-1]
    for k in offsets:
        if i - k >= 0:
            steps[f"before_{k}"] = evaluated[i - k]
        else:
            skipped[f"before_{k}"] = (f"{k} evaluation(s) before b={b} is before the first "
                                      f"evaluated step after θ0 ({first})")
    for k in offsets:
        if i + k < len(evaluated):
            steps[f"after_{k}"] = evaluated[i + k]
        else:
            skipped[f"after_{k}"] = (f"{k} evaluation(s) after b={b} is past the last "
                                     f"evaluated step ({last})")
    pool = [s for s in evaluated[max(0, i - radius):i + radius + 1] if s != b]
    drawn = sorted(int(s) for s in np.random.default_rng(seed).choice(
        pool, size=min(n_random, len(pool)), replace=False)) if pool else []
    for j in range(1, n_random + 1):
        if j <= len(drawn):
            steps[f"random_{j}"] = drawn[j - 1]
        else:
            skipped[f"random_{j}"] = (f"only {len(pool)} evaluated step(s) other than b within "
                                      f"±{radius} evaluations of b={b}")
    order = choice_names(offsets, n_random)
    keep = set(order if choices is None else choices)
    return ({n: steps[n] for n in order if n in steps and n in keep},
            {n: skipped[n] for n in order if n in skipped and n in keep})


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------

def check_sensitivity(ctx: StageContext) -> None:
    """The stage's check (`Stage.check`, before earlier outputs are replaced): the
    parameters, the pilot's bottleneck and the select stage's θ0 profile."""
    sensitivity_settings(ctx.cfg)
    if ctx.input_record("pilot")["summary"].get("bottleneck_step") is None:
        raise UsageError("the pilot evaluated no step after θ0, so it has no bottleneck")
    if not (ctx.dir("select") / rundir.PROFILE_DIR).is_dir():
        raise UsageError(f"the select stage's θ0 profile ({rundir.PROFILE_DIR}/) is missing; "
                         "run it again (--redo select)")


def _theta0_profile(store: Path, fp: str, tfp: str):
    """c(θ0) of every trace token (step 0 of the select stage's profile store), as
    `t3s.profile` returns it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..trajectory import TrajectoryReader, first_visit
    table = TrajectoryReader(store, dataset_fingerprint=fp, tokenizer_fingerprint=tfp).read()
    return first_visit(table.filter(pc.equal(table["step"], pa.scalar(0, pa.int32()))))


def _reusable_default(ctx: StageContext, default_mask) -> Optional[str]:
    """Why the train stage's model is this stage's default-bottleneck model (None: it is
    not): current, trained under rule anchor (threshold 0) on the online Δc, and its
    artifact's mask equals ``default_mask`` (loss_mask, aligned to the same keys)."""
    import numpy as np

    from ..artifact import SelectionArtifact
    train_dir, select = ctx.dir("train"), ctx.input_record("select")["summary"]
    if train_dir is None or not (train_dir / rundir.MODEL_DIR).is_dir():
        return None
    if ctx.input_record("train")["summary"].get("rule") != "anchor" or \
            select.get("delta_source") != "online" or \
            float((select.get("rule_params") or {}).get("threshold", 0.0)) != 0.0:
        return None
    art = SelectionArtifact.load(ctx.dir("select") / rundir.SELECTION_FILE)
    if not art.table.same_keys(default_mask) or not np.array_equal(
            art.table["loss_mask"], default_mask["loss_mask"]):
        return None
    return "the train stage trained this mask (rule anchor, online Δc at b)"


def _eval_reuse(ctx: StageContext, sets) -> Optional[Dict[str, Dict[str, Any]]]:
    """The eval stage's T3S numbers per set, when it is current and scored every set."""
    d = ctx.dir("eval")
    if d is None or ctx.dir("train") is None or not (d / rundir.RESULTS_FILE).is_file():
        return None
    res = read_json(d / rundir.RESULTS_FILE).get("sets") or {}
    try:
        return {k: {"accuracy": res[k]["arms"]["t3s"]["accuracy"],
                    "n": res[k]["arms"]["t3s"]["n"]} for k, _ in sets}
    except KeyError:
        return None


def _evaluate(ctx: StageContext, model_dir: Path, sets, data, tok, out: Path
              ) -> Dict[str, Dict[str, Any]]:
    """Accuracy and n of a model on every eval set, as the eval stage scores it
    (`t3s.pipeline.scoring.score_on_sets`); the predictions written into ``out``."""
    if not sets:
        return {}
    # *(choice)* an engine per model: retraining runs between two evaluations here
    with EvalEngine(ctx.cfg, tok) as gen:
        engine = gen.for_model(str(model_dir))
        model = None if engine is not None else \
            load_model(str(model_dir), ctx.cfg, device=resolve_device(ctx.cfg))
        return score_on_sets(model, tok, data, sets, ctx.cfg, out, "t3s", engine)


#: retrain(ctx, artifact path, label, *, work, resume) -> the training summary
#: (`t3s.pipeline.stages`' retraining, given by the stage that registers this one)
Retrain = Callable[..., Dict[str, Any]]


def stage_sensitivity(ctx: StageContext, *, retrain: Retrain,
                      delta_table: Callable[[Any, Any], Tuple[Any, int]],
                      sets: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    """Retrain T3S from the anchor mask at each choice's step and score it.

    retrain: the training stages' retraining (`stages._retrain`); delta_table: the select
    stage's Δc table over every profiled token (``(c0, online) -> (TokenTable, unvisited)``);
    sets: (key, path) of the eval sets, the headline one first (`stages.eval_sets`).
    """
    import numpy as np

    from .. import online_delta
    from ..artifact import SelectionArtifact, dataset_fingerprint, tokenizer_fingerprint
    from ..trainer import read_accuracy_history
    from ..trajectory import TrajectoryReader
    cfg, work = ctx.cfg, ctx.work
    p = sensitivity_settings(cfg)
    pilot_dir = ctx.dir("pilot")
    history = read_accuracy_history(pilot_dir / rundir.ACCURACY_FILE)
    losses = logged_losses(read_json(pilot_dir / rundir.LOG_HISTORY_FILE))
    steps, skipped = sensitivity_steps(
        history["train_acc"], history["heldout_acc"], losses, offsets=p["offsets"],
        n_random=p["n_random"], radius=p["radius"], seed=p["seed"], choices=p["names"])
    b = ctx.input_record("pilot")["summary"]["bottleneck_step"]
    for name, why in skipped.items():
        ctx.say(f"[sensitivity] {name}: skipped ({why})")
    by_step: Dict[int, List[str]] = {}
    for name, s in steps.items():
        by_step.setdefault(s, []).append(name)
    ctx.say(f"[sensitivity] bottleneck b={b}; {len(steps)} choice(s) on {len(by_step)} step(s): "
            + ", ".join(f"{s} ({', '.join(n)})" for s, n in sorted(by_step.items())))

    if not sets:
        ctx.say("[sensitivity] no eval set (--test or --heldout): the retrained models are "
                "not scored")
    tok = load_tokenizer(cfg)
    train = load_data(cfg, "train", tok)
    data = {key: load_data(cfg, key, tok) for key, _ in sets}
    fp, tfp = dataset_fingerprint(train), tokenizer_fingerprint(tok)
    try:  # the same inputs as the select stage's online Δc: θ0's profile, the trajectory
        c0 = _theta0_profile(ctx.dir("select") / rundir.PROFILE_DIR, fp, tfp)
        visits = TrajectoryReader(pilot_dir / rundir.TRAJECTORY_DIR, dataset_fingerprint=fp,
                                  tokenizer_fingerprint=tfp).read()
    except ValueError as exc:
        raise UsageError(f"the pilot's trajectory or the θ0 profile cannot be used: "
                         f"{one_line(exc)}; run them again (--redo pilot)") from None

    def artifact_at(step: int):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            online = online_delta(visits, step, initial=c0)
        for w in caught:   # a step after the last recorded one: said, as the select stage warns
            ctx.say(f"[sensitivity] step {step}: {one_line(w.message)}")
        table, unvisited = delta_table(c0, online)
        art = SelectionArtifact.create(
            table, examples=train, tokenizer=tok, rule="anchor", params={},
            selector=cfg["model"], theta0=cfg["model"],
            extra={"delta_source": "online", "bottleneck_step": step,
                   "unvisited_tokens": unvisited, "sensitivity": by_step.get(step, [])})
        return art

    default = artifact_at(b)
    default_anchors = ~np.asarray(default.table["loss_mask"], bool)
    reuse_why = _reusable_default(ctx, default.table)

    results: Dict[int, Dict[str, Any]] = {}
    for s, names in sorted(by_step.items()):
        d = work / rundir.sensitivity_dir(s)
        label = f"step {s} ({', '.join(names)})"
        if (d / rundir.SENSITIVITY_RESULT).is_file():
            results[s] = read_json(d / rundir.SENSITIVITY_RESULT)
            ctx.say(f"[sensitivity] {label}: already done (from the interrupted attempt)")
            continue
        d.mkdir(parents=True, exist_ok=True)
        art = default if s == b else artifact_at(s)
        art.save(d / rundir.SELECTION_FILE)
        anchors = ~np.asarray(art.table["loss_mask"], bool)
        union = int(np.count_nonzero(anchors | default_anchors))
        res: Dict[str, Any] = {
            "step": s, "choices": names, "anchor_fraction": float(anchors.mean()),
            # Jaccard of the dropped tokens; two empty anchor sets are the same set
            "mask_overlap_with_default": (int(np.count_nonzero(anchors & default_anchors))
                                          / union if union else 1.0),
            "reused": False, "model": None, "training": None}
        if s == b and reuse_why is not None:
            model_dir = ctx.dir("train") / rundir.MODEL_DIR
            shown = Path("train") / rundir.MODEL_DIR
            scores = _eval_reuse(ctx, sets)
            ctx.say(f"[sensitivity] {label}: reusing the train stage's model, not retraining "
                    f"({reuse_why})" + ("; its accuracy from the eval stage" if scores else ""))
            if scores is None:
                scores = _evaluate(ctx, model_dir, sets, data, tok, d)
            res.update(reused=True, training=ctx.input_record("train")["summary"])
        else:
            ctx.say(f"[sensitivity] {label}: retraining from θ0 with the anchors at step {s}")
            retrain_dir = d / rundir.SENSITIVITY_RETRAIN_DIR
            resume = ctx.resume and retrain_dir.is_dir()
            retrain_dir.mkdir(exist_ok=True)
            res["training"] = retrain(ctx, d / rundir.SELECTION_FILE, "sensitivity",
                                      work=retrain_dir, resume=resume)
            model_dir = retrain_dir / rundir.MODEL_DIR
            shown = Path(ctx.name) / model_dir.relative_to(work)
            scores = _evaluate(ctx, model_dir, sets, data, tok, d)
        # the model's path relative to the run directory (the stage directory is renamed)
        res.update(model=shown.as_posix(), accuracy={k: v["accuracy"] for k, v in scores.items()},
                   n={k: v["n"] for k, v in scores.items()})
        for key, v in scores.items():
            ctx.say(f"[sensitivity] {label}: {key}: {v['accuracy']:.3f} (n={v['n']})")
        write_json(d / rundir.SENSITIVITY_RESULT, res)   # last: the step is finished
        results[s] = res

    keys = [k for k, _ in sets]
    choices = {}
    for name, s in steps.items():
        r = results[s]
        choices[name] = {"step": s, "anchor_fraction": r["anchor_fraction"],
                         "mask_overlap_with_default": r["mask_overlap_with_default"],
                         "accuracy": {k: r["accuracy"].get(k) for k in keys},
                         "n": {k: r["n"].get(k) for k in keys}, "reused": r["reused"],
                         "same_step_as": [n for n in by_step[s] if n != name],
                         "model": r["model"]}
    out = {"format": "t3s.sensitivity", "version": 1, "bottleneck_step": b,
           "evaluated_steps": sorted(s for s in history["train_acc"] if s != 0),
           "choices": choices, "skipped": skipped,
           "params": {k: v for k, v in p.items() if k != "names"},
           "sets": keys, "headline_set": keys[0] if keys else None,
           "train_loss_at_evaluation": "the latest logged training loss at or below the step",
           "pilot_train_acc": {str(s): a for s, a in sorted(history["train_acc"].items())}}
    plot_sensitivity(work / rundir.SENSITIVITY_FIGURE, out)
    (work / rundir.SENSITIVITY_SECTION).write_text(render_section(out), encoding="utf-8")
    write_json(work / rundir.SENSITIVITY_FILE, out)
    head = keys[0] if keys else None
    return {"bottleneck_step": b, "steps": {n: s for n, s in steps.items()},
            "trained": sum(1 for r in results.values() if not r["reused"]),
            "reused": [n for n, c in choices.items() if c["reused"]], "skipped": list(skipped),
            "accuracy": {n: (c["accuracy"].get(head) if head else None)
                         for n, c in choices.items()}}
