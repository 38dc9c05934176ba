"""``metrics.json`` and ``report.md`` for a T3S run, with its figures.

`build_report` reads a run directory (its layout: `t3s.pipeline.rundir`) and
writes, into ``out_dir``:

* the figures of `t3s.pipeline.plots`: ``shock.png`` (loss and accuracy per
  step, bottleneck marked), ``delta_hist.png`` (Δc per trace token) and
  ``traces.png`` (a few traces, anchors highlighted);
* ``metrics.json``: `METRIC_KEYS` first (null when the run does not have the
  number), then details (`collect_metrics`);
* ``report.md``: the table and plain statements of what happened, computed
  from the numbers only (`render_markdown`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import rundir
from .loaders import load_data, load_tokenizer
from .plots import plot_delta_histogram, plot_shock, plot_traces
from .rundir import STAGE_NAMES, RunDir, read_json

__all__ = [
    "METRIC_KEYS",
    "build_report",
    "collect_metrics",
    "render_markdown",
]

#: The keys every metrics.json starts with, in this order (null when not available).
METRIC_KEYS = ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "bottleneck_step",
               "masked_fraction", "mask_agreement")

# --------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------

def _history(stage_dir: Optional[Path]) -> Dict[str, Any]:
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
        out["eval_n"] = (data.get("settings") or {}).get("subset_size")
    log = stage_dir / rundir.LOG_HISTORY_FILE
    if log.is_file():
        for entry in read_json(log):
            if isinstance(entry, dict) and "loss" in entry and "step" in entry:
                out["loss"][int(entry["step"])] = float(entry["loss"])
    return out


def _summary(stage_dir: Optional[Path]) -> Dict[str, Any]:
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


def collect_metrics(run_dir, *, stage_dirs: Optional[Mapping[str, Optional[Path]]] = None,
                    config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The numbers of a run: `METRIC_KEYS` first, then details.

    Accuracies come from the eval stage (the whole test set) when it ran,
    else from the last held-out evaluation during training (a subset of
    ``eval_subset`` problems; ``accuracy_source`` says which); base = step 0
    of the pilot.
    """
    run_dir = Path(run_dir)
    dirs, config = _stage_dirs_and_config(run_dir, stage_dirs, config)
    pilot, train, base_run = (_history(dirs.get(n)) for n in ("pilot", "train", "baseline"))
    pilot_sum, select_sum = _summary(dirs.get("pilot")), _summary(dirs.get("select"))
    eval_dir = dirs.get("eval")
    results = read_json(eval_dir / rundir.RESULTS_FILE) if eval_dir is not None and \
        (eval_dir / rundir.RESULTS_FILE).is_file() else {}
    arms = results.get("arms") or {}
    m: Dict[str, Any] = {k: None for k in METRIC_KEYS}
    n: Dict[str, Optional[int]] = {}
    if arms:
        source = "eval"
        for arm in ("base", "sft", "t3s", "baseline"):
            if arm in arms:
                m[f"{arm}_acc"] = arms[arm]["accuracy"]
                n[arm] = arms[arm].get("n")
    elif pilot["heldout_acc"]:
        source = "held-out evaluations during training"
        hn = pilot.get("eval_n") or pilot_sum.get("n_heldout")
        hn = min(hn, pilot_sum["n_heldout"]) if hn and pilot_sum.get("n_heldout") else hn
        m["base_acc"] = pilot["heldout_acc"].get(0)
        m["sft_acc"] = _last(pilot["heldout_acc"])
        m["t3s_acc"] = _last(train["heldout_acc"])
        m["baseline_acc"] = _last(base_run["heldout_acc"])
        n = {arm: hn for arm in ("base", "sft", "t3s", "baseline")}
    else:
        source = None
    m["bottleneck_step"] = pilot_sum.get("bottleneck_step", select_sum.get("bottleneck_step"))
    m["masked_fraction"] = select_sum.get("masked_fraction")
    m["mask_agreement"] = select_sum.get("mask_agreement")
    t0 = pilot["train_acc"].get(0)
    b = m["bottleneck_step"]
    m.update({
        "accuracy_source": source,
        "n_test": {k: v for k, v in n.items() if m.get(f"{k}_acc") is not None},
        "test_set": results.get("test_set"),
        "accuracy_by_set": {k: {a: v["accuracy"] for a, v in (d.get("arms") or {}).items()}
                            for k, d in (results.get("sets") or {}).items()},
        "n_by_set": {k: d.get("n") for k, d in (results.get("sets") or {}).items()},
        "set_paths": {k: d.get("path") for k, d in (results.get("sets") or {}).items()},
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


def _short_path(path: Any, run_dir: str) -> Any:
    """A path as the report shows it: relative to the run directory when inside it,
    relative to the installed package for the shipped demo assets."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return path
    # the folder holding the t3s package (this file is t3s/pipeline/report.py)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (run_dir, package_root):
        if root and os.path.commonpath([os.path.abspath(root), path]) == os.path.abspath(root):
            return os.path.relpath(path, root)
    return path


def render_markdown(metrics: Mapping[str, Any], *, config: Optional[Mapping[str, Any]] = None,
                    figures: Sequence[Tuple[str, str]] = (), run_dir: str = "") -> str:
    """report.md from `collect_metrics`' numbers. Statements are computed from the
    numbers and say plainly when T3S does not help."""
    m, cfg = metrics, dict(config or {})
    n = m.get("n_test") or {}
    rule = m.get("rule") or "?"
    lines = ["# T3S run report", ""]
    if run_dir:
        lines.append(f"Run directory: `{os.path.basename(os.path.abspath(run_dir))}`")
    if cfg:
        lines.append(f"Model θ0: `{_short_path(cfg.get('model'), run_dir)}`; training traces: "
                     f"`{_short_path(cfg.get('train'), run_dir)}`; "
                     f"{cfg.get('steps')} steps, lr {cfg.get('lr')}, batch "
                     f"{cfg.get('batch_size')}×{cfg.get('grad_accum')}; rule `{rule}`"
                     + (f" {m['rule_params']}" if m.get("rule_params") else "") + ".")
    lines.append("")
    src = m.get("accuracy_source")
    where = (f"on `{_short_path(m.get('test_set'), run_dir)}`" if src == "eval" else
             "at the last held-out evaluation during training" if src else "")
    lines += ["## Results", ""]
    if src is None:
        lines += ["No accuracy was measured (no held-out or test set was given).", ""]
    others = [k for k in (m.get("accuracy_by_set") or {}) if src == "eval"
              and k != _primary_set(m)]
    tag = f" ({_primary_set(m)})" if others else ""
    head = f"| model | accuracy {where}{tag} | n |" + "".join(
        f" accuracy on `{_short_path(m['set_paths'].get(k), run_dir) or k}` ({k}) | n |"
        for k in others)
    lines += [head, "|---|---|---|" + "---|---|" * len(others)]
    labels = [("base", "base (θ0)"), ("sft", "plain SFT (the pilot: all trace tokens)"),
              ("t3s", f"T3S (rule `{rule}`)" if rule != "none" else
               "retrained with `--rule none` (plain SFT)"),
              ("baseline", f"baseline (`{m.get('baseline_rule')}`"
                           + (", same budget" if m.get("baseline_rule") == "random" else "") + ")")]
    for arm, label in labels:
        if arm == "baseline" and not m.get("baseline_rule"):
            continue
        row = f"| {label} | {_fmt(m.get(f'{arm}_acc'))} | {n.get(arm) or 'n/a'} |"
        for k in others:
            acc = m["accuracy_by_set"][k].get(arm)
            row += f" {_fmt(acc)} | {(m.get('n_by_set') or {}).get(k) or 'n/a'} |"
        lines.append(row)
    lines += ["", "| quantity | value |", "|---|---|"]
    b = m.get("bottleneck_step")
    lines.append(f"| bottleneck step | {b if b is not None else 'n/a'}"
                 + (f" (training accuracy {_fmt(m.get('pilot_train_acc_at_bottleneck'))})"
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
            out.append(f"Imitation shock in the pilot: training accuracy fell from {t0:.3f} at "
                       f"step 0 to {tb:.3f} at step {b} (the bottleneck) and ended at "
                       f"{_fmt(tf)}.")
        else:
            out.append(f"No imitation shock: after step 0 the pilot's training accuracy never "
                       f"fell below its starting value {t0:.3f} (lowest {tb:.3f}, at step {b}; "
                       f"final {_fmt(tf)}). The bottleneck is then only the weakest evaluated "
                       "checkpoint.")
    held = {int(k): v for k, v in (m.get("pilot_heldout_acc") or {}).items()}
    if held and 0 in held:
        low_step = min((s for s in held if s > 0), key=lambda s: (held[s], s), default=None)
        if low_step is not None:
            out.append(f"Pilot held-out accuracy: {held[0]:.3f} at step 0, lowest "
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
        out.append("Lowest held-out accuracy during training (the depth of the shock): "
                   + "; ".join(dips) + ".")
    n = m.get("n_test") or {}
    sft, t3s, base, bl = (m.get("sft_acc"), m.get("t3s_acc"), m.get("base_acc"),
                          m.get("baseline_acc"))
    is_t3s = m.get("rule") not in (None, "none")
    name = "T3S" if is_t3s else "The retrained model (rule none, plain SFT)"
    for s in (_compare(name, t3s, n.get("t3s"), "plain SFT", sft, n.get("sft")),
              _compare(name, t3s, n.get("t3s"), "the base θ0", base, n.get("base")),
              _compare(name, t3s, n.get("t3s"), "the baseline", bl, n.get("baseline")),
              _compare("Plain SFT", sft, n.get("sft"), "the base θ0", base, n.get("base"))):
        if s:
            out.append(s)
    nb = m.get("n_by_set") or {}
    for k in [k for k in (m.get("accuracy_by_set") or {}) if k != _primary_set(m)]:
        acc = m["accuracy_by_set"][k]
        for s in (_compare(f"On the {k} set, {name}", acc.get("t3s"), nb.get(k), "plain SFT",
                           acc.get("sft"), nb.get(k)),
                  _compare(f"On the {k} set, {name}", acc.get("t3s"), nb.get(k), "the base θ0",
                           acc.get("base"), nb.get(k)),
                  _compare(f"On the {k} set, {name}", acc.get("t3s"), nb.get(k), "the baseline",
                           acc.get("baseline"), nb.get(k))):
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
        h = _history(dirs.get(stage))
        if h["loss"] or h["train_acc"] or h["heldout_acc"]:
            label = None
            if arm == "t3s" and metrics.get("rule"):
                label = "plain SFT (train stage)" if metrics["rule"] == "none" else \
                    f"T3S ({metrics['rule']})"
            if arm == "baseline" and metrics.get("baseline_rule"):
                label = f"baseline ({metrics['baseline_rule']})"
            runs[arm] = {**h, "label": label}
    if runs:
        plot_shock(out / rundir.SHOCK_FIGURE, runs, bottleneck_step=metrics.get("bottleneck_step"))
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
    with open(out / rundir.METRICS_FILE, "w", encoding="utf-8") as f:
        json.dump(metrics_out, f, indent=1)
    text = render_markdown(metrics, config=config, figures=figures, run_dir=str(run_dir))
    if notes:
        text += "\n" + "\n".join(f"_Note: {s}_" for s in notes) + "\n"
    with open(out / rundir.REPORT_FILE, "w", encoding="utf-8") as f:
        f.write(text)
    return metrics_out
