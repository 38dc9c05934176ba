"""The analyze stage: the paper's diagnostics of a run (`t3s.analysis`), as figures,
``analysis.json`` and a section of the report.

What it computes, on a fixed random subset of ``examples`` training traces
(all of them with ``examples: 0``) and over a parameter subset (``last_layers``:
the last k decoder layers plus the head and final norm; default every parameter),
both stated in the outputs:

* **shock curves**: the pilot's loss and training / held-out accuracy per step, the
  bottleneck, and the share of trace tokens whose latest recorded confidence is
  still below θ0's (the pilot's trajectory against c(θ0) from select/);
* per retained checkpoint (θ0, the pilot's checkpoints, its final model; the T3S
  retraining's checkpoints and model when the train stage is current), each
  group's mean loss, the **gradient-norm ratio** ‖∇L_anchors‖ / ‖∇L_rest‖ and the
  **cosine** of the two gradients (the fused masked loss, one backward per group).
  Only θb is retained unless ``keep_checkpoints`` was on when the pilot ran;
* the **loss-transfer matrix** at the checkpoints in ``transfer_at`` (default θ0 and
  θb): ``transfer_steps`` SGD steps on one group, the loss change of each group.
  ``transfer_lr: auto`` picks, per checkpoint, the step that would lower the loss of
  all trace tokens by 1% to first order (0.01 · L / ‖∇L‖²);
* **static-signal AUC**: how well θ0's confidence, entropy and head-gradient norm
  recover the anchor set (ROC AUC; 0.5 is chance).

The groups are the selection artifact's: the tokens its rule leaves out of the
loss (the anchors under the anchor rule; under rule ``none``, which leaves none out,
the anchor rule's on the same Δc) and the other trace tokens, in the order ``groups``
gives. The gradient subset is bounded (``max_parameters``) and stated with its
gradient buffer and the seconds taken.

Bad parameters are refused before any stage runs (`analysis_settings`, from the
settings alone); what only the finished pilot tells (the checkpoints it retained,
the traces that survived ``truncation: drop``, the subset's size) is checked when the
stage starts, before any gradient.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._util import one_line
from . import rundir
from .engine import StageContext
from .loaders import load_data, load_model, load_tokenizer, resolve_device
from .report.diagnostics import render_section
from .rundir import read_json, write_json
from .settings import UsageError, params_over_defaults
from .training import checkpoints

__all__ = ["ANALYSIS_DEFAULTS", "analysis_settings", "group_names", "check_analyze",
           "stage_analyze"]

#: the analysis parameters (``--analysis-param KEY=VALUE``) and their defaults
ANALYSIS_DEFAULTS: Dict[str, Any] = {
    "examples": 64,          # training traces analysed (0: all)
    "batch_size": None,      # None: eval_batch_size
    "last_layers": None,     # None: every parameter; k: last k layers + head + final norm
    "max_parameters": 1_000_000_000,   # refuse a larger gradient subset (0: no limit)
    "groups": None,          # the two groups' order, e.g. "rest,anchors" (None: the rule's)
    "transfer_lr": "auto",   # SGD learning rate of the transfer matrix, or "auto"
    "transfer_steps": 1,     # SGD steps per row
    "transfer_at": ["theta0", "thetab"],   # also "final", "pilot:<step>", "train:<step>", "t3s_final"
    "seed": None,            # None: the run's seed (the example subset)
}

#: the names transfer_at accepts besides pilot:<step> / train:<step>
_NAMED_POINTS = ("theta0", "thetab", "final", "t3s_final")


def _int(params, key, low, allow_none=False):
    v = params[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UsageError(f"analysis parameter {key} must be an integer >= {low}, got {v!r}")
    return v


def _names(value) -> List[str]:
    parts = value.split(",") if isinstance(value, str) else (value or [])
    return [str(a).strip() for a in parts]


def group_names(rule: str) -> Tuple[str, str]:
    """The two groups of a run with selection rule ``rule``: the tokens the rule selects
    (the anchors under the anchor rule, and under rule ``none``, whose artifact leaves no
    token out, the analysis takes the anchor rule on the same Δc) and the rest."""
    return ("anchors", "rest") if rule in ("anchor", "none", "sft") else ("selected", "rest")


def _count_records(path) -> Optional[int]:
    """Non-blank lines of a JSONL file (None when it cannot be read: the loaders say why)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _decoder_layers(model_dir) -> Optional[int]:
    """The number of decoder layers config.json states (None when it states none)."""
    try:
        with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    conf = conf.get("text_config", conf) if isinstance(conf, dict) else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(conf.get(key), int):
            return conf[key]
    return None


