"""``t3s demo --seeds 0,1,2``: the demo over several seeds, summarised as mean ± standard error.

Each seed is an ordinary demo run directory, ``DIR/seed-<s>/`` (`t3s.demo.main` with
``seed=s``: the seed draws the traces, the held-out problems, the data order, the
evaluation subsets and the random mask; the base student is the same). A seed
directory that is finished is skipped, an interrupted one resumes, exactly as a
single demo does. Then `summarize` reads every seed's ``eval/results.json`` and
``report/metrics.json`` and writes ``DIR/summary/``:

* ``metrics.json``: for every arm and every evaluated set, the per-seed accuracies,
  their mean and standard error (sample standard deviation / √seeds); the headline
  set's means as ``<arm>_acc`` (``base_acc``, ``sft_acc``, ``t3s_acc``,
  ``baseline_acc``, and one per extra arm, e.g. ``dft_acc``, ``rho1_acc``,
  ``static_acc``) with ``<arm>_acc_per_seed`` and ``<arm>_acc_se`` beside them, and
  the per-seed bottleneck steps and masked fractions;
* ``summary.md``: the table (arm × set, mean ± SE, n seeds), one line per comparison
  of T3S with every other arm (difference of means ± its SE, paired by seed), and the
  trajectory signals as selection rules (agreement with the anchors, overlap of the
  dropped tokens with T3S's, accuracy of their arms; `SIGNAL_ARMS`), and the bottleneck
  sensitivity over the seeds that ran ``t3s sensitivity``;
* ``arms.png``: the table as grouped bars with error bars, one group per set;
* ``curves.png``: the held-out accuracy during training (mean ± SE over seeds) of the
  pilot (plain SFT) and T3S, which shows the shock and how T3S avoids it.

Paths in ``metrics.json`` are relative to ``DIR`` and links in ``summary.md`` to
``DIR/summary/``, so that the directory can be moved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .._util import mean_and_se, pyplot
from ..pipeline.report.arms import arm_label
from ..pipeline.rundir import read_json, write_json

__all__ = ["SUMMARY_DIR", "SUMMARY_METRICS", "SUMMARY_REPORT", "ARMS_FIGURE", "CURVES_FIGURE",
           "SIGNAL_ARMS", "seed_dir", "parse_seeds", "mean_se", "summarize", "run_seeds"]

SUMMARY_DIR = "summary"
SUMMARY_METRICS = "metrics.json"
SUMMARY_REPORT = "summary.md"
ARMS_FIGURE = "arms.png"
CURVES_FIGURE = "curves.png"

#: how the summary names the arms every run has (the others: the report's own labels,
#: `t3s.pipeline.report.arms.arm_label`)
_RUN_ARM_LABELS = {"base": "base (θ0)", "sft": "plain SFT", "t3s": "T3S"}


def seed_dir(out: os.PathLike, seed: int) -> Path:
    """The run directory of ``seed`` inside a multi-seed demo directory ``out``."""
    return Path(out) / f"seed-{int(seed)}"


def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"`` or ``"0-2"`` -> [0, 1, 2]; ValueError on anything else, on a negative
    seed, or on a repeated one."""
    seeds: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"seeds must be integers like 0,1,2 or 0-2, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds must be non-negative integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed is repeated in {text!r}")
    return seeds


