"""Writing a T3S run's report: its figures, ``metrics.json`` and ``report.md``.

`build_report` reads a run directory (its layout: `t3s.pipeline.rundir`) and writes,
into ``out_dir``:

* the figures of `t3s.pipeline.report.plots`: ``shock.png`` (loss and accuracy per
  step, bottleneck marked), ``delta_hist.png`` (Δc per trace token) and
  ``traces.png`` (a few traces, anchors highlighted);
* ``metrics.json``: `METRIC_KEYS` first (null when the run does not have the
  number), then details (`t3s.pipeline.report.metrics.collect_metrics`);
* ``report.md``: what the run is, the table and plain statements of what happened
  (`t3s.pipeline.report.markdown.render_markdown`), then the sections of the analyze
  and sensitivity stages when they ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import rundir
from ..loaders import load_data, load_tokenizer
from ..rundir import RunDir
from .arms import arm_color, arm_name
from .markdown import curve_measured_on, render_markdown
from .metrics import (METRIC_KEYS, collect_metrics, demo_writeup, stage_dirs_and_config,
                      stage_history)
from .plots import plot_delta_histogram, plot_shock, plot_traces
from .sensitivity import report_section

__all__ = ["build_report"]


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
    dirs, config = stage_dirs_and_config(run_dir, stage_dirs, config)
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
                   measured_on={k: curve_measured_on(metrics, k, short=True)
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
