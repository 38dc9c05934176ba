"""``metrics.json`` and ``report.md`` for a T3S run, with its figures.

`build_report` reads a run directory (its layout: `t3s.pipeline.rundir`) and
writes, into ``out_dir``:

* the figures of `t3s.pipeline.plots`: ``shock.png`` (loss and accuracy per
  step, bottleneck marked), ``delta_hist.png`` (Δc per trace token) and
  ``traces.png`` (a few traces, anchors highlighted);
* ``metrics.json``: `METRIC_KEYS` first (null when the run does not have the
  number), then details (`collect_metrics`);
* ``report.md``: what the run is (the task, each arm, the terms), the table
  and plain statements of what happened, computed from the numbers only
  (`render_markdown`). Every accuracy names its set and size: the eval sets
  are scored whole, the curves during training on ``eval_subset`` problems.

Size: about 680 lines, because the numbers (`collect_metrics`) and the text that
states them (`render_markdown`) change together; split apart, every new metric
would be edited across two modules.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import rundir
from .loaders import load_data, load_tokenizer
from .plots import plot_delta_histogram, plot_shock, plot_traces
from .report_arms import (arm_color, arm_description, arm_label, arm_metrics, arm_name,
                          arm_names)
from .rundir import STAGE_NAMES, RunDir, read_json
from .sensitivity_report import report_section

__all__ = [
    "METRIC_KEYS",
    "build_report",
    "collect_metrics",
    "render_markdown",
    "shown_path",
    "demo_writeup",
    "stage_history",
    "stage_summary",
]

#: The keys every metrics.json starts with, in this order (null when not available).
METRIC_KEYS = ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "bottleneck_step",
               "masked_fraction", "mask_agreement")

# --------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------

def stage_history(stage_dir: Optional[Path]) -> Dict[str, Any]:
    """{"train_acc", "heldout_acc": {step: acc}, "loss": {step: loss}, "bottleneck_step"}."""
    out: Dict[str, Any] = {"train_acc": {}, "heldout_acc": {}, "loss": {}}
    if stage_dir is None:
        return out
    acc = stage_dir / rundir.ACCURACY_FILE
    if acc.is_file():
        data = read_json(acc)
        for key in ("train_acc", "heldout_acc"):
            out[key] = {int(s): float(a) for s, a in (data.get(key) or {}).items()}
        out["bottleneck_step"] = data.get("bottleneck_step")
        out["train_answers"] = {int(k): list(v) for k, v in
                                (data.get("train_answers") or {}).items()}
        settings = data.get("settings") or {}
        out["eval_n"] = settings.get("subset_size")
        out["heldout_eval_n"] = settings.get("heldout_subset_size", settings.get("subset_size"))
    log = stage_dir / rundir.LOG_HISTORY_FILE
    if log.is_file():
        for entry in read_json(log):
            if isinstance(entry, dict) and "loss" in entry and "step" in entry:
                out["loss"][int(entry["step"])] = float(entry["loss"])
    return out


def stage_summary(stage_dir: Optional[Path]) -> Dict[str, Any]:
    """The ``summary`` of a stage's record (``stage.json``); {} when there is none."""
    if stage_dir is None or not (stage_dir / rundir.RECORD_FILE).is_file():
        return {}
    return dict(read_json(stage_dir / rundir.RECORD_FILE).get("summary") or {})


def _stage_dirs_and_config(run_dir: Path, stage_dirs, config):
    """The stage directories (default: every stage in the ledger) and the settings
    (default: the run's config.json) a report uses."""
    run = RunDir(run_dir)
    if stage_dirs is None:
        ledger = run.ledger()
        stage_dirs = {name: (run.stage_dir(name) if name in ledger else None)
                      for name in STAGE_NAMES}
    if config is None and run.config_path.is_file():
        config = read_json(run.config_path).get("config")
    return dict(stage_dirs), dict(config or {})


def _last(series: Mapping[int, float]) -> Optional[float]:
    return series[max(series)] if series else None


def _curve_sets(pilot: Mapping[str, Any], pilot_sum: Mapping[str, Any]) -> Dict[str, Any]:
    """What the accuracies during training were measured on: {"train_acc": {"set":
    "train", "n", "of"}, "heldout_acc": {...}} (a curve that was not recorded is left
    out; "n" is None when the sizes are unknown)."""
    out: Dict[str, Any] = {}
    for key, set_name, n_key, total_key in (("train_acc", "train", "eval_n", "n_train"),
                                            ("heldout_acc", "heldout", "heldout_eval_n",
                                             "n_heldout")):
        if not pilot.get(key):
            continue
        total, sub = pilot_sum.get(total_key), pilot.get(n_key)
        n = min(sub, total) if sub and total else (sub or total)  # subset None/0: all
        out[key] = {"set": set_name, "n": n, "of": total}
    return out


