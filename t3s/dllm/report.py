"""The report of a run with ``objective: diffusion``: metrics.json, report.md, shock.png.

`diffusion_report` writes, into the report stage's directory:

* ``metrics.json``: ``base_acc``, ``sft_acc``, ``t3s_acc``, ``baseline_acc``
  (the diffusion θ0, plain diffusion SFT when ``sft_model`` was scored, T3S
  with the forced set, the same-size random forced set; null when absent),
  ``forced_fraction`` (forced / trace tokens of the T3S arm), then details:
  ``n_test``, ``accuracy_set``, ``accuracy_by_set``, ``baseline_forced_fraction``,
  ``tau``, ``bottleneck_step`` (of the AR selector's pilot), the curves;
* ``shock.png``: loss and accuracy per step of the AR selector's pilot and of the
  diffusion arms (`t3s.pipeline.report.plots.plot_shock`; the diffusion losses are the
  1/t-weighted masked-diffusion loss, not comparable with the AR loss);
* ``report.md``: what each arm is, the table, and plain statements computed from
  the numbers.

Pipeline layer: the report stage (`t3s.pipeline.stages`) calls it for a diffusion run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..pipeline import rundir
from ..pipeline.report.metrics import shown_path, stage_history, stage_summary
from ..pipeline.report.plots import plot_shock
from ..pipeline.rundir import read_json

__all__ = ["DIFFUSION_METRIC_KEYS", "diffusion_report"]

#: the keys the metrics.json of a diffusion run starts with
DIFFUSION_METRIC_KEYS = ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "forced_fraction")


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def diffusion_report(out: Path, dirs: Mapping[str, Optional[Path]], cfg: Mapping[str, Any]
                     ) -> Dict[str, Any]:
    """Write the report of a diffusion run into ``out`` (see the module docstring);
    returns the metrics."""
    run_dir = cfg.get("run_dir") or ""   # metrics.json names paths inside it relatively
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if dirs.get("eval") is not None and (dirs["eval"] / rundir.RESULTS_FILE).is_file():
        results = read_json(dirs["eval"] / rundir.RESULTS_FILE)
    arms = results.get("arms") or {}
    pilot, select = stage_summary(dirs.get("pilot")), stage_summary(dirs.get("select"))
    train, base_run = stage_summary(dirs.get("train")), stage_summary(dirs.get("baseline"))
    m: Dict[str, Any] = {f"{a}_acc": (arms[a]["accuracy"] if a in arms else None)
                         for a in ("base", "sft", "t3s", "baseline")}
    m["forced_fraction"] = train.get("forced_fraction", select.get("masked_fraction"))
    m.update({
        "objective": "diffusion",
        "accuracy_set": results.get("test_key"),
        "test_set": shown_path(results.get("test_set"), run_dir),
        "n_test": {a: v.get("n") for a, v in arms.items()},
        "accuracy_by_set": {k: {a: v["accuracy"] for a, v in (d.get("arms") or {}).items()}
                            for k, d in (results.get("sets") or {}).items()},
        "generation": results.get("generation"),
        "baseline_forced_fraction": base_run.get("forced_fraction"),
        "logged_forced_fraction": train.get("logged_forced_fraction"),
        "rule": cfg.get("rule"), "rule_params": select.get("rule_params"),
        "baseline_rule": None if cfg.get("baseline") in (None, "none") else cfg.get("baseline"),
        "forced_weight": cfg.get("forced_weight"),
        "selector": shown_path(cfg.get("model"), run_dir),
        "diffusion_model": shown_path(cfg.get("diffusion_model"), run_dir),
        "sft_model": shown_path(cfg.get("sft_model"), run_dir),
        "bottleneck_step": pilot.get("bottleneck_step", select.get("bottleneck_step")),
        "selector_pilot_train_acc": {str(k): v for k, v in
                                     sorted(stage_history(dirs.get("pilot"))["train_acc"].items())},
    })
    runs = {}
    sft_dir = Path(cfg["sft_model"]).parent if cfg.get("sft_model") else None
    for arm, d, label in (("sft", dirs.get("pilot"), "AR selector: plain SFT (pilot)"),
                          ("dsft", sft_dir, "diffusion: plain SFT"),
                          ("t3s", dirs.get("train"), "diffusion: T3S (forced set)"),
                          ("baseline", dirs.get("baseline"), "diffusion: random forced set")):
        c = stage_history(d)
        if c["loss"] or c["heldout_acc"] or c["train_acc"]:
            runs[arm] = {**c, "label": label}
            m[f"{arm}_heldout_acc_curve"] = {str(k): v for k, v in sorted(c["heldout_acc"].items())}
    figures = []
    if runs:
        plot_shock(out / rundir.SHOCK_FIGURE, runs, bottleneck_step=m["bottleneck_step"],
                   title="AR selector pilot and diffusion arms")
        figures.append(rundir.SHOCK_FIGURE)
    metrics = {k: m[k] for k in DIFFUSION_METRIC_KEYS}
    metrics.update({k: v for k, v in m.items() if k not in DIFFUSION_METRIC_KEYS})
    with open(out / rundir.METRICS_FILE, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    (out / rundir.REPORT_FILE).write_text(_markdown(metrics, figures), encoding="utf-8")
    return metrics


def _markdown(m: Mapping[str, Any], figures: List[str]) -> str:
    ff = m.get("forced_fraction")
    tau = (m.get("rule_params") or {}).get("tau", 0.2)
    n = m.get("n_test") or {}
    lines = ["# T3S for a diffusion LM", "",
             "An autoregressive selector (`--model`) ran the pilot SFT and the selection; its "
             f"forced set S = {{Δc < −{tau:g}}} ({'n/a' if ff is None else f'{100 * ff:.1f}%'} of "
             "the trace tokens) is masked in every training step of the diffusion LM "
             "(`--diffusion-model`), on top of the random corruption, and reconstructed. "
             f"Forced tokens are weighted `{m.get('forced_weight')}`.", "",
             "| arm | what | accuracy | n |", "|---|---|---:|---:|"]
    what = {"base": "the diffusion model θ0", "sft": "plain diffusion SFT (no forced set)",
            "t3s": "diffusion SFT with T3S's forced set",
            "baseline": "diffusion SFT with a random forced set of the same size"}
    for arm in ("base", "sft", "t3s", "baseline"):
        if m.get(f"{arm}_acc") is not None:
            lines.append(f"| {arm} | {what[arm]} | {m[f'{arm}_acc']:.3f} | {n.get(arm)} |")
    g = m.get("generation") or {}
    lines += ["", f"Accuracy on the `{m.get('accuracy_set')}` set by iterative unmasking "
              f"({g.get('gen_length')} positions, blocks of {g.get('block_length')}, "
              f"{g.get('steps')} steps, low-confidence remasking), answers checked by the run's "
              "verifier."]
    t3s, sft, rnd, base = (m.get(k) for k in ("t3s_acc", "sft_acc", "baseline_acc", "base_acc"))
    for other, name in ((sft, "plain diffusion SFT"), (rnd, "the random forced set"),
                        (base, "θ0")):
        if t3s is not None and other is not None:
            rel = "above" if t3s > other else ("below" if t3s < other else "equal to")
            lines.append(f"- T3S {t3s:.3f} is {rel} {name} ({other:.3f}).")
    for f in figures:
        lines += ["", f"![shock plot]({f})", "",
                  "Solid: the AR selector's pilot (its training accuracy gave the bottleneck, "
                  "dash-dot). Dashed: held-out accuracy of the diffusion arms during training; "
                  "their losses are the 1/t-weighted masked-diffusion loss."]
    return "\n".join(lines) + "\n"
