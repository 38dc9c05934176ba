"""The sensitivity stage's figure and report section, from ``sensitivity.json``.

`plot_sensitivity` draws the final accuracy of each retraining against the step its
mask was taken at (every eval set a series, each point labelled by its choices, b
marked) over the pilot's training-accuracy curve. `render_section` writes the table
(choice, step, anchors, overlap with b's mask, accuracy per set ± one binomial
standard error) and one sentence on the spread. `report_section` hands both to the
report stage (`t3s.pipeline.report.build`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..._util import pyplot
from .. import rundir
from ..rundir import read_json

__all__ = ["SECTION_TITLE", "plot_sensitivity", "render_section", "spread_sentence",
           "report_section"]

SECTION_TITLE = "## Sensitivity to the bottleneck choice (`t3s sensitivity`)"


def _se(p: Optional[float], n: Optional[int]) -> Optional[float]:
    """The binomial standard error sqrt(p(1−p)/n) (None without p or n)."""
    if p is None or not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _by_step(result: Mapping[str, Any]) -> Dict[int, List[str]]:
    """step -> the choice names trained there, in listing order."""
    out: Dict[int, List[str]] = {}
    for name, c in result["choices"].items():
        out.setdefault(int(c["step"]), []).append(name)
    return dict(sorted(out.items()))


def plot_sensitivity(path, result: Mapping[str, Any]) -> None:
    """Top: final accuracy per eval set against the mask's step (the headline set bold,
    with ± one standard error), each point labelled by its choices. Bottom: the pilot's
    training accuracy per evaluation. b is marked on both."""
    plt = pyplot()
    fig, (ax_acc, ax_pilot) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True,
                                           gridspec_kw=dict(height_ratios=[1.4, 1]))
    choices, b = result["choices"], result["bottleneck_step"]
    groups = _by_step(result)
    for i, key in enumerate(result["sets"]):
        xs, ys, errs = [], [], []
        for step, names in groups.items():
            c = choices[names[0]]
            if c["accuracy"].get(key) is not None:
                xs.append(step)
                ys.append(c["accuracy"][key])
                errs.append(_se(c["accuracy"][key], c["n"].get(key)) or 0.0)
        if not xs:
            continue
        head = i == 0
        ax_acc.errorbar(xs, ys, yerr=errs if head else None, fmt="o" if head else "s",
                        ms=7 if head else 5, capsize=3, lw=1.2,
                        label=f"{key}{' (headline)' if head else ''}, ± 1 s.e." if head
                        else key, alpha=1.0 if head else 0.7)
        if head:
            for x, y in zip(xs, ys):
                ax_acc.annotate("\n".join(groups[x]), xy=(x, y), xytext=(5, 4),
                                textcoords="offset points", fontsize=8)
    pilot = {int(s): a for s, a in (result.get("pilot_train_acc") or {}).items()}
    if pilot:
        steps = sorted(pilot)
        ax_pilot.plot(steps, [pilot[s] for s in steps], color="#d62728", marker="o", ms=4,
                      lw=1.6, label="pilot: training accuracy (subset)")
        chosen = [s for s in groups if s in pilot]
        ax_pilot.scatter(chosen, [pilot[s] for s in chosen], s=60, facecolors="none",
                         edgecolors="black", zorder=3, label="steps the masks were taken at")
    for ax in (ax_acc, ax_pilot):
        if b is not None:
            ax.axvline(b, color="black", lw=1, ls="-.", alpha=0.7)
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.03, 1.03)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", framealpha=0.85)
    if b is not None:
        ax_acc.annotate(f"b = {b}", xy=(b, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(4, -4), textcoords="offset points", va="top", fontsize=9)
    ax_acc.margins(x=0.1)   # room for the labels of the last point
    ax_acc.set_ylabel("final accuracy of the retraining\n(greedy, verified)")
    ax_pilot.set_ylabel("pilot training accuracy")
    ax_pilot.set_xlabel("pilot step the anchor mask was taken at")
    from matplotlib.ticker import MaxNLocator
    ax_pilot.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("T3S retrained from masks taken at other bottleneck choices", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def spread_sentence(result: Mapping[str, Any]) -> str:
    """The spread (max − min) of the headline accuracy over the trained steps against
    two binomial standard errors at their mean accuracy."""
    key = result.get("headline_set")
    if key is None:
        return "No eval set (test or heldout) was given, so no accuracy was measured."
    points = {}
    for step, names in _by_step(result).items():
        c = result["choices"][names[0]]
        if c["accuracy"].get(key) is not None:
            points[step] = (c["accuracy"][key], c["n"][key], names)
    if len(points) < 2:
        return f"Only one step was trained, so the {key} accuracy has no spread to compare."
    lo = min(points.items(), key=lambda kv: kv[1][0])
    hi = max(points.items(), key=lambda kv: kv[1][0])
    spread = hi[1][0] - lo[1][0]
    n = min(v[1] for v in points.values())
    if spread == 0:
        return (f"The {key} accuracy (n={n}) is {lo[1][0]:.3f} at each of the {len(points)} "
                "trained steps: no spread.")
    mean = sum(v[0] for v in points.values()) / len(points)
    noise = 2 * (_se(mean, n) or 0.0)
    verdict = ("within" if spread <= noise else "larger than")
    return (f"Across the {len(points)} trained steps the {key} accuracy (n={n}) spans "
            f"{spread:.3f}, from {lo[1][0]:.3f} ({', '.join(lo[1][2])}, step {lo[0]}) to "
            f"{hi[1][0]:.3f} ({', '.join(hi[1][2])}, step {hi[0]}): {verdict} two binomial "
            f"standard errors ({noise:.3f} at their mean accuracy {mean:.3f}).")


def render_section(result: Mapping[str, Any]) -> str:
    """``sensitivity.md``: what was done, the table, the skipped choices, the spread."""
    b, sets = result["bottleneck_step"], result["sets"]
    lines = [SECTION_TITLE, "",
             f"T3S retrained from θ0 with the anchor mask (Δc > 0 left out of the loss; online "
             f"Δc from the pilot's trajectory against c(θ0)) taken at other steps than the "
             f"bottleneck b = {b} (the argmin of the pilot's training accuracy), each scored on "
             f"every eval set like the eval stage (greedy, the verifier). Accuracy ± one "
             f"binomial standard error sqrt(p(1−p)/n); overlap: the Jaccard index of the "
             f"tokens left out, against b's mask. train_loss_min uses, at each evaluated "
             f"step, the latest logged training loss at or below it.", ""]
    head = ["choice", "step", "anchors", "overlap with b's mask"] + \
        [f"{k} (n={_first_n(result, k)})" for k in sets]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in result["choices"].items():
        tags = (["b"] if c["step"] == b else []) + (["reused"] if c["reused"] else [])
        cells = [f"{name}" + (f" ({', '.join(tags)})" if tags else ""), str(c["step"]),
                 f"{100 * c['anchor_fraction']:.1f}%", f"{c['mask_overlap_with_default']:.2f}"]
        for k in sets:
            p, se = c["accuracy"].get(k), _se(c["accuracy"].get(k), c["n"].get(k))
            cells.append("n/a" if p is None else f"{p:.3f} ± {se:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    same = [names for names in _by_step(result).values() if len(names) > 1]
    if same:
        lines.append("Trained once for several choices (the same step): "
                     + "; ".join(" = ".join(n) for n in same) + ".")
    if any(c["reused"] for c in result["choices"].values()):
        lines.append("The train stage's T3S model was reused for b (it trained the same mask).")
    if "heldout_acc_min" in result["choices"] and "heldout" in sets:
        lines.append("heldout_acc_min picks its step by the held-out accuracy during the pilot "
                     "(the held-out problems scored here, or a subset of them), so its score is "
                     "optimistic.")
    if result["skipped"]:
        lines.append("Skipped: " + "; ".join(f"{n} ({why})" for n, why in
                                            result["skipped"].items()) + ".")
    lines += ["", spread_sentence(result), "",
              f"![Final accuracy against the step of the mask]({rundir.SENSITIVITY_FIGURE})", ""]
    return "\n".join(lines)


def _first_n(result: Mapping[str, Any], key: str) -> Any:
    return next((c["n"].get(key) for c in result["choices"].values()
                 if c["n"].get(key) is not None), "?")


def report_section(stage_dir: Optional[Path], out_dir: Path
                   ) -> Optional[Tuple[str, Dict[str, Optional[float]]]]:
    """For the report: (the section's Markdown, choice -> headline accuracy), the figure
    copied into ``out_dir``; None when the stage has no outputs in ``stage_dir``."""
    if stage_dir is None or not (stage_dir / rundir.SENSITIVITY_SECTION).is_file():
        return None
    if (stage_dir / rundir.SENSITIVITY_FIGURE).is_file():
        shutil.copyfile(stage_dir / rundir.SENSITIVITY_FIGURE, out_dir / rundir.SENSITIVITY_FIGURE)
    result = read_json(stage_dir / rundir.SENSITIVITY_FILE)
    key = result.get("headline_set")
    headline = {n: (c["accuracy"].get(key) if key else None)
                for n, c in result["choices"].items()}
    return (stage_dir / rundir.SENSITIVITY_SECTION).read_text(encoding="utf-8"), headline