def collect_metrics(run_dir, *, stage_dirs: Optional[Mapping[str, Optional[Path]]] = None,
                    config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The numbers of a run: `METRIC_KEYS` first, then details.

    Accuracies come from the eval stage (the whole test set) when it ran,
    else from the last held-out evaluation during training (a subset of
    ``eval_subset`` problems; ``accuracy_source`` says which); base = step 0
    of the pilot. Every accuracy names its set and size: ``accuracy_set`` and
    ``n_test`` for the `METRIC_KEYS` accuracies, ``n_by_set`` for each eval set,
    ``curve_sets`` for the curves during training ({"train_acc", "heldout_acc"}
    -> {"set", "n": problems per evaluation, "of": the set's size}).
    """
    run_dir = Path(run_dir)
    dirs, config = _stage_dirs_and_config(run_dir, stage_dirs, config)
    pilot, train, base_run = (stage_history(dirs.get(n)) for n in ("pilot", "train", "baseline"))
    pilot_sum, select_sum = stage_summary(dirs.get("pilot")), stage_summary(dirs.get("select"))
    eval_dir = dirs.get("eval")
    results = read_json(eval_dir / rundir.RESULTS_FILE) if eval_dir is not None and \
        (eval_dir / rundir.RESULTS_FILE).is_file() else {}
    arms = results.get("arms") or {}
    m: Dict[str, Any] = {k: None for k in METRIC_KEYS}
    n: Dict[str, Optional[int]] = {}
    curves = _curve_sets(pilot, pilot_sum)
    acc_set = None
    if arms:
        source = "eval"
        acc_set = results.get("test_key")
        for arm in ("base", "sft", "t3s", "baseline"):
            if arm in arms:
                m[f"{arm}_acc"] = arms[arm]["accuracy"]
                n[arm] = arms[arm].get("n")
    elif pilot["heldout_acc"]:
        source = "held-out evaluations during training"
        acc_set = "heldout"
        hn = curves.get("heldout_acc", {}).get("n")
        m["base_acc"] = pilot["heldout_acc"].get(0)
        m["sft_acc"] = _last(pilot["heldout_acc"])
        m["t3s_acc"] = _last(train["heldout_acc"])
        m["baseline_acc"] = _last(base_run["heldout_acc"])
        n = {arm: hn for arm in ("base", "sft", "t3s", "baseline")}
    else:
        source = None
    names = arm_names(dirs.get("arms"))   # the extra arms: <name>_acc next to the others
    values, n_arms = arm_metrics(names, arms, {a: stage_history(dirs["arms"] / a) for a in names},
                                 source, curves.get("heldout_acc", {}).get("n"))
    m.update(values)
    n.update(n_arms)
    m["bottleneck_step"] = pilot_sum.get("bottleneck_step", select_sum.get("bottleneck_step"))
    m.update(_verifier_free(pilot.get("train_answers") or {}))
    m["masked_fraction"] = select_sum.get("masked_fraction")
    m["mask_agreement"] = select_sum.get("mask_agreement")
    t0 = pilot["train_acc"].get(0)
    b = m["bottleneck_step"]
    m.update({
        "accuracy_source": source,
        "accuracy_set": acc_set,
        "n_test": {k: v for k, v in n.items() if m.get(f"{k}_acc") is not None},
        "arms_params": {a: v.get("params") for a, v in (select_sum.get("arms") or {}).items()},
        "test_set": shown_path(results.get("test_set"), run_dir),
        "accuracy_by_set": {k: {a: v["accuracy"] for a, v in (d.get("arms") or {}).items()}
                            for k, d in (results.get("sets") or {}).items()},
        "n_by_set": {k: d.get("n") for k, d in (results.get("sets") or {}).items()},
        # sampled scoring (--samples k): avg@k's standard error and pass@k per set and arm
        "eval_sampling": results.get("sampling"),
        "accuracy_se_by_set": _by_set(results, "se"),
        "pass_at_k_by_set": _by_set(results, "pass_at_k"),
        "set_paths": {k: shown_path(d.get("path"), run_dir)
                      for k, d in (results.get("sets") or {}).items()},
        "curve_sets": curves,
        "rule": select_sum.get("rule", config.get("rule")),
        "rule_params": select_sum.get("rule_params"),
        "baseline_rule": (None if config.get("baseline") in (None, "none")
                          else config.get("baseline")),
        "baseline_params": select_sum.get("baseline_params"),
        "delta_source": select_sum.get("delta_source"),
        "anchor_fraction": select_sum.get("anchor_fraction"),
        "kept_tokens": select_sum.get("kept_tokens"),
        "trace_tokens": select_sum.get("n_tokens", pilot_sum.get("trace_tokens")),
        "steps": pilot_sum.get("final_step"),
        "pilot_train_acc_start": t0,
        "pilot_train_acc_at_bottleneck": pilot["train_acc"].get(b) if b is not None else None,
        "pilot_train_acc_final": _last(pilot["train_acc"]),
        "pilot_heldout_acc": {str(k): v for k, v in sorted(pilot["heldout_acc"].items())},
        "pilot_train_acc": {str(k): v for k, v in sorted(pilot["train_acc"].items())},
        "t3s_heldout_acc": {str(k): v for k, v in sorted(train["heldout_acc"].items())},
        "baseline_heldout_acc": {str(k): v for k, v in sorted(base_run["heldout_acc"].items())},
        "agreement": select_sum.get("agreement"),
    })
    return m


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------

def _fmt(x: Optional[float], pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _se(p: float, n: Optional[int]) -> Optional[float]:
    if not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _compare(name_a: str, a: Optional[float], na, name_b: str, b: Optional[float],
             nb) -> Optional[str]:
    if a is None or b is None:
        return None
    diff = a - b
    se_a, se_b = _se(a, na), _se(b, nb)
    noise = 2 * math.sqrt(se_a ** 2 + se_b ** 2) if se_a is not None and se_b is not None else None
    if abs(diff) < 1e-12:
        text = f"{name_a} and {name_b} score the same ({a:.3f})."
    else:
        word = "above" if diff > 0 else "below"
        text = f"{name_a} ({a:.3f}) is {abs(diff):.3f} {word} {name_b} ({b:.3f})."
    if noise is not None and abs(diff) < noise and noise > 0:
        text += (f" The difference is within sampling noise (about ±{noise:.3f}, two standard "
                 "errors, on this set).")
    return text


def _by_set(results: Mapping[str, Any], key: str) -> Optional[Dict[str, Dict[str, Any]]]:
    """{set: {arm: the eval entry's ``key``}} when the eval stage recorded it (sampled
    scoring), else None."""
    sets = results.get("sets") or {}
    if not any(key in v for d in sets.values() for v in (d.get("arms") or {}).values()):
        return None
    return {k: {a: v.get(key) for a, v in (d.get("arms") or {}).items()} for k, d in sets.items()}


def demo_writeup(run_dir, config: Mapping[str, Any]) -> Optional[str]:
    """For a run of ``t3s demo`` (its training data is the demo's file in the run
    directory), the link from the run's report/ to ``docs/demo/README.md`` ("" when
    this installation has no source tree or the run directory is outside it); None for
    any other run."""
    run_dir = Path(run_dir)
    demo_train = run_dir / rundir.DEMO_DATA_DIR / rundir.DEMO_DATA_FILES["train"]
    if not config.get("train") or os.path.abspath(config["train"]) != os.path.abspath(demo_train):
        return None
    root = Path(_package_root())
    doc = root / "docs" / "demo" / "README.md"
    report_dir = RunDir(run_dir).stage_dir("report").absolute()
    # a link only from inside the source tree: one from elsewhere would climb out of the run
    # directory into the machine's own folders (and break when either moves)
    if not doc.is_file() or not report_dir.is_relative_to(root.absolute()):
        return ""
    return Path(os.path.relpath(doc, report_dir)).as_posix()


def _package_root() -> str:
    """The folder holding the t3s package (this file is t3s/pipeline/report.py)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shown_path(path: Any, run_dir: os.PathLike) -> Any:
    """A path as a report and its metrics.json show it: relative to the run directory
    when inside it, relative to the installed package for the shipped demo assets, else
    only the file's name (an absolute path would name the machine's own folders, and
    the run's config.json holds it). Anything but an absolute path is returned as is."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return path
    for root in (os.fspath(run_dir) if run_dir else "", _package_root()):
        if root and os.path.commonpath([os.path.abspath(root), path]) == os.path.abspath(root):
            return Path(os.path.relpath(path, root)).as_posix()
    return os.path.basename(path.rstrip(os.sep)) or path


def render_markdown(metrics: Mapping[str, Any], *, config: Optional[Mapping[str, Any]] = None,
                    figures: Sequence[Tuple[str, str]] = (), run_dir: str = "",
                    writeup: Optional[str] = None) -> str:
    """report.md from `collect_metrics`' numbers. It opens with what the run is (the
    task, each arm, the terms) and names the set and size of every accuracy;
    statements are computed from the numbers and say plainly when T3S does not help.

    writeup: for the demo, the link to its write-up ``docs/demo/README.md`` ("" when
    the source tree is not at hand); None for other runs.
    """
    m, cfg = metrics, dict(config or {})
    rule = m.get("rule") or "?"
    lines = ["# T3S run report", ""]
    if run_dir:
        lines.append(f"Run directory: `{os.path.basename(os.path.abspath(run_dir))}`")
    if cfg:
        lines.append(f"Model θ0: `{shown_path(cfg.get('model'), run_dir)}`; training traces: "
                     f"`{shown_path(cfg.get('train'), run_dir)}`; "
                     f"{cfg.get('steps')} steps, lr {cfg.get('lr')}, batch "
                     f"{cfg.get('batch_size')}×{cfg.get('grad_accum')}; rule `{rule}`"
                     + (f" {m['rule_params']}" if m.get("rule_params") else "") + ".")
    lines += [""] + _introduction(m, cfg, writeup)
    src = m.get("accuracy_source")
    lines += ["## Results", ""]
    if src is None:
        lines += ["No accuracy was measured (no held-out or test set was given).", ""]
    primary = m.get("accuracy_set") or _primary_set(m)
    others = [k for k in (m.get("accuracy_by_set") or {}) if src == "eval" and k != primary]
    n = m.get("n_test") or {}
    ns = sorted({v for v in n.values() if v})
    n_text = f"n={ns[0]}" if len(ns) == 1 else "n: see the statements"
    if src == "eval":
        first = (f"accuracy on `{shown_path(m.get('test_set'), run_dir)}` ({primary} set, "
                 f"{n_text}{', headline' if others else ''})")
    else:
        first = ("held-out accuracy at the last evaluation during training "
                 f"({_on(m, 'heldout_acc') or n_text})")
    head = f"| model | {first} |" + "".join(
        f" accuracy on `{shown_path(m['set_paths'].get(k), run_dir) or k}` ({k} set, "
        f"n={(m.get('n_by_set') or {}).get(k) or 'n/a'}) |" for k in others)
    lines += [head, "|---|---|" + "---|" * len(others)]
    se = m.get("accuracy_se_by_set") or {}

    def cell(value, key, arm):   # "0.667 ± 0.105" with sampled scoring (avg@k ± SE)
        err = (se.get(key) or {}).get(arm)
        return _fmt(value) + (f" ± {err:.3f}" if err is not None else "")

    for arm, label in _arm_labels(m):
        row = f"| {label} | {cell(m.get(f'{arm}_acc'), primary, arm)} |"
        for k in others:
            row += f" {cell(m['accuracy_by_set'][k].get(arm), k, arm)} |"
        lines.append(row)
    sampling = m.get("eval_sampling")
    if sampling and src == "eval":
        k = sampling["samples"]
        lines += ["", f"Accuracy is avg@{k}: {k} answer(s) per problem sampled at temperature "
                  f"{sampling['temperature']}, top-p {sampling['top_p']}; the mean over problems "
                  f"of each one's fraction correct"
                  + (" ± its standard error over problems" if se else "")
                  + (f". pass@{k} (some answer correct): " + "; ".join(
                      f"{label} {_fmt((m['pass_at_k_by_set'].get(primary) or {}).get(arm))}"
                      for arm, label in _arm_labels(m)) if m.get("pass_at_k_by_set") else "")
                  + "."]
    note = _curve_note(m, cfg)
    if note:
        lines += ["", note]
    lines += ["", "| quantity | value |", "|---|---|"]
    b = m.get("bottleneck_step")
    lines.append(f"| bottleneck step | {b if b is not None else 'n/a'}"
                 + (f" (training accuracy {_fmt(m.get('pilot_train_acc_at_bottleneck'))}"
                    + (f", {_on(m, 'train_acc')}" if _on(m, "train_acc") else "") + ")"
                    if b is not None else "") + " |")
    lines.append(f"| masked fraction (trace tokens left out of the loss) | "
                 f"{_fmt(m.get('masked_fraction'), pct=True)} |")
    lines.append(f"| online-vs-exact mask agreement | {_fmt(m.get('mask_agreement'))} |")
    if m.get("delta_source"):
        lines.append(f"| Δc used for the mask | {m['delta_source']} |")
    lines += ["", "## What happened", ""]
    lines += [f"- {s}" for s in _statements(m)]
    if figures:
        lines += ["", "## Figures", ""]
        for title, fname in figures:
            lines += [f"**{title}**", "", f"![{title}]({fname})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _arm_labels(m: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(arm, its row label) of the arms the run has."""
    rule = m.get("rule") or "?"
    labels = [("base", "base (θ0)"), ("sft", "plain SFT (the pilot: all trace tokens)"),
              ("t3s", f"T3S (rule `{rule}`)" if rule != "none" else
               "retrained with `--rule none` (plain SFT)")]
    if m.get("baseline_rule"):
        labels.append(("baseline", f"baseline (`{m['baseline_rule']}`"
                       + (", same budget" if m["baseline_rule"] == "random" else "") + ")"))
    return labels + [(a, arm_label(a)) for a in m.get("arms") or ()]


def _on(m: Mapping[str, Any], curve: str, short: bool = False) -> str:
    """What a curve during training ("train_acc", "heldout_acc") was measured on: "on 64
    of the 200 training problems" ("64 of 200 training problems" when ``short``; ""
    when unknown)."""
    c = (m.get("curve_sets") or {}).get(curve)
    if not c or not c.get("n"):
        return ""
    what = "training problems" if c["set"] == "train" else "held-out problems"
    if c.get("of") and c["of"] != c["n"]:
        return f"{c['n']} of {c['of']} {what}" if short else f"on {c['n']} of the {c['of']} {what}"
    return f"all {c['n']} {what}" if short else f"on all {c['n']} {what}"


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


def _curve_note(m: Mapping[str, Any], cfg: Mapping[str, Any]) -> Optional[str]:
    """Why the accuracies during training differ from the table's (another set size)."""
    parts = [f"training accuracy {_on(m, 'train_acc')}" if _on(m, "train_acc") else "",
             f"held-out accuracy {_on(m, 'heldout_acc')}" if _on(m, "heldout_acc") else ""]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return ("Accuracies *during training* (the curves in the figure and the statements that say "
            "so) are measured every " + (f"{cfg['eval_steps']} steps " if cfg.get("eval_steps") else "")
            + "on a fixed random subset (`--eval-subset`): " + "; ".join(parts)
            + ". They differ from the numbers in the table above, which "
            + ("score the whole set." if m.get("accuracy_source") == "eval" else
               "are the last of them."))


def _introduction(m: Mapping[str, Any], cfg: Mapping[str, Any],
                  writeup: Optional[str]) -> List[str]:
    """What the run is: the task, what each arm did, and the terms the report uses."""
    steps = cfg.get("steps", m.get("steps"))
    rule = m.get("rule") or "?"
    out = ["## What this run is", ""]
    if writeup is not None:
        where = (f"[docs/demo/README.md]({writeup})" if writeup else
                 "`docs/demo/README.md` in the t3s source tree")
        out.append("This is the built-in demo (`t3s demo`): a small student that already sums "
                   "2 and 3 numbers step by step in its own style is fine-tuned on a rule-based "
                   "teacher's traces of sums in another layout (with `--task teach`, the "
                   "default, they also work 4-term sums the student has never seen). The "
                   f"demo's write-up explains the task and the results: {where}.")
    else:
        out.append("θ0 is fine-tuned on the teacher traces of the training file; the question "
                   "is whether leaving some trace tokens out of the loss (T3S) keeps more of "
                   "θ0's accuracy than training on all of them.")
    mf = m.get("masked_fraction")
    left = f" ({100 * mf:.1f}% of the trace tokens)" if mf is not None else ""
    arms = {"base": "the model before any fine-tuning.",
            "sft": f"SFT from θ0 on every trace token for {steps} steps. This is the pilot run; "
                   "its trajectory gives the bottleneck and Δc.",
            "t3s": (f"retrained from θ0 for {steps} steps on the same traces with the mask of "
                    f"rule `{rule}`" + (", which leaves the anchors out of the loss"
                                        if rule == "anchor" else "") + f"{left}."
                    if rule != "none" else f"retrained from θ0 for {steps} steps on every "
                    "trace token (`--rule none`: a second plain SFT)."),
            "baseline": ("retrained from θ0 the same way with DFT: every trace token, each "
                         "token's loss times its own stop-gradient probability (TRL's "
                         "`loss_type=\"dft\"`), a reweighting that needs no pilot."
                         if m.get("baseline_rule") == "dft" else
                         f"retrained from θ0 the same way with the `{m.get('baseline_rule')}` "
                         "rule's mask" + (", which leaves out as many randomly chosen tokens "
                                          "as T3S" if m.get("baseline_rule") == "random" else "")
                         + ". It tells a good choice of tokens from merely fewer tokens."),
            **{a: arm_description(a, steps) for a in m.get("arms") or ()}}
    out += ["", "Every arm is scored the same way (greedy answers, checked by the "
            f"`{cfg.get('verifier', 'math')}` verifier):", ""]
    out += [f"- **{label}**: {arms[arm]}" for arm, label in _arm_labels(m)]
    out += ["", "Terms:", "",
            "- **Imitation Shock**: the student's accuracy collapses early in SFT on another "
            "model's traces while the training loss keeps falling; it imitates the teacher's "
            "style before it reasons in it.",
            "- **bottleneck** (step b, checkpoint θb): the pilot's evaluation after step 0 with "
            "the lowest training accuracy, the bottom of the shock.",
            "- **Δc** = log p(token | θb) − log p(token | θ0): how much more confident in a trace "
            "token the pilot became by the bottleneck.",
            "- **anchor**: a trace token with Δc > 0, one the pilot learned during the shock; "
            "the anchor rule leaves anchors out of the T3S loss.", ""]
    return out


def _primary_set(m: Mapping[str, Any]) -> Optional[str]:
    """The eval set the headline accuracies come from (the first in ``accuracy_by_set``)."""
    sets = list(m.get("accuracy_by_set") or {})
    return sets[0] if sets else None


def _verifier_free(answers: Mapping[int, Sequence[str]]) -> Dict[str, Any]:
    """The pilot's bottleneck found without a verifier (`t3s.verifier_free_bottleneck`):
    the step whose greedy answers agree least with θ0's own on the training prompts."""
    from ..bottleneck import answer_agreement, verifier_free_bottleneck
    if len(answers) < 2 or 0 not in answers:
        return {"verifier_free_bottleneck_step": None, "pilot_answer_agreement": None}
    try:
        agreement = answer_agreement(answers, reference_step=0)
        step = verifier_free_bottleneck(answers)
    except ValueError:
        return {"verifier_free_bottleneck_step": None, "pilot_answer_agreement": None}
    return {"verifier_free_bottleneck_step": step,
            "pilot_answer_agreement": {str(k): v for k, v in agreement.items()}}


def _statements(m: Mapping[str, Any]) -> List[str]:
    out: List[str] = []
    t0, tb, tf = (m.get("pilot_train_acc_start"), m.get("pilot_train_acc_at_bottleneck"),
                  m.get("pilot_train_acc_final"))
    b = m.get("bottleneck_step")
    if t0 is not None and tb is not None:
        if tb < t0:
            out.append(f"Imitation shock in the pilot: training accuracy"
                       f"{_paren(_on(m, 'train_acc'))} fell from {t0:.3f} at "
                       f"step 0 to {tb:.3f} at step {b} (the bottleneck) and ended at "
                       f"{_fmt(tf)}.")
        else:
            out.append(f"No imitation shock: after step 0 the pilot's training accuracy"
                       f"{_paren(_on(m, 'train_acc'))} never "
                       f"fell below its starting value {t0:.3f} (lowest {tb:.3f}, at step {b}; "
                       f"final {_fmt(tf)}). The bottleneck is then only the weakest evaluated "
                       "checkpoint.")
    vf = m.get("verifier_free_bottleneck_step")
    if vf is not None:
        agree = (m.get("pilot_answer_agreement") or {}).get(str(vf))
        out.append(f"Without a verifier: the pilot's greedy answers agreed least with θ0's own "
                   f"on the training prompts at step {vf} ({_fmt(agree)} of the prompts); the "
                   f"verifier's bottleneck is step {b}" + (" (the same step)." if vf == b else
                                                          "."))
    held = {int(k): v for k, v in (m.get("pilot_heldout_acc") or {}).items()}
    if held and 0 in held:
        low_step = min((s for s in held if s > 0), key=lambda s: (held[s], s), default=None)
        if low_step is not None:
            out.append(f"Pilot held-out accuracy during training"
                       f"{_paren(_on(m, 'heldout_acc'))}: "
                       f"{held[0]:.3f} at step 0, lowest "
                       f"{held[low_step]:.3f} at step {low_step}, {held[max(held)]:.3f} at the "
                       "end.")
    dips = []
    for label, key in (("plain SFT", "pilot_heldout_acc"), ("T3S", "t3s_heldout_acc"),
                       ("the baseline", "baseline_heldout_acc")):
        curve = {int(k): v for k, v in (m.get(key) or {}).items() if int(k) > 0}
        if curve:
            low = min(curve, key=lambda s: (curve[s], s))
            dips.append(f"{label} {curve[low]:.3f} (step {low}, final {curve[max(curve)]:.3f})")
    if len(dips) > 1:
        on = _on(m, "heldout_acc")
        out.append(f"Lowest held-out accuracy during training ({on + '; ' if on else ''}"
                   "the depth of the shock): "
                   + "; ".join(dips) + ".")
    n = m.get("n_test") or {}
    sft, t3s, base, bl = (m.get("sft_acc"), m.get("t3s_acc"), m.get("base_acc"),
                          m.get("baseline_acc"))
    is_t3s = m.get("rule") not in (None, "none")
    name = "T3S" if is_t3s else "the retrained model (rule none, plain SFT)"
    # every comparison names the set and its size
    ns = sorted({v for v in n.values() if v})
    size = f" (n={ns[0]})" if len(ns) == 1 else ""
    where = (f"On the {m.get('accuracy_set') or _primary_set(m) or 'test'} set{size}"
             if m.get("accuracy_source") == "eval" else
             f"At the last held-out evaluation during training{_paren(_on(m, 'heldout_acc'))}")
    for s in (_compare(f"{where}, {name}", t3s, n.get("t3s"), "plain SFT", sft, n.get("sft")),
              _compare(f"{where}, {name}", t3s, n.get("t3s"), "the base θ0", base, n.get("base")),
              _compare(f"{where}, {name}", t3s, n.get("t3s"), "the baseline", bl,
                       n.get("baseline")),
              _compare(f"{where}, plain SFT", sft, n.get("sft"), "the base θ0", base,
                       n.get("base")),
              *(_compare(f"{where}, {name}", t3s, n.get("t3s"), arm_name(a), m.get(f"{a}_acc"),
                         n.get(a)) for a in m.get("arms") or ())):
        if s:
            out.append(s)
    nb = m.get("n_by_set") or {}
    for k in [k for k in (m.get("accuracy_by_set") or {}) if k != _primary_set(m)]:
        acc, on_k = m["accuracy_by_set"][k], f"On the {k} set (n={nb.get(k) or 'n/a'}), {name}"
        for other, arm in (("plain SFT", "sft"), ("the base θ0", "base"),
                           ("the baseline", "baseline"),
                           *((arm_name(a), a) for a in m.get("arms") or ())):
            s = _compare(on_k, acc.get("t3s"), nb.get(k), other, acc.get(arm), nb.get(k))
            if s:
                out.append(s)
    if is_t3s and t3s is not None and sft is not None and t3s <= sft:
        out.append("T3S did not beat plain SFT in this run.")
    if is_t3s and t3s is not None and base is not None and t3s < base:
        out.append("T3S ended below the base model: retraining with the mask did not preserve "
                   "the base's accuracy.")
    if is_t3s and t3s is not None and bl is not None and t3s <= bl:
        out.append("T3S did not beat the baseline in this run.")
    mf, af = m.get("masked_fraction"), m.get("anchor_fraction")
    if mf is not None:
        out.append(f"The mask left {100 * mf:.1f}% of the trace tokens out of the loss"
                   + (f" ({100 * af:.1f}% of the tokens have Δc > 0)." if af is not None else "."))
    ag = m.get("mask_agreement")
    if ag is not None:
        out.append(f"The online (checkpoint-free) and exact Δc give the same anchor decision on "
                   f"{100 * ag:.1f}% of the tokens.")
    if not out:
        out.append("Not enough stages have finished to say anything yet.")
    return out


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

def _trace_examples(config: Mapping[str, Any], select_dir: Path, k: int = 4):
    """Up to k training traces (lowest example ids) with their tokens and Δc > 0 flags."""
    import pyarrow.parquet as pq

    tok = load_tokenizer(config)
    data = load_data(config, "train", tok)
    table = pq.read_table(select_dir / rundir.SELECTION_FILE,
                          columns=["example_id", "position", "delta"])
    eids = table["example_id"].to_numpy()
    pos = table["position"].to_numpy()
    delta = table["delta"].to_numpy()
    chosen = sorted(set(int(e) for e in eids))[:k]
    out = []
    for eid in chosen:
        ex = data.by_id(eid)
        ids = ex["input_ids"].tolist()
        sel = eids == eid
        flags = dict(zip(pos[sel].tolist(), (delta[sel] > 0).tolist()))
        resp = [p for p in range(len(ids)) if p in flags]
        n_anchor = sum(flags.values())
        out.append({
            "title": f"example {eid}: {n_anchor} of {len(resp)} trace tokens are anchors",
            "prompt": tok.decode(ids[:int(ex["prompt_length"])], skip_special_tokens=True),
            "tokens": [tok.decode([ids[p]]) for p in resp],
            "highlight": [flags[p] for p in resp],
        })
    return out


def build_report(run_dir, *, out_dir=None,
                 stage_dirs: Optional[Mapping[str, Optional[Path]]] = None,
                 config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Write the figures, ``metrics.json`` and ``report.md`` of a run; return the metrics.

    out_dir: where to write (default ``run_dir/report``). stage_dirs: stage
    name -> directory of its current outputs, None for stages to leave out
    (default: every stage in the run's ledger). config: the run's settings
    (default: read from ``run_dir/config.json``).
    """
    import pyarrow.parquet as pq
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).stage_dir("report")
    out.mkdir(parents=True, exist_ok=True)
    dirs, config = _stage_dirs_and_config(run_dir, stage_dirs, config)
    metrics = collect_metrics(run_dir, stage_dirs=dirs, config=config)
    figures: List[Tuple[str, str]] = []
    notes: List[str] = []

    runs = {}
    for arm, stage in (("sft", "pilot"), ("t3s", "train"), ("baseline", "baseline")):
        h = stage_history(dirs.get(stage))
        if h["loss"] or h["train_acc"] or h["heldout_acc"]:
            label = None
            if arm == "t3s" and metrics.get("rule"):
                label = "plain SFT (train stage)" if metrics["rule"] == "none" else \
                    f"T3S ({metrics['rule']})"
            if arm == "baseline" and metrics.get("baseline_rule"):
                label = f"baseline ({metrics['baseline_rule']})"
            runs[arm] = {**h, "label": label}
    for i, name in enumerate(metrics.get("arms") or ()):   # the extra arms, dashed
        h = stage_history(dirs["arms"] / name)
        if h["loss"] or h["heldout_acc"]:
            runs[name] = {**h, "label": arm_name(name), "color": arm_color(i)}
    if runs:
        plot_shock(out / rundir.SHOCK_FIGURE, runs, bottleneck_step=metrics.get("bottleneck_step"),
                   measured_on={k: _on(metrics, k, short=True)
                                for k in ("train_acc", "heldout_acc")})
        figures.append(("Loss and accuracy per step (bottleneck marked)", rundir.SHOCK_FIGURE))

    select_dir = dirs.get("select")
    if select_dir is not None:
        deltas = {}
        for name in ("online", "exact"):
            p = select_dir / rundir.delta_file(name)
            if p.is_file():
                deltas[name] = pq.read_table(p, columns=["delta"])["delta"].to_numpy()
        if deltas:
            plot_delta_histogram(out / rundir.DELTA_FIGURE, deltas)
            figures.append(("Δc per trace token", rundir.DELTA_FIGURE))
        try:
            examples = _trace_examples(config, select_dir)
        except (ValueError, OSError, KeyError, ImportError) as e:
            examples = []
            notes.append(f"traces figure skipped: {e}")
        if examples:
            anchor_rule = metrics.get("rule") == "anchor" and not metrics.get("rule_params")
            labels = ({} if anchor_rule else
                      dict(highlight_label="anchor (Δc > 0)", other_label="other trace tokens"))
            plot_traces(out / rundir.TRACES_FIGURE, examples,
                        title="Training traces: anchors (Δc > 0) highlighted", **labels)
            figures.append(("Example traces, anchors highlighted", rundir.TRACES_FIGURE))

    metrics_out = {k: metrics[k] for k in METRIC_KEYS}
    metrics_out.update({k: v for k, v in metrics.items() if k not in METRIC_KEYS})
    sensitivity = report_section(dirs.get("sensitivity"), out)   # (section, choice -> acc)
    if sensitivity is not None:
        metrics_out["sensitivity"] = sensitivity[1]
    with open(out / rundir.METRICS_FILE, "w", encoding="utf-8") as f:
        json.dump(metrics_out, f, indent=1)
    text = render_markdown(metrics, config=config, figures=figures, run_dir=str(run_dir),
                           writeup=demo_writeup(run_dir, config))
    analysis_dir = dirs.get("analyze")
    if analysis_dir is not None and (analysis_dir / rundir.ANALYSIS_SECTION).is_file():
        # the analyze stage's section and figures, copied so the report folder stands alone
        for fname in rundir.ANALYSIS_FIGURES.values():
            if (analysis_dir / fname).is_file():
                shutil.copyfile(analysis_dir / fname, out / fname)
        text += "\n" + (analysis_dir / rundir.ANALYSIS_SECTION).read_text(encoding="utf-8")
    if sensitivity is not None:
        text += "\n" + sensitivity[0]
    if notes:
        text += "\n" + "\n".join(f"_Note: {s}_" for s in notes) + "\n"
    with open(out / rundir.REPORT_FILE, "w", encoding="utf-8") as f:
        f.write(text)
    return metrics_out
