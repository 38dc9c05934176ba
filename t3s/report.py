"""Figures, ``metrics.json`` and ``report.md`` for a T3S run.

`build_report` reads a run directory (see `t3s.run` for its layout) and
writes, into ``out_dir``:

* ``shock.png``: the "shock" plot. Top: the pilot's training loss per step
  (and the retraining runs' loss over the tokens they keep). Bottom: training
  and held-out accuracy per evaluation step of the pilot (plain SFT) and the
  held-out accuracy of the retrained models; the bottleneck step is marked.
* ``delta_hist.png``: histogram of Δc = c(θb) − c(θ0) per trace token (online,
  and exact when computed), with the anchor threshold Δc = 0.
* ``traces.png``: a few training traces, token by token, anchors (Δc > 0,
  left out of the T3S loss) highlighted.
* ``metrics.json``: `METRIC_KEYS` first (null when the run does not have the
  number), then details.
* ``report.md``: the table and plain statements of what happened, computed
  from the numbers only.

The plotting functions (`plot_shock`, `plot_delta_histogram`, `plot_traces`)
take plain Python data, so other drivers (the demo) can use them directly.
matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .run import _read_json

__all__ = [
    "METRIC_KEYS",
    "build_report",
    "collect_metrics",
    "plot_shock",
    "plot_delta_histogram",
    "plot_traces",
    "render_markdown",
]

#: The keys every metrics.json starts with, in this order (null when not available).
METRIC_KEYS = ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "bottleneck_step",
               "masked_fraction", "mask_agreement")

ANCHOR_COLOR = "#f4a261"   # anchors: left out of the T3S loss
KEPT_COLOR = "#cfe3f3"     # other trace tokens: kept in the loss
_ARM_STYLE = {
    "sft": dict(color="#d62728", label="plain SFT (pilot)"),
    "t3s": dict(color="#1f77b4", label="T3S"),
    "baseline": dict(color="#7f7f7f", label="baseline"),
}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("t3s reports need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

def _xy(series: Optional[Mapping[int, float]]) -> Tuple[List[int], List[float]]:
    if not series:
        return [], []
    steps = sorted(series)
    return steps, [float(series[s]) for s in steps]


def plot_shock(path, runs: Mapping[str, Mapping[str, Any]], *,
               bottleneck_step: Optional[int] = None, title: str = "") -> None:
    """The shock plot.

    runs: arm name ("sft" for the pilot, "t3s", "baseline", or any other) ->
    {"loss": {step: loss}, "train_acc": {step: acc}, "heldout_acc": {step: acc},
    "label": optional legend label}. The pilot's ("sft") training accuracy and
    loss are drawn solid; the other arms' held-out accuracy and loss dashed.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                          gridspec_kw=dict(height_ratios=[1, 1.35]))
    for arm, run in runs.items():
        style = dict(_ARM_STYLE.get(arm, dict(color=None, label=arm)))
        label = run.get("label") or style["label"]
        pilot = arm == "sft"
        steps, loss = _xy(run.get("loss"))
        if steps:
            ax_loss.plot(steps, loss, color=style["color"], lw=1.6 if pilot else 1.2,
                         ls="-" if pilot else "--",
                         label=label + ("" if pilot else ", loss on its kept tokens"))
        steps, acc = _xy(run.get("train_acc"))
        if steps and pilot:
            ax_acc.plot(steps, acc, color=style["color"], marker="o", ms=4, lw=1.8,
                        label=f"{label}: training accuracy")
        steps, acc = _xy(run.get("heldout_acc"))
        if steps:
            ax_acc.plot(steps, acc, color=style["color"], marker="s" if pilot else "^", ms=4,
                        lw=1.8 if pilot else 1.5, ls=":" if pilot else "--",
                        label=f"{label}: held-out accuracy")
    if bottleneck_step is not None:
        for ax in (ax_loss, ax_acc):
            ax.axvline(bottleneck_step, color="black", lw=1, ls="-.", alpha=0.7)
        ax_acc.annotate(f"bottleneck\nstep {bottleneck_step}", xy=(bottleneck_step, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(4, -4),
                        textcoords="offset points", va="top", fontsize=9)
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=9, loc="best", framealpha=0.85)
    ax_acc.set_ylabel("accuracy (greedy, verified)")
    ax_acc.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylim(-0.03, 1.03)
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=9, loc="best", framealpha=0.85)
    fig.suptitle(title or "Imitation shock: pilot SFT from θ0 and retraining", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_delta_histogram(path, deltas: Mapping[str, Sequence[float]], *, threshold: float = 0.0,
                         bins: int = 60, title: str = "") -> None:
    """Histogram of Δc per trace token; one series per source ("online", "exact").

    The range is clipped to the 0.5%–99.5% quantiles of all values (the counts
    outside are given in the legend); the threshold is drawn as a line and the
    share of tokens above it is written in the legend.
    """
    plt = _pyplot()
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in deltas.items() if len(v)}
    arrays = {k: v[np.isfinite(v)] for k, v in arrays.items()}
    fig, ax = plt.subplots(figsize=(8, 5.2))
    log_scale = False
    if arrays:
        allv = np.concatenate(list(arrays.values()))
        lo, hi = np.quantile(allv, [0.005, 0.995])
        lo, hi = min(lo, threshold), max(hi, threshold)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        colors = {"online": "#1f77b4", "exact": "#d62728"}
        for i, (name, v) in enumerate(arrays.items()):
            above = float(np.mean(v > threshold))
            outside = int(np.sum((v < lo) | (v > hi)))
            label = f"{name}: {v.size} tokens, {100 * above:.1f}% with Δc > {threshold:g}"
            if outside:
                label += f" ({outside} outside the range shown)"
            color = colors.get(name, f"C{i}")
            if i == 0:
                ax.hist(np.clip(v, lo, hi), bins=edges, color=color, alpha=0.55, label=label)
            else:
                ax.hist(np.clip(v, lo, hi), bins=edges, color=color, histtype="step", lw=1.6,
                        label=label)
        ax.axvline(threshold, color="black", lw=1.2, ls="--")
        ax.annotate(f"anchors (Δc > {threshold:g}) →", xy=(threshold, 0.97),
                    xycoords=("data", "axes fraction"), xytext=(6, 0),
                    textcoords="offset points", va="top", fontsize=9,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))
        counts = np.histogram(np.clip(next(iter(arrays.values())), lo, hi), bins=edges)[0]
        nonzero = counts[counts > 0]
        if nonzero.size and counts.max() > 20 * np.median(nonzero):
            ax.set_yscale("log")   # one tall bin (e.g. Δc ≈ 0) would hide the tails
            log_scale = True
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    else:
        ax.text(0.5, 0.5, "no Δc values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("Δc = log p(y_t | θb) − log p(y_t | θ0)")
    ax.set_ylabel("trace tokens" + (" (log scale)" if log_scale else ""))
    ax.grid(alpha=0.3)
    ax.set_title(title or "Confidence change per trace token", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _visible(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "→").replace("\r", "")


def plot_traces(path, examples: Sequence[Mapping[str, Any]], *, columns: int = 96,
                max_rows: int = 8, highlight_label: str = "anchor (Δc > 0): left out of the loss",
                other_label: str = "kept in the loss", title: str = "") -> None:
    """Traces drawn token by token on colored backgrounds.

    examples: dicts with ``tokens`` (the response tokens' text), ``highlight``
    (bool per token), and optionally ``title`` and ``prompt`` (drawn in grey
    before the tokens). Tokens are laid out in a monospace font, ``columns``
    characters per line, at most ``max_rows`` lines per example (the rest is
    cut with "…").
    """
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    rows: List[Tuple[str, Any]] = []   # ("title", text) | ("prompt", text) | ("tokens", [...])
    for ex in examples:
        rows.append(("title", ex.get("title", "")))
        prompt = _visible(str(ex.get("prompt", "")))
        if prompt:
            for i in range(0, min(len(prompt), columns * 2), columns):
                rows.append(("prompt", prompt[i:i + columns]))
        line, x, n_lines, cut = [], 0, 0, False
        for text, hl in zip(ex["tokens"], ex["highlight"]):
            text = _visible(text) or "∅"
            text = text[:columns]
            if x + len(text) > columns:
                rows.append(("tokens", line))
                n_lines += 1
                line, x = [], 0
                if n_lines >= max_rows:
                    cut = True
                    break
            line.append((x, text, bool(hl)))
            x += len(text)
        if line and not cut:
            rows.append(("tokens", line))
        if cut:
            rows.append(("prompt", "… (cut)"))
        rows.append(("gap", None))
    used = max([len(c) for k, c in rows if k == "prompt"]
               + [c[-1][0] + len(c[-1][1]) for k, c in rows if k == "tokens" and c] + [1])
    cols = max(min(columns, used), 64)    # narrow traces get a narrow figure
    char_in = 0.105
    font = char_in * 72 / 0.602          # DejaVu Sans Mono advance is 0.602 em
    row_in = max(char_in * 2.1, font * 1.55 / 72)
    width_in = 0.6 + cols * char_in
    height_in = 1.2 + row_in * len(rows)
    fig = plt.figure(figsize=(width_in, height_in))
    ax = fig.add_axes([0.3 / width_in, 0.15 / height_in, (width_in - 0.6) / width_in,
                       (height_in - 1.05) / height_in])
    ax.set_xlim(0, cols)
    ax.set_ylim(len(rows), 0)
    ax.axis("off")
    for r, (kind, content) in enumerate(rows):
        if kind == "title":
            ax.text(0, r + 0.55, content, va="center", ha="left", fontsize=font * 0.95,
                    fontweight="bold")
        elif kind == "prompt":
            ax.text(0, r + 0.55, content, va="center", ha="left", fontsize=font,
                    family="DejaVu Sans Mono", color="#777777")
        elif kind == "tokens":
            for x, text, hl in content:
                ax.add_patch(Rectangle((x + 0.06, r + 0.12), len(text) - 0.12, 0.8,
                                       facecolor=ANCHOR_COLOR if hl else KEPT_COLOR,
                                       edgecolor="none"))
                ax.text(x, r + 0.55, text, va="center", ha="left", fontsize=font,
                        family="DejaVu Sans Mono")
    fig.text(0.3 / width_in, 1 - 0.3 / height_in, title or "Example traces", fontsize=12,
             va="center")
    fig.legend(handles=[Patch(facecolor=ANCHOR_COLOR, label=highlight_label),
                        Patch(facecolor=KEPT_COLOR, label=other_label)],
               loc="center left", ncol=2, fontsize=9, frameon=False,
               bbox_to_anchor=(0.3 / width_in - 0.01, 1 - 0.68 / height_in))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------

def _history(stage_dir: Optional[Path]) -> Dict[str, Any]:
    """{"train_acc", "heldout_acc": {step: acc}, "loss": {step: loss}, "bottleneck_step"}."""
    out: Dict[str, Any] = {"train_acc": {}, "heldout_acc": {}, "loss": {}}
    if stage_dir is None:
        return out
    acc = stage_dir / "t3s_accuracy.json"
    if acc.is_file():
        data = _read_json(acc)
        for key in ("train_acc", "heldout_acc"):
            out[key] = {int(s): float(a) for s, a in (data.get(key) or {}).items()}
        out["bottleneck_step"] = data.get("bottleneck_step")
        out["eval_n"] = (data.get("settings") or {}).get("subset_size")
    log = stage_dir / "log_history.json"
    if log.is_file():
        for entry in _read_json(log):
            if isinstance(entry, dict) and "loss" in entry and "step" in entry:
                out["loss"][int(entry["step"])] = float(entry["loss"])
    return out


def _summary(stage_dir: Optional[Path]) -> Dict[str, Any]:
    if stage_dir is None or not (stage_dir / "stage.json").is_file():
        return {}
    return dict(_read_json(stage_dir / "stage.json").get("summary") or {})


def _default_stage_dirs(run_dir: Path) -> Dict[str, Optional[Path]]:
    from .run import RunDir
    from .stages import STAGE_NAMES
    ledger = RunDir(run_dir).ledger()
    return {name: (run_dir / name if name in ledger else None) for name in STAGE_NAMES}


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
    dirs = dict(stage_dirs) if stage_dirs is not None else _default_stage_dirs(run_dir)
    if config is None and (run_dir / "config.json").is_file():
        config = _read_json(run_dir / "config.json").get("config")
    config = dict(config or {})
    pilot, train, base_run = (_history(dirs.get(n)) for n in ("pilot", "train", "baseline"))
    pilot_sum, select_sum = _summary(dirs.get("pilot")), _summary(dirs.get("select"))
    eval_dir = dirs.get("eval")
    results = _read_json(eval_dir / "results.json") if eval_dir is not None and \
        (eval_dir / "results.json").is_file() else {}
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
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

    from .run import load_data, load_tokenizer
    tok = load_tokenizer(config)
    data = load_data(config, "train", tok)
    table = pq.read_table(select_dir / "selection.parquet",
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
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    dirs = dict(stage_dirs) if stage_dirs is not None else _default_stage_dirs(run_dir)
    if config is None and (run_dir / "config.json").is_file():
        config = _read_json(run_dir / "config.json").get("config")
    config = dict(config or {})
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
        plot_shock(out / "shock.png", runs, bottleneck_step=metrics.get("bottleneck_step"))
        figures.append(("Loss and accuracy per step (bottleneck marked)", "shock.png"))

    select_dir = dirs.get("select")
    if select_dir is not None:
        deltas = {}
        for name in ("online", "exact"):
            p = select_dir / f"delta_{name}.parquet"
            if p.is_file():
                deltas[name] = pq.read_table(p, columns=["delta"])["delta"].to_numpy()
        if deltas:
            plot_delta_histogram(out / "delta_hist.png", deltas)
            figures.append(("Δc per trace token", "delta_hist.png"))
        try:
            examples = _trace_examples(config, select_dir)
        except (ValueError, OSError, KeyError, ImportError) as e:
            examples = []
            notes.append(f"traces figure skipped: {e}")
        if examples:
            anchor_rule = metrics.get("rule") == "anchor" and not metrics.get("rule_params")
            labels = ({} if anchor_rule else
                      dict(highlight_label="anchor (Δc > 0)", other_label="other trace tokens"))
            plot_traces(out / "traces.png", examples,
                        title="Training traces: anchors (Δc > 0) highlighted", **labels)
            figures.append(("Example traces, anchors highlighted", "traces.png"))

    metrics_out = {k: metrics[k] for k in METRIC_KEYS}
    metrics_out.update({k: v for k, v in metrics.items() if k not in METRIC_KEYS})
    with open(out / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics_out, f, indent=1)
    text = render_markdown(metrics, config=config, figures=figures, run_dir=str(run_dir))
    if notes:
        text += "\n" + "\n".join(f"_Note: {s}_" for s in notes) + "\n"
    with open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(text)
    return metrics_out
