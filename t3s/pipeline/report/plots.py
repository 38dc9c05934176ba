"""The figures of a T3S report, from plain Python data (so other drivers can draw them).

* `plot_shock`: the "shock" plot. Top: the pilot's training loss per step
  (and the retraining runs' loss over the tokens they keep). Bottom: training
  and held-out accuracy per evaluation step of the pilot (plain SFT) and the
  held-out accuracy of the retrained models; the bottleneck step is marked.
* `plot_delta_histogram`: histogram of Δc = c(θb) − c(θ0) per trace token
  (online, and exact when computed), with the anchor threshold Δc = 0.
* `plot_traces`: a few training traces, token by token, anchors (Δc > 0,
  left out of the T3S loss) highlighted.

matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from ..._util import pyplot

__all__ = ["plot_shock", "plot_delta_histogram", "plot_traces", "ANCHOR_COLOR", "KEPT_COLOR"]

ANCHOR_COLOR = "#f4a261"   # anchors: left out of the T3S loss
KEPT_COLOR = "#cfe3f3"     # other trace tokens: kept in the loss
_ARM_STYLE = {
    "sft": dict(color="#d62728", label="plain SFT (pilot)"),
    "t3s": dict(color="#1f77b4", label="T3S"),
    "baseline": dict(color="#7f7f7f", label="baseline"),
}


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

def _xy(series: Optional[Mapping[int, float]]) -> Tuple[List[int], List[float]]:
    if not series:
        return [], []
    steps = sorted(series)
    return steps, [float(series[s]) for s in steps]


def plot_shock(path, runs: Mapping[str, Mapping[str, Any]], *,
               bottleneck_step: Optional[int] = None, title: str = "",
               measured_on: Optional[Mapping[str, str]] = None) -> None:
    """The shock plot.

    runs: arm name ("sft" for the pilot, "t3s", "baseline", or any other) ->
    {"loss": {step: loss}, "train_acc": {step: acc}, "heldout_acc": {step: acc},
    "label": optional legend label, "color": optional colour (arms without a style of
    their own)}. The pilot's ("sft") training accuracy and loss are drawn solid; the
    other arms' held-out accuracy and loss dashed.
    measured_on: "train_acc" / "heldout_acc" -> what that accuracy was measured on
    (e.g. "on 64 of the 200 held-out problems"), added to the legend.
    """
    plt = pyplot()
    on = {k: f" ({v})" if v else "" for k, v in (measured_on or {}).items()}
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(9, 8.2), sharex=True,
                                          gridspec_kw=dict(height_ratios=[1, 1.35]))
    for arm, run in runs.items():
        style = dict(_ARM_STYLE.get(arm, dict(color=run.get("color"), label=arm)))
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
                        label=f"{label}: training accuracy{on.get('train_acc', '')}")
        steps, acc = _xy(run.get("heldout_acc"))
        if steps:
            ax_acc.plot(steps, acc, color=style["color"], marker="s" if pilot else "^", ms=4,
                        lw=1.8 if pilot else 1.5, ls=":" if pilot else "--",
                        label=f"{label}: held-out accuracy{on.get('heldout_acc', '')}")
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
    ax_acc.set_ylabel("accuracy during training\n(greedy, verified)")
    ax_acc.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylim(-0.03, 1.03)
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        # below the axes: the labels name each curve's set and size, too long to sit on
        # top of the curves
        ax_acc.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1,
                      frameon=False)
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
    plt = pyplot()
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
    plt = pyplot()
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