def _saved_every(cfg: Mapping[str, Any]) -> int:
    """The step interval of the checkpoints a training stage saves (`checkpoint_args`: every
    gcd of checkpoint_steps and eval_steps, each evaluation a θb candidate)."""
    every = cfg.get("checkpoint_steps") or cfg["eval_steps"]
    return math.gcd(every, cfg["eval_steps"]) if cfg["eval_steps"] else every


def _check_transfer_at(at: Sequence[str], cfg: Mapping[str, Any],
                       pending: Optional[Sequence[str]]) -> None:
    """What the settings alone rule out: an unknown name, a step past the end or never
    saved, the T3S retraining's checkpoints of a diffusion run, and (when ``pending`` says
    the stage runs now) a step kept only with keep_checkpoints."""
    where = "analysis parameter transfer_at"
    steps, keep = int(cfg["steps"]), bool(cfg.get("keep_checkpoints"))
    every = _saved_every(cfg)
    for a in at:
        series, _, tail = a.partition(":")
        if a not in _NAMED_POINTS and not (series in ("pilot", "train") and tail.isdigit()):
            raise UsageError(f"{where}: unknown checkpoint {a!r} (theta0, thetab, final, "
                             "t3s_final, pilot:<step>, train:<step>)")
        if (a == "t3s_final" or series == "train") and cfg.get("objective", "ar") != "ar" \
                and a != "train:0":
            raise UsageError(f"{where}: {a} is a checkpoint of the diffusion LM (objective: "
                             "diffusion); only the pilot's checkpoints (the AR selector) are "
                             "analysed")
        if not tail.isdigit():
            continue
        step, stage = int(tail), "the pilot" if series == "pilot" else "the T3S retraining"
        if step in (0, steps):
            continue
        if step > steps:
            raise UsageError(f"{where}: {a} is past the last step of {stage} (steps: {steps})")
        if step % every:
            raise UsageError(f"{where}: {a} is never saved ({stage} saves a checkpoint every "
                             f"{every} step(s) and its final model at step {steps})")
        if pending is not None and (series if series == "pilot" else "train") in pending \
                and not keep:
            kept = "keeps only θb (name it thetab)" if series == "pilot" else \
                "keeps only its final model (t3s_final)"
            raise UsageError(f"{where}: {a} needs --keep-checkpoints: without it {stage} "
                             f"{kept}")