def mean_se(values: Sequence[float]) -> Dict[str, Any]:
    """{"mean", "se", "n", "per_seed"}: the standard error is the sample standard
    deviation over √n (None with fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "se": None, "n": 0, "per_seed": []}
    mean, se = mean_and_se(vals)
    return {"mean": mean, "se": se, "n": len(vals), "per_seed": vals}


def _label(arm: str, metrics: Mapping[str, Any]) -> str:
    if arm == "baseline":
        return arm_label(metrics.get("baseline_rule") or "baseline") + " [baseline]"
    return _RUN_ARM_LABELS.get(arm) or arm_label(arm)


def _fmt(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3f}" + (f" ± {stat['se']:.3f}" if stat["se"] is not None else "")


#: what a seed of the demo changes (summary.md says it)
DEMO_SEEDS_VARY = "its own traces, held-out problems, data order and random mask"


def summarize(out: os.PathLike, seeds: Sequence[int], *, title: str = "The demo",
              seeds_vary: str = DEMO_SEEDS_VARY) -> Dict[str, Any]:
    """Write ``out/summary/`` (see the module docstring) from the finished seed
    directories and return its metrics. FileNotFoundError names a seed whose eval or
    report stage has not finished. ``title`` heads summary.md ("<title> over N seeds");
    ``seeds_vary`` completes its sentence "Each seed draws ..."."""
    from ..pipeline.rundir import METRICS_FILE, RESULTS_FILE
    out = Path(out)
    per_seed = []
    for s in seeds:
        d = seed_dir(out, s)
        try:
            per_seed.append((s, read_json(d / "eval" / RESULTS_FILE), read_json(d / "report" / METRICS_FILE),
                             _curves(d)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{d} has no finished eval and report; run the demo for "
                                    f"seed {s} first") from None
    first_results, first_metrics = per_seed[0][1], per_seed[0][2]
    set_keys = list(first_results["sets"])
    arms: List[str] = []
    for _, results, _, _ in per_seed:   # every arm any seed scored, in the order scored
        for key in set_keys:
            arms += [a for a in results["sets"].get(key, {}).get("arms", {}) if a not in arms]
    table: Dict[str, Dict[str, Any]] = {}
    for arm in arms:
        table[arm] = {key: mean_se([r["sets"][key]["arms"][arm]["accuracy"] for _, r, _, _ in per_seed
                                    if arm in r["sets"].get(key, {}).get("arms", {})])
                      for key in set_keys}
    headline = first_results.get("test_key", set_keys[0])
    sets = {key: {"file": Path(first_results["sets"][key]["path"]).name,
                  "n": first_results["sets"][key]["n"]} for key in set_keys}
    metrics: Dict[str, Any] = {
        "seeds": list(seeds), "headline_set": headline, "sets": sets,
        "arms": {arm: {"label": _label(arm, first_metrics), **table[arm]} for arm in arms},
        "bottleneck_step_per_seed": [m.get("bottleneck_step") for _, _, m, _ in per_seed],
        "masked_fraction_per_seed": [m.get("masked_fraction") for _, _, m, _ in per_seed],
        "baseline_rule": first_metrics.get("baseline_rule"),
        "seed_dirs": [seed_dir(".", s).as_posix() for s in seeds],
    }
    for arm in arms:
        stat = table[arm][headline]
        metrics[f"{arm}_acc"] = stat["mean"]
        metrics[f"{arm}_acc_se"] = stat["se"]
        metrics[f"{arm}_acc_per_seed"] = stat["per_seed"]
    metrics["comparisons"] = _comparisons(per_seed, arms, set_keys)
    metrics["verifier_free_bottleneck_step_per_seed"] = [
        m.get("verifier_free_bottleneck_step") for _, _, m, _ in per_seed]
    metrics["signals"] = _signals([seed_dir(out, s) for s in seeds], table, headline)
    metrics["sensitivity"] = _sensitivity([seed_dir(out, s) for s in seeds])
    summary_dir = out / SUMMARY_DIR
    summary_dir.mkdir(parents=True, exist_ok=True)
    _plot_arms(summary_dir / ARMS_FIGURE, metrics, arms, set_keys)
    curves = _mean_curves([c for _, _, _, c in per_seed])
    _plot_curves(summary_dir / CURVES_FIGURE, curves, len(seeds))
    metrics["heldout_curves"] = curves
    write_json(summary_dir / SUMMARY_METRICS, metrics)
    (summary_dir / SUMMARY_REPORT).write_text(_markdown(metrics, arms, set_keys, title, seeds_vary),
                                              encoding="utf-8")
    return metrics


def _comparisons(per_seed, arms: Sequence[str], set_keys: Sequence[str]) -> Dict[str, Any]:
    """T3S minus each other arm, per set: the mean of the per-seed differences and its SE
    (paired by seed: the arms of one seed share its data)."""
    out: Dict[str, Any] = {}
    if "t3s" not in arms:
        return out
    for arm in arms:
        if arm == "t3s":
            continue
        for key in set_keys:
            diffs = [r["sets"][key]["arms"]["t3s"]["accuracy"] - r["sets"][key]["arms"][arm]["accuracy"]
                     for _, r, _, _ in per_seed
                     if {"t3s", arm} <= set(r["sets"].get(key, {}).get("arms", {}))]
            out.setdefault(arm, {})[key] = mean_se(diffs)
    return out


#: trajectory signal (`t3s.analysis.trajectory_signals`) -> the arm whose rule selects by it
SIGNAL_ARMS = {"delta_conf": "t3s", "delta_entropy": "entropy", "delta_logit_grad": "logit_grad",
               "kl": "kl"}


def _dropped(path: Path):
    """The keys of the tokens a mask artifact leaves out of the loss (None when unreadable)."""
    import pyarrow.parquet as pq
    try:
        t = pq.read_table(path, columns=["example_id", "position", "loss_mask"])
    except (OSError, ValueError, KeyError):
        return None
    keep = t["loss_mask"].to_numpy(zero_copy_only=False).astype(bool)
    ids, pos = t["example_id"].to_numpy(), t["position"].to_numpy()
    return {(int(i), int(p)) for i, p, k in zip(ids, pos, keep) if not k}


def _signals(run_dirs: Sequence[Path], table: Mapping[str, Any], headline: str) -> Dict[str, Any]:
    """Each trajectory signal as a selection rule, over the seeds: its agreement with the
    Δc anchors on the diagnostics' examples (AUC, overlap: `t3s.analysis.signal_agreement`),
    the Jaccard overlap of the tokens its arm drops with those T3S drops (every trace
    token), and its arm's final accuracy on the headline set."""
    from ..pipeline.rundir import ANALYSIS_FILE, SELECTION_FILE, arm_file
    out: Dict[str, Any] = {}
    for signal, arm in SIGNAL_ARMS.items():
        auc, overlap, jaccard = [], [], []
        for d in run_dirs:
            try:
                agree = (read_json(d / "analyze" / ANALYSIS_FILE).get("trajectory_signals") or {})
            except FileNotFoundError:
                agree = {}
            if signal in agree:
                auc.append(agree[signal]["auc"])
                if agree[signal].get("overlap") is not None:
                    overlap.append(agree[signal]["overlap"])
            if arm != "t3s":
                ours, theirs = (_dropped(d / "select" / SELECTION_FILE),
                                _dropped(d / "select" / arm_file(arm)))
                if ours is not None and theirs is not None and (ours or theirs):
                    jaccard.append(len(ours & theirs) / len(ours | theirs))
        out[signal] = {"arm": arm, "auc_vs_anchors": mean_se(auc),
                       "overlap_vs_anchors": mean_se(overlap),
                       "dropped_jaccard_vs_t3s": mean_se(jaccard) if arm != "t3s" else None,
                       "accuracy": table.get(arm, {}).get(headline)}
    return out


