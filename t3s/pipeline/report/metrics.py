"""The numbers of a T3S run's report, read from its run directory.

`collect_metrics` gives the numbers of ``metrics.json``: `METRIC_KEYS` first (null
when the run does not have the number), then details. Every accuracy names its set and
size: the eval sets are scored whole, the curves during training on ``eval_subset``
problems. `stage_history` and `stage_summary` read one stage's curves and record (the
diffusion report, `t3s.dllm.report`, uses them too); `shown_path` and `demo_writeup` say
how a report names a path and links the demo's write-up without naming the machine's own
folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from .. import rundir
from ..rundir import STAGE_NAMES, RunDir, read_json
from .arms import arm_metrics, arm_names

__all__ = ["METRIC_KEYS", "collect_metrics", "stage_history", "stage_summary",
           "stage_dirs_and_config", "shown_path", "demo_writeup"]

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


def stage_dirs_and_config(run_dir: Path, stage_dirs, config):
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
    dirs, config = stage_dirs_and_config(run_dir, stage_dirs, config)
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
    elif pilot["heldout_acc"] or (config.get("student") and train["heldout_acc"]):
        source = "held-out evaluations during training"
        acc_set = "heldout"
        hn = curves.get("heldout_acc", {}).get("n")
        m["base_acc"] = pilot["heldout_acc"].get(0)
        m["sft_acc"] = _last(pilot["heldout_acc"])
        if config.get("student"):   # the pilot is the selector's: the student's θ0 and SFT
            m["base_acc"] = train["heldout_acc"].get(0)
            m["sft_acc"] = _last(stage_history(dirs["arms"] / "sft")["heldout_acc"]
                                 if dirs.get("arms") else {})
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
        # the models: the selector's pilot gave the mask, the student was retrained
        "selector": shown_path(select_sum.get("selector") or config.get("model"), run_dir),
        "student": shown_path(config.get("student") or config.get("model"), run_dir),
        "artifact": shown_path(config.get("artifact"), run_dir),
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


def _by_set(results: Mapping[str, Any], key: str) -> Optional[Dict[str, Dict[str, Any]]]:
    """{set: {arm: the eval entry's ``key``}} when the eval stage recorded it (sampled
    scoring), else None."""
    sets = results.get("sets") or {}
    if not any(key in v for d in sets.values() for v in (d.get("arms") or {}).values()):
        return None
    return {k: {a: v.get(key) for a, v in (d.get("arms") or {}).items()} for k, d in sets.items()}


def _verifier_free(answers: Mapping[int, Sequence[str]]) -> Dict[str, Any]:
    """The pilot's bottleneck found without a verifier (`t3s.verifier_free_bottleneck`):
    the step whose greedy answers agree least with θ0's own on the training prompts."""
    from ...bottleneck import answer_agreement, verifier_free_bottleneck
    if len(answers) < 2 or 0 not in answers:
        return {"verifier_free_bottleneck_step": None, "pilot_answer_agreement": None}
    try:
        agreement = answer_agreement(answers, reference_step=0)
        step = verifier_free_bottleneck(answers)
    except ValueError:
        return {"verifier_free_bottleneck_step": None, "pilot_answer_agreement": None}
    return {"verifier_free_bottleneck_step": step,
            "pilot_answer_agreement": {str(k): v for k, v in agreement.items()}}


# --------------------------------------------------------------------------------------
# Paths as a report shows them
# --------------------------------------------------------------------------------------

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
    """The folder holding the t3s package (this file is t3s/pipeline/report/metrics.py)."""
    return str(Path(os.path.abspath(__file__)).parents[3])


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