def analysis_settings(cfg: Mapping[str, Any],
                      pending: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``analysis_params`` over `ANALYSIS_DEFAULTS`, checked against the settings before
    any stage runs: UsageError on an unknown key, a bad value, ``examples`` above the
    training file's records (when given: the default is an upper bound), ``last_layers``
    above the model's decoder layers (config.json), unknown ``groups`` for the rule, or a
    ``transfer_at`` checkpoint the settings never save. ``pending``: the stages about to
    run (a checkpoint of one of them that only keep_checkpoints would keep is refused
    too); None when not known. What only the finished pilot tells is checked when the
    stage starts: the retained checkpoints in `check_analyze`, the surviving traces and
    the subset's size in `stage_analyze`."""
    p = params_over_defaults(cfg.get("analysis_params"), ANALYSIS_DEFAULTS, "analysis")
    p["examples"] = _int(p, "examples", 0)
    p["batch_size"] = _int(p, "batch_size", 1, True) or cfg["eval_batch_size"]
    p["last_layers"] = _int(p, "last_layers", 0, True)
    p["max_parameters"] = _int(p, "max_parameters", 0)
    p["transfer_steps"] = _int(p, "transfer_steps", 1)
    p["seed"] = cfg["seed"] if p["seed"] is None else _int(p, "seed", 0)
    lr = p["transfer_lr"]
    if lr != "auto":
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            lr = math.nan
        if not (lr > 0 and math.isfinite(lr)):
            raise UsageError(f"analysis parameter transfer_lr must be 'auto' or a positive "
                             f"number, got {p['transfer_lr']!r}")
    p["transfer_lr"] = lr
    known = group_names(cfg.get("rule", "anchor"))
    if p["groups"] is not None:
        order = _names(p["groups"])
        bad = [g for g in order if g not in known]
        if bad:
            raise UsageError(f"analysis parameter groups: unknown group(s) {', '.join(bad)} "
                             f"(this run's rule {cfg.get('rule')!r} gives {', '.join(known)})")
        if sorted(order) != sorted(known):
            raise UsageError(f"analysis parameter groups must name each of {', '.join(known)} "
                             f"once, got {p['groups']!r}")
        p["groups"] = order
    # the default (64) means "up to 64"; a number given asks for that many
    if p["examples"] and "examples" in (cfg.get("analysis_params") or {}) and cfg.get("train"):
        n = _count_records(cfg["train"])
        if n is not None and p["examples"] > n:
            raise UsageError(f"analysis parameter examples={p['examples']} but the training "
                             f"data {cfg['train']} holds {n} traces (0: all of them)")
    if p["last_layers"] is not None and cfg.get("model"):
        n = _decoder_layers(cfg["model"])
        if n is not None and p["last_layers"] > n:
            raise UsageError(f"analysis parameter last_layers={p['last_layers']} but the model "
                             f"{cfg['model']} has {n} decoder layers")
    # empty (``transfer_at=``): no transfer matrix
    p["transfer_at"] = [a for a in dict.fromkeys(_names(p["transfer_at"])) if a]
    _check_transfer_at(p["transfer_at"], cfg, pending)
    return p


# --------------------------------------------------------------------------------------
# The checkpoints
# --------------------------------------------------------------------------------------

def _points(ctx: StageContext, *, say: bool = True) -> List[Dict[str, Any]]:
    """Every retained model, as {"series": "pilot"/"t3s", "step", "label", "names", "path"};
    ``names`` are the transfer_at names that denote it (``say``: tell when the train stage's
    models are left out)."""
    cfg = ctx.cfg
    pilot_dir, pilot = ctx.dir("pilot"), ctx.input_record("pilot")["summary"]
    b, final = pilot.get("bottleneck_step"), int(pilot["final_step"])
    pts = [{"series": "pilot", "step": 0, "label": "θ0", "path": cfg["model"],
            "names": ["theta0", "pilot:0", "train:0"]}]
    found = checkpoints(pilot_dir)
    found.setdefault(final, pilot_dir / rundir.FINAL_MODEL_DIR)
    for step in sorted(found):
        names = [f"pilot:{step}"] + (["thetab"] if step == b else []) + \
            (["final"] if step == final else [])
        label = "θb" if step == b else ("SFT final" if step == final else f"pilot {step}")
        pts.append({"series": "pilot", "step": step, "label": label, "path": str(found[step]),
                    "names": names})
    train_dir = ctx.dir("train")
    if cfg.get("objective", "ar") != "ar":
        if say:
            ctx.say("[analyze] the train stage trained a diffusion LM: only the pilot's "
                    "checkpoints (the AR selector) are analysed")
        train_dir = None
    if train_dir is not None and (train_dir / rundir.MODEL_DIR).is_dir():
        t_final = int(ctx.input_record("train")["summary"]["final_step"])
        found = checkpoints(train_dir)
        found.setdefault(t_final, train_dir / rundir.MODEL_DIR)
        for step in sorted(found):
            pts.append({"series": "t3s", "step": step,
                        "label": "T3S final" if step == t_final else f"T3S {step}",
                        "path": str(found[step]),
                        "names": [f"train:{step}"] + (["t3s_final"] if step == t_final else [])})
    return pts


def _auto_lr(losses, grads, counts) -> float:
    """0.01 · L / ‖∇L‖² for L the mean loss over every group's tokens (disjoint groups)."""
    w = counts.double() / counts.double().sum()
    loss = float((w * losses).sum())
    g = (w.to(grads.device)[:, None] * grads.double()).sum(0)
    sq = float(g @ g)
    if not sq > 0:
        raise UsageError("the gradient of the trace tokens' loss is zero at a transfer "
                         "checkpoint; set --analysis-param transfer_lr=VALUE")
    return 0.01 * loss / sq


def _point_order(name: str):
    series, _, tail = name.partition(":")
    named = _NAMED_POINTS.index(name) if name in _NAMED_POINTS else len(_NAMED_POINTS)
    return (named, series, int(tail) if tail.isdigit() else 0, name)


def _bounded_subset(subset, model, p: Mapping[str, Any], n_groups: int) -> Dict[str, Any]:
    """`describe_subset` plus the gradient buffer (G × P float32); UsageError when P is over
    ``max_parameters`` (before any gradient is taken)."""
    from ..analysis import describe_subset
    desc = describe_subset(subset, model, last_layers=p["last_layers"])
    desc["gradient_bytes"] = 4 * n_groups * desc["parameters"]
    limit = p["max_parameters"]
    if limit and desc["parameters"] > limit:
        raise UsageError(
            f"the analysed parameters number {desc['parameters']:,} (> max_parameters="
            f"{limit:,}; their {n_groups} gradients would take "
            f"{desc['gradient_bytes'] / 2**30:.1f} GiB): set --analysis-param last_layers=K "
            "(the last K decoder layers plus the head), or max_parameters=0 for no limit")
    return desc


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------

def check_analyze(ctx: StageContext) -> None:
    """The analyze stage's check (`Stage.check`, before a previous analysis is replaced):
    the parameters, and every ``transfer_at`` name among the models the pilot and the
    retraining retained (UsageError naming the retained ones)."""
    p = analysis_settings(ctx.cfg)
    known = {n for pt in _points(ctx, say=False) for n in pt["names"]}
    missing = sorted(set(p["transfer_at"]) - known)
    if missing:
        raise UsageError(f"analysis parameter transfer_at: {', '.join(missing)} not retained in "
                         f"this run (retained: {', '.join(sorted(known, key=_point_order))}; "
                         "keep_checkpoints keeps every evaluated step)")


def _anchor_profile(ctx: StageContext, art, train, tok, c0_online) -> List[Dict[str, Any]]:
    """`t3s.analysis.anchor_profile` over every trace token of the run (Δc > 0 are the
    anchors), with θ0's confidence from the artifact or else ``c0_online`` (the online Δc
    file's ``example_id``, ``position``, ``c_0`` as an Arrow table; None when unread)."""
    from ..analysis import anchor_profile
    from ..data import TokenTable
    table = art.table.select("delta", *(["c0"] if "c0" in art.table else []))
    if "c0" not in table and c0_online is not None:
        try:
            c0 = TokenTable.from_arrow(c0_online.rename_columns(["example_id", "position", "c0"]))
            table = table.join(c0, how="inner")
        except ValueError as e:
            ctx.say(f"[analyze] anchors by θ0 confidence not computed: {one_line(e)}")
    try:
        return anchor_profile(table, train, tok)
    except ValueError as e:
        raise UsageError(f"anchor profile: {one_line(e)}") from None


def stage_analyze(ctx: StageContext) -> Dict[str, Any]:
    """Shock curves, per-checkpoint group losses / gradient ratio / cosine, transfer
    matrices and static-signal AUC; analysis.json, figures and analysis.md."""
    import pyarrow.parquet as pq

    from ..analysis import (below_initial, choose_examples, gradient_stats,
                            group_gradients, groups_from_artifact, make_batches,
                            member_of, parameter_subset, roc_curve, shock_curves,
                            signal_agreement, static_auc, static_signals, trajectory_signals,
                            transfer_matrix)
    from ..analysis import figures
    from ..artifact import SelectionArtifact, dataset_fingerprint, tokenizer_fingerprint
    from ..hf import lm_head
    from ..trajectory import TrajectoryReader
    t_start = time.perf_counter()
    cfg, work = ctx.cfg, ctx.work
    p = analysis_settings(cfg)
    points = _points(ctx)   # transfer_at among them: `check_analyze` ran before the stage
    wanted = set(p["transfer_at"])
    tok = load_tokenizer(cfg)
    train = load_data(cfg, "train", tok)
    if p["examples"] > len(train) and "examples" in (cfg.get("analysis_params") or {}):
        raise UsageError(f"analysis parameter examples={p['examples']} but the training data "
                         f"holds {len(train)} traces"
                         + (f" ({len(train.dropped)} dropped as too long)"
                            if getattr(train, "dropped", None) else "") + " (0: all of them)")
    fp, tfp = dataset_fingerprint(train), tokenizer_fingerprint(tok)
    sel_path = ctx.dir("select") / rundir.SELECTION_FILE
    try:
        art = SelectionArtifact.load(sel_path, tokenizer=tok, examples=train)
        if art.rule == "sft":   # rule none leaves no token out: the anchors of the same Δc
            art = art.reapply("anchor")
            ctx.say("[analyze] rule none leaves every token in the loss: the groups are the "
                    "anchor rule's (Δc > 0) on the same Δc")
        examples = choose_examples(list(train), p["examples"] or None, seed=p["seed"])
        # over all the data (the artifact covers it; load checked it), used on the subset
        groups = groups_from_artifact(art, train, check=False)
        if p["groups"] is not None:
            groups = {n: groups[n] for n in p["groups"]}
        names = list(groups)
        batches = make_batches(examples, groups, batch_size=p["batch_size"],
                               pad_token_id=tok.pad_token_id or 0)
    except (ValueError, KeyError) as e:
        raise UsageError(f"analysis of {sel_path}: {one_line(e)}") from None
    counts = sum(b.counts() for b in batches)
    ctx.say(f"[analyze] {len(examples)} of {len(train)} traces; groups "
            + ", ".join(f"{n} ({int(c)} tokens)" for n, c in zip(names, counts)))
    if not wanted:
        ctx.say("[analyze] transfer_at is empty: no loss-transfer matrix")
    device = resolve_device(cfg)

    result: Dict[str, Any] = {"format": "t3s.analysis", "version": 1,
                              "groups": {"names": names, "tokens": {n: int(c) for n, c in
                                                                   zip(names, counts)},
                                         "rule": art.rule},
                              "examples": {"analysed": len(examples), "of": len(train),
                                           "seed": p["seed"]},
                              "params": {k: v for k, v in p.items()}}
    rows, transfers = [], {}
    ratio: Dict[str, Dict[str, float]] = {}
    cosine: Dict[str, Dict[str, float]] = {}
    signals = head0 = model_0 = None
    seconds: Dict[str, Any] = {"checkpoints": {}, "transfer": {}}
    for pt in points:
        t_point = time.perf_counter()
        model = load_model(pt["path"], cfg, device=device)
        try:
            subset = parameter_subset(model, last_layers=p["last_layers"])
        except ValueError as e:
            raise UsageError(f"analysis parameter last_layers: {one_line(e)}") from None
        if "parameters" not in result:
            result["parameters"] = _bounded_subset(subset, model, p, len(names))
        # the logit map is the architecture's: measured by the probe once, at θ0
        head = lm_head(model) if head0 is None else \
            lm_head(model, verify=False, logit_scale=head0.logit_scale)
        head0 = head0 or head
        grads, losses = group_gradients(model, batches, subset, head=head, return_losses=True)
        st = gradient_stats(grads, names)
        row = {k: pt[k] for k in ("series", "step", "label", "path")}
        row.update(loss=dict(zip(names, losses.tolist())), grad_norm=st["norms"],
                   grad_norm_ratio=st["norm_ratio"], grad_cosine=st["cosine"],
                   grad_cosine_matrix=st["cosine_matrix"])
        rows.append(row)
        ratio.setdefault(pt["series"], {})[str(pt["step"])] = st["norm_ratio"]
        cosine.setdefault(pt["series"], {})[str(pt["step"])] = st["cosine"]
        for name in pt["names"]:
            if name in wanted and pt["label"] not in transfers:
                lr = p["transfer_lr"] if p["transfer_lr"] != "auto" else \
                    _auto_lr(losses, grads, counts)
                t_transfer = time.perf_counter()
                res = transfer_matrix(model, batches, names, subset, lr=lr,
                                      steps=p["transfer_steps"], head=head)
                seconds["transfer"][pt["label"]] = time.perf_counter() - t_transfer
                res.update(step=pt["step"], series=pt["series"], lr_rule=
                           "auto: 0.01·L/‖∇L‖²" if p["transfer_lr"] == "auto" else "given")
                transfers[pt["label"]] = res
        if pt["label"] == "θ0":
            t_static = time.perf_counter()
            signals = static_signals(model, examples, batch_size=p["batch_size"],
                                     pad_token_id=tok.pad_token_id or 0)
            seconds["static"] = time.perf_counter() - t_static
            # kept until θb: the trajectory signals compare the two token by token
            model_0 = model if any(q["label"] == "θb" for q in points) else None
        if pt["label"] == "θb" and model_0 is not None:
            t_traj = time.perf_counter()
            traj = trajectory_signals(model_0, model, examples, batch_size=p["batch_size"],
                                      pad_token_id=tok.pad_token_id or 0)
            result["trajectory_signals"] = signal_agreement(
                traj, member_of(traj, groups[names[0]]))
            result["trajectory_signals_set"] = names[0]
            seconds["trajectory_signals"] = time.perf_counter() - t_traj
            model_0 = None
        del model, grads
        seconds["checkpoints"][pt["label"]] = time.perf_counter() - t_point
        ctx.say(f"[analyze] {pt['label']} (step {pt['step']}): ‖∇{names[0]}‖/‖∇{names[1]}‖ "
                f"{st['norm_ratio']:.3g}, cosine {st['cosine']:+.3f}")
    if "t3s" in ratio:   # the T3S retraining starts at θ0 too
        ratio["t3s"] = {"0": rows[0]["grad_norm_ratio"], **ratio["t3s"]}
        cosine["t3s"] = {"0": rows[0]["grad_cosine"], **cosine["t3s"]}
        rows = rows + [{**rows[0], "series": "t3s"}]
        rows.sort(key=lambda r: (r["series"] != "pilot", r["step"]))
    result.update(checkpoints=rows, grad_norm_ratio=ratio, grad_cosine=cosine,
                  transfer_matrix=transfers)
    accuracy = {}
    for stage, key in (("pilot", "pilot"), ("train", "t3s")):
        d = ctx.dir(stage)
        if d is not None and (d / rundir.ACCURACY_FILE).is_file():
            acc = read_json(d / rundir.ACCURACY_FILE)
            accuracy[key] = {k: acc.get(k) or {} for k in ("train_acc", "heldout_acc")}
    result["accuracy"] = accuracy

    member = member_of(signals, groups[names[0]])
    try:
        aucs = static_auc(signals, member)
    except ValueError as e:
        raise UsageError(f"static-signal AUC: {one_line(e)}") from None
    result["static_auc"] = {k: v["auc"] for k, v in aucs.items()}
    result["static_separability"] = {k: v["separability"] for k, v in aucs.items()}
    result["static_auc_at"] = "θ0"
    result["static_auc_set"] = names[0]

    # shock curves and the share of tokens below θ0
    pilot_dir = ctx.dir("pilot")
    curves = shock_curves(read_json(pilot_dir / rundir.ACCURACY_FILE),
                          read_json(pilot_dir / rundir.LOG_HISTORY_FILE))
    below = c0_online = None
    delta_path = ctx.dir("select") / rundir.delta_file("online")
    try:
        # θ0's confidences, read once: the tokens below θ0 and the anchor profile use them
        c0_online = pq.read_table(delta_path, columns=["example_id", "position", "c_0"])
        traj = TrajectoryReader(pilot_dir / rundir.TRAJECTORY_DIR, dataset_fingerprint=fp,
                                tokenizer_fingerprint=tfp).read(
            ["step", "example_id", "position", "logprob"])
        below = below_initial(traj, c0_online.rename_columns(
            ["example_id", "position", "logprob"]))
    except (ValueError, OSError) as e:
        ctx.say(f"[analyze] tokens below θ0 not computed: {one_line(e)}")
    result["shock"] = {k: ({str(s): v for s, v in curves[k].items()} if isinstance(curves[k], dict)
                           else curves[k]) for k in curves}
    if below is not None:
        result["shock"]["below_theta0"] = {k: v.tolist() for k, v in below.items()}

    result["anchor_profile"] = _anchor_profile(ctx, art, train, tok, c0_online)

    figs = rundir.ANALYSIS_FIGURES
    shown: List[Tuple[str, str]] = []
    figures.plot_shock_curves(work / figs["shock"], curves, below)
    shown.append(("Pilot: loss, accuracy and trace tokens still below their θ0 confidence",
                  figs["shock"]))
    if transfers:
        figures.plot_transfer(work / figs["transfer"], transfers)
        shown.append(("Loss-transfer matrices (row: the group trained on; value: each group's "
                      "loss change)", figs["transfer"]))
    labels = {"pilot": "pilot (plain SFT)", "t3s": f"T3S ({art.rule})"}
    series = {labels[k]: {"step": [r["step"] for r in rows if r["series"] == k],
                          "ratio": [r["grad_norm_ratio"] for r in rows if r["series"] == k],
                          "cosine": [r["grad_cosine"] for r in rows if r["series"] == k]}
              for k in ratio}
    figures.plot_gradients(work / figs["gradients"], series, names=names,
                           marks={} if curves["bottleneck_step"] is None else
                           {"bottleneck": curves["bottleneck_step"]})
    shown.append(("Gradient-norm ratio and cosine per checkpoint", figs["gradients"]))
    figures.plot_roc(work / figs["static"], {k: roc_curve(signals[k], member) for k in aucs},
                     result["static_auc"], title=f"Static signals at θ0 vs the {names[0]}")
    shown.append((f"Static signals at θ0 against the {names[0]} (ROC)", figs["static"]))
    result["figures"] = [f for _, f in shown]
    result["seconds"] = {**seconds, "total": time.perf_counter() - t_start}
    write_json(work / rundir.ANALYSIS_FILE, result)
    (work / rundir.ANALYSIS_SECTION).write_text(render_section(result, shown), encoding="utf-8")
    return {"examples": len(examples), "parameters": result["parameters"]["parameters"],
            "last_layers": p["last_layers"], "checkpoints": len(rows),
            "transfer_at": list(transfers), "static_auc": result["static_auc"],
            "grad_norm_ratio_theta0": rows[0]["grad_norm_ratio"],
            "grad_cosine_theta0": rows[0]["grad_cosine"]}