def _sensitivity(run_dirs: Sequence[Path]) -> Optional[Dict[str, Any]]:
    """The bottleneck-sensitivity sweep over the seeds that ran it (`t3s sensitivity`):
    choice -> {"step_per_seed", "accuracy": {set: mean ± SE}}; None when no seed did."""
    from ..pipeline.rundir import SENSITIVITY_FILE
    runs = []
    for d in run_dirs:
        try:
            runs.append(read_json(d / "sensitivity" / SENSITIVITY_FILE))
        except FileNotFoundError:
            continue
    if not runs:
        return None
    names: List[str] = []
    for r in runs:
        names += [n for n in r["choices"] if n not in names]
    out: Dict[str, Any] = {"seeds_with_sweep": len(runs), "choices": {}}
    for name in names:
        have = [r["choices"][name] for r in runs if name in r["choices"]]
        keys = list(have[0]["accuracy"])
        out["choices"][name] = {
            "step_per_seed": [c["step"] for c in have],
            "anchor_fraction": mean_se([c["anchor_fraction"] for c in have]),
            "mask_overlap_with_default": mean_se([c["mask_overlap_with_default"] for c in have
                                                  if c["mask_overlap_with_default"] is not None]),
            "accuracy": {k: mean_se([c["accuracy"][k] for c in have if k in c["accuracy"]])
                         for k in keys}}
    return out


