"""``report.md`` of a T3S run, from the numbers of `t3s.pipeline.report.metrics`.

`render_markdown` opens with what the run is (the task, each arm, the terms), then
the table and plain statements of what happened, computed from the numbers only. Every
accuracy names its set and size (`curve_measured_on` for the curves during training).
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from .arms import arm_description, arm_label, arm_name
from .metrics import shown_path

__all__ = ["render_markdown", "curve_measured_on"]


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
    if cfg.get("student"):   # a cross-model run (`--student`): say which model is which
        lines.append(
            f"Selector (the pilot, Δc and the mask"
            + (f", reused from `{shown_path(cfg.get('artifact'), run_dir)}`"
               if cfg.get("artifact") else "") + f"): `{m.get('selector')}`. Student (θ0 of "
            f"the base row, every retraining arm and the eval): "
            f"`{shown_path(cfg['student'], run_dir)}`. "
            + ("The bottleneck and Δc belong to the selector's run"
               if cfg.get("artifact") else "The pilot's curves, the bottleneck and Δc belong "
               "to the selector") + "; the accuracies and retraining curves to the student.")
    if cfg:
        lines.append(("Training traces: " if cfg.get("student") else
                      f"Model θ0: `{shown_path(cfg.get('model'), run_dir)}`; training traces: ")
                     + f"`{shown_path(cfg.get('train'), run_dir)}`; "
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
                 f"({curve_measured_on(m, 'heldout_acc') or n_text})")
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
    b, on_train = m.get("bottleneck_step"), curve_measured_on(m, "train_acc")
    lines.append(f"| bottleneck step | {b if b is not None else 'n/a'}"
                 + (f" (training accuracy {_fmt(m.get('pilot_train_acc_at_bottleneck'))}"
                    + (f", {on_train}" if on_train else "") + ")"
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


def curve_measured_on(m: Mapping[str, Any], curve: str, short: bool = False) -> str:
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
    on = {k: curve_measured_on(m, k) for k in ("train_acc", "heldout_acc")}
    parts = [f"training accuracy {on['train_acc']}" if on["train_acc"] else "",
             f"held-out accuracy {on['heldout_acc']}" if on["heldout_acc"] else ""]
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


def _statements(m: Mapping[str, Any]) -> List[str]:
    out: List[str] = []
    t0, tb, tf = (m.get("pilot_train_acc_start"), m.get("pilot_train_acc_at_bottleneck"),
                  m.get("pilot_train_acc_final"))
    b = m.get("bottleneck_step")
    if t0 is not None and tb is not None:
        if tb < t0:
            out.append(f"Imitation shock in the pilot: training accuracy"
                       f"{_paren(curve_measured_on(m, 'train_acc'))} fell from {t0:.3f} at "
                       f"step 0 to {tb:.3f} at step {b} (the bottleneck) and ended at "
                       f"{_fmt(tf)}.")
        else:
            out.append(f"No imitation shock: after step 0 the pilot's training accuracy"
                       f"{_paren(curve_measured_on(m, 'train_acc'))} never "
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
                       f"{_paren(curve_measured_on(m, 'heldout_acc'))}: "
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
        on = curve_measured_on(m, "heldout_acc")
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
             "At the last held-out evaluation during training"
             + _paren(curve_measured_on(m, "heldout_acc")))
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