def _curves(run_dir: Path) -> Dict[str, Dict[int, float]]:
    """The held-out accuracy during training of the pilot ("sft") and of T3S ("t3s")."""
    from ..pipeline.rundir import ACCURACY_FILE
    out = {}
    for arm, stage in (("sft", "pilot"), ("t3s", "train")):
        try:
            acc = read_json(run_dir / stage / ACCURACY_FILE).get("heldout_acc") or {}
        except FileNotFoundError:
            continue
        out[arm] = {int(k): float(v) for k, v in acc.items()}
    return out


def _mean_curves(curves: Sequence[Mapping[str, Mapping[int, float]]]) -> Dict[str, Any]:
    """arm -> {"step": [...], "mean": [...], "se": [...]} over the steps every seed has."""
    out: Dict[str, Any] = {}
    for arm in ("sft", "t3s"):
        have = [c[arm] for c in curves if arm in c]
        if not have:
            continue
        steps = sorted(set.intersection(*(set(c) for c in have)))
        stats = [mean_se([c[s] for c in have]) for s in steps]
        out[arm] = {"step": steps, "mean": [x["mean"] for x in stats],
                    "se": [x["se"] for x in stats]}
    return out


def _plot_arms(path: Path, metrics: Mapping[str, Any], arms: Sequence[str],
               set_keys: Sequence[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(arms) * len(set_keys) / 2, 4.2))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        xs, ys, es = [], [], []
        for j, key in enumerate(set_keys):
            stat = metrics["arms"][arm][key]
            if stat["mean"] is None:
                continue
            xs.append(j + (i - (len(arms) - 1) / 2) * width)
            ys.append(stat["mean"])
            es.append(stat["se"] or 0.0)
        ax.bar(xs, ys, width * 0.95, yerr=es, capsize=3, label=metrics["arms"][arm]["label"])
    ax.set_xticks(range(len(set_keys)))
    ax.set_xticklabels([f"{k} ({metrics['sets'][k]['file']}, n={metrics['sets'][k]['n']})"
                        for k in set_keys])
    ax.set_ylabel("accuracy (mean ± SE over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Final accuracy of each arm, {len(metrics['seeds'])} seeds")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(path: Path, curves: Mapping[str, Any], n_seeds: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for arm, color, label in (("sft", "#d62728", "plain SFT (pilot)"), ("t3s", "#1f77b4", "T3S")):
        if arm not in curves:
            continue
        c = curves[arm]
        lo = [m - (e or 0.0) for m, e in zip(c["mean"], c["se"])]
        hi = [m + (e or 0.0) for m, e in zip(c["mean"], c["se"])]
        ax.plot(c["step"], c["mean"], color=color, label=label)
        ax.fill_between(c["step"], lo, hi, color=color, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy during training")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Held-out accuracy during training, mean ± SE over {n_seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(metrics: Mapping[str, Any], arms: Sequence[str], set_keys: Sequence[str],
              title: str, seeds_vary: str) -> str:
    seeds = metrics["seeds"]
    lines = [f"# {title} over {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "Final accuracy of each arm (greedy answers, checked by the verifier), mean ± "
             f"standard error over the seeds. Each seed draws {seeds_vary}; "
             "every arm trains with the same steps and learning "
             "rate. Per-seed reports: " + ", ".join(f"[seed {s}](../{d}/report/report.md)" for s, d
                                                    in zip(seeds, metrics["seed_dirs"])) + ".", "",
             "| arm | " + " | ".join(f"{k} (`{metrics['sets'][k]['file']}`, n={metrics['sets'][k]['n']})"
                                      for k in set_keys) + " |",
             "|---|" + "---|" * len(set_keys)]
    for arm in arms:
        lines.append(f"| {metrics['arms'][arm]['label']} | "
                     + " | ".join(_fmt(metrics["arms"][arm][k]) for k in set_keys) + " |")
    lines += ["", f"Bottleneck step per seed: {metrics['bottleneck_step_per_seed']}; "
              "fraction of trace tokens T3S left out: "
              + ", ".join("–" if f is None else f"{f:.3f}" for f in metrics["masked_fraction_per_seed"])
              + ".", "", "## T3S against each arm", "",
              "Mean of the per-seed differences (T3S − arm) ± its standard error; a difference "
              "within two standard errors of zero is not distinguished from noise by these "
              "seeds.", ""]
    for arm, by_set in metrics["comparisons"].items():
        parts = []
        for key in set_keys:
            st = by_set.get(key)
            if not st or st["mean"] is None:
                continue
            verdict = ""
            if st["se"] is not None:
                verdict = (" (within noise)" if abs(st["mean"]) <= 2 * st["se"] else
                           (" (T3S higher)" if st["mean"] > 0 else " (T3S lower)"))
            parts.append(f"{key} {st['mean']:+.3f}" + (f" ± {st['se']:.3f}" if st["se"] is not None
                                                       else "") + verdict)
        lines.append(f"- vs {metrics['arms'][arm]['label']}: " + "; ".join(parts))
    lines += ["", "## Trajectory signals as selection rules", "",
              "Agreement with the Δc anchors on the diagnostics' examples (ROC AUC, 0.5 = chance; "
              "overlap: Jaccard of the anchors and as many tokens ranked first by the signal), "
              "the Jaccard overlap of the tokens each rule's arm leaves out with those T3S leaves "
              "out (every trace token), and the arm's final accuracy on the headline set "
              f"(`{metrics['headline_set']}`); mean ± SE over the seeds.", "",
              "| signal | its arm | AUC vs anchors | overlap vs anchors | dropped-token Jaccard "
              "vs T3S | accuracy |", "|---|---|---|---|---|---|"]
    for signal, row in metrics["signals"].items():
        if row["accuracy"] is None and row["auc_vs_anchors"]["mean"] is None:
            continue
        jac = row["dropped_jaccard_vs_t3s"]
        lines.append(f"| `{signal}` | {row['arm']} | {_fmt(row['auc_vs_anchors'])} | "
                     f"{_fmt(row['overlap_vs_anchors'])} | {'(itself)' if jac is None else _fmt(jac)}"
                     f" | {'–' if row['accuracy'] is None else _fmt(row['accuracy'])} |")
    lines += ["", f"Verifier-free bottleneck step per seed (agreement of the pilot's greedy "
              f"answers with θ0's own): {metrics['verifier_free_bottleneck_step_per_seed']}; "
              f"the verifier's: {metrics['bottleneck_step_per_seed']}."]
    sens = metrics.get("sensitivity")
    if sens:
        keys = list(next(iter(sens["choices"].values()))["accuracy"])
        lines += ["", "## Bottleneck sensitivity (`t3s sensitivity`)", "",
                  f"T3S retrained from the anchor mask at other steps of the pilot, over the "
                  f"{sens['seeds_with_sweep']} seed(s) that ran the sweep; mean ± SE.", "",
                  "| choice | step per seed | anchors | overlap with b's mask | "
                  + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
        for name, c in sens["choices"].items():
            lines.append(f"| {name} | {', '.join(map(str, c['step_per_seed']))} | "
                         f"{_fmt(c['anchor_fraction'])} | {_fmt(c['mask_overlap_with_default'])} | "
                         + " | ".join(_fmt(c["accuracy"][k]) for k in keys) + " |")
    lines += ["", f"![Final accuracy of each arm]({ARMS_FIGURE})", "",
              f"![Held-out accuracy during training]({CURVES_FIGURE})", ""]
    return "\n".join(lines)


def run_seeds(run_one: Callable[..., Mapping[str, Any]], seeds: Sequence[int], out: os.PathLike,
              *, say: Callable[[str], None] = print, label: str = "t3s demo",
              summary: Optional[Mapping[str, str]] = None, **kwargs) -> Dict[str, Any]:
    """Run ``run_one(out=<seed dir>, seed=s, say=say, **kwargs)`` (`t3s.demo.main`, or any
    function that finishes a `t3s run` there) for every seed in turn, then `summarize`
    (``summary``: its ``title`` and ``seeds_vary``); returns the summary's metrics.
    ``label`` starts the progress lines."""
    out = Path(out)
    for s in seeds:
        say(f"{label}: seed {s} of {list(seeds)} in {seed_dir(out, s)}")
        run_one(out=str(seed_dir(out, s)), seed=s, say=say, **kwargs)
    metrics = summarize(out, seeds, **(summary or {}))
    say(f"{label}: summary over seeds {list(seeds)} in {out / SUMMARY_DIR / SUMMARY_REPORT}")
    for stat in metrics["arms"].values():
        say(f"  {stat['label']}: " + "; ".join(f"{k} {_fmt(stat[k])}" for k in metrics["sets"]))
    return metrics
