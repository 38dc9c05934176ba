"""`t3s demo --quick` end to end through the command line, and resuming it."""

import io
import json
import re
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import pyarrow.parquet as pq  # noqa: E402

from t3s.cli import main  # noqa: E402
from t3s.pipeline import engine  # noqa: E402
from t3s.pipeline.console import show_progress  # noqa: E402
from t3s.pipeline.rundir import ANALYSIS_FIGURES, STAGE_NAMES  # noqa: E402
from t3s.pipeline.report import METRIC_KEYS  # noqa: E402
from t3s.demo.tasks import DEFAULT_TASK, TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICK_BUDGET_S = 180  # the budget for --quick on 2 CPU cores: reported, never asserted
QUICK = TASKS[DEFAULT_TASK]   # `t3s demo --quick` runs the default task's quick variant
N_HELDOUT = QUICK.quick_sizes["heldout_size"]
N_FOUR = QUICK.quick_sizes["four_term_size"]
N_TRAIN = sum(QUICK.quick_sizes["trace_counts"].values())
ARMS = tuple(QUICK.quick_settings["arms"])


@pytest.fixture
def quick_run(quick_demo):
    """The session's `t3s demo --quick` (tests/conftest.py)."""
    return quick_demo


def test_quick_demo_log_has_no_progress_bars(quick_run):
    """Output that is not a terminal gets no bars: a redirected log is the stage lines."""
    out, rc, _, log = quick_run
    assert rc == 0, log[-3000:]
    assert "\r" not in log and "it/s" not in log and "s/it" not in log and "%|" not in log
    assert "[report] done" in log and "t3s demo: ran pilot" in log
    assert len(log.encode()) < 8_000, len(log.encode())   # ~2 KB; with bars it was ~86 KB


def test_progress_bars_follow_the_terminal(monkeypatch):
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert show_progress(None) is True and show_progress(False) is False
    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert show_progress(None) is False and show_progress(True) is True


def test_quick_demo_end_to_end(quick_run):
    out, rc, seconds, log = quick_run
    assert rc == 0, log[-3000:]
    if seconds > QUICK_BUDGET_S:  # speed is not a pass/fail matter on a shared machine
        warnings.warn(f"t3s demo --quick took {seconds:.0f} s, over its {QUICK_BUDGET_S} s budget")
    for name in ("train.jsonl", "heldout.jsonl", "four_terms.jsonl"):
        assert (out / "data" / name).stat().st_size > 0
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics)[:len(METRIC_KEYS)] == list(METRIC_KEYS)
    for key in ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "masked_fraction",
                "mask_agreement"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    # both evaluation sets: held-out 2/3-term sums (headline) and 4-term sums (extra_test)
    assert list(metrics["accuracy_by_set"]) == ["heldout", "extra_test"]
    assert metrics["accuracy_source"] == "eval"
    # every arm of the task: base, SFT, T3S, the random baseline, DFT, Rho-1, static, ...
    assert {"dft", "rho1", "static"} <= set(ARMS) and metrics["arms"] == list(ARMS)
    for arm in ("base", "sft", "t3s", "baseline") + ARMS:
        assert metrics[f"{arm}_acc"] == metrics["accuracy_by_set"]["heldout"][arm], arm
        assert 0.0 <= metrics["accuracy_by_set"]["extra_test"][arm] <= 1.0
        assert (out / ("arms/" + arm if arm in ARMS else "") / "model").exists() or arm in (
            "base", "sft", "t3s", "baseline"), arm
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["sets"]["heldout"]["n"] == N_HELDOUT
    assert results["sets"]["extra_test"]["n"] == N_FOUR
    for arm in ("base", "sft", "t3s", "baseline") + ARMS:
        assert len((out / "eval" / f"{arm}.jsonl").read_text().splitlines()) == N_HELDOUT
        assert len((out / "eval" / f"{arm}.extra_test.jsonl").read_text().splitlines()) == N_FOUR
    # the bottleneck is one of the pilot's evaluated steps after θ0
    config = json.loads((out / "config.json").read_text())["config"]
    b = metrics["bottleneck_step"]
    assert isinstance(b, int) and 0 < b <= config["steps"] and b % config["eval_steps"] == 0
    assert str(b) in metrics["pilot_train_acc"]
    assert metrics["pilot_train_acc"][str(b)] == min(
        v for k, v in metrics["pilot_train_acc"].items() if int(k) > 0)
    # the masked fraction is the artifact's
    sel = pq.read_table(out / "select" / "selection.parquet", columns=["loss_mask"])
    keep = sel["loss_mask"].to_numpy(zero_copy_only=False)
    assert metrics["masked_fraction"] == pytest.approx(1.0 - keep.mean())
    # report.md states the numbers
    text = (report / "report.md").read_text()
    for key in ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "mask_agreement"):
        assert f"{metrics[key]:.3f}" in text, key
    for arm in ("base", "sft", "t3s", "baseline"):
        assert f"{metrics['accuracy_by_set']['extra_test'][arm]:.3f}" in text
    assert "Lowest held-out accuracy during training" in text
    assert re.search(rf"\| bottleneck step \| {b}\b", text)
    assert f"{100 * metrics['masked_fraction']:.1f}%" in text
    # the report explains itself: the task, the arms, the terms, and a link to the write-up
    intro = text.split("## Results")[0]
    for term in ("## What this run is", "built-in demo", "**base (θ0)**", "**plain SFT",
                 "**T3S (rule `anchor`)**", "**baseline (`random`", "**Imitation Shock**",
                 "**bottleneck**", "**Δc**", "**anchor**"):
        assert term in intro, term
    # a run outside the source tree names the write-up without a link that would climb out
    assert "`docs/demo/README.md` in the t3s source tree" in intro
    assert "](../" not in text.replace("](../README.md)", "")
    # every accuracy names its set and size: the whole sets in the table, the subsets
    # (--eval-subset) during training
    assert metrics["accuracy_set"] == "heldout" and metrics["n_test"]["t3s"] == N_HELDOUT
    subset = config["eval_subset"]
    assert metrics["curve_sets"] == {
        "train_acc": {"set": "train", "n": subset, "of": N_TRAIN},
        "heldout_acc": {"set": "heldout", "n": subset, "of": N_HELDOUT}}
    assert f"(heldout set, n={N_HELDOUT}, headline)" in text
    assert f"(extra_test set, n={N_FOUR})" in text
    assert f"on {subset} of the {N_HELDOUT} held-out problems" in text
    assert f"on {subset} of the {N_TRAIN} training problems" in text
    assert f"On the heldout set (n={N_HELDOUT}), T3S" in text
    for png in ("shock.png", "delta_hist.png", "traces.png"):
        data = (report / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, png
        assert f"({png})" in text
    # the analyze stage: every key and figure, the report's section
    analysis = json.loads((out / "analyze" / "analysis.json").read_text())
    for key in ("grad_norm_ratio", "grad_cosine", "transfer_matrix", "static_auc", "shock"):
        assert analysis[key], key
    steps = sorted(int(s) for s in analysis["grad_norm_ratio"]["pilot"])
    assert steps == list(range(0, config["steps"] + 1, config["eval_steps"]))   # kept checkpoints
    assert set(analysis["transfer_matrix"]) == {"θ0", "θb", "T3S 10", "T3S final"}
    assert "## Diagnostics (`t3s analyze`)" in text
    for png in ANALYSIS_FIGURES.values():
        assert (report / png).read_bytes().startswith(b"\x89PNG") and f"({png})" in text


def test_quick_demo_resumes(quick_run, capsys):
    out, rc, _, _ = quick_run
    assert rc == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "report").iterdir()}
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed
    assert "already done" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "report").iterdir()} == before


def test_demo_refuses_other_settings(quick_run, capsys):
    out, rc, _, _ = quick_run
    assert rc == 0
    assert main(["demo", "--out", str(out)]) == 2   # full settings in a quick directory
    assert "other settings" in capsys.readouterr().err


def test_demo_refuses_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a t3s demo directory" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_demo_overwrite_and_redo_mean_what_they_mean_for_run(tmp_path, monkeypatch, capsys):
    """--overwrite starts a directory with other settings afresh, --redo reaches the
    stages, --no-progress the settings (the stages are stubbed: only the demo's handling
    of its directory is under test)."""
    calls = []

    def fake_run_stages(run, cfg, fps, targets, *, redo=(), say=print, **kw):
        calls.append({"seed": cfg["seed"], "redo": list(redo), "progress": cfg["progress"]})
        for stage in ("pilot", "report"):
            run.stage_dir(stage).mkdir(exist_ok=True)
        (run.stage_dir("report") / "metrics.json").write_text("{}")
        return {}

    monkeypatch.setattr(engine, "run_stages", fake_run_stages)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--redo", "train", "--redo", "eval",
                 "--no-progress"]) == 0
    assert calls[-1] == {"seed": 0, "redo": ["train", "eval"], "progress": False}
    (out / "pilot" / "marker").write_text("from the first run")
    capsys.readouterr()
    # other settings: refused, and the message names --overwrite
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--overwrite" in err
    assert (out / "pilot" / "marker").exists() and len(calls) == 1
    # --overwrite: the old run is deleted, the new settings are stored
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1", "--overwrite",
                 "--redo", "all"]) == 0
    assert "afresh (--overwrite)" in capsys.readouterr().out
    assert not (out / "pilot" / "marker").exists()
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1
    assert calls[-1]["seed"] == 1 and calls[-1]["redo"] == list(STAGE_NAMES)
    assert calls[-1]["progress"] is None   # decided by the stages: stderr is no terminal here
    # an unknown stage is a usage error of the parser
    assert main(["demo", "--quick", "--out", str(out), "--redo", "nope"]) == 2


def test_a_refused_demo_touches_nothing(tmp_path, monkeypatch, capsys):
    """Nothing touches a run directory before its lock is held: a demo with another seed
    started while another process works there is refused with its data unchanged (it
    used to swap the data in first), with or without --overwrite."""
    from t3s.pipeline.rundir import RunDir

    def fake_run_stages(run, cfg, fps, targets, **kw):
        run.stage_dir("report").mkdir(exist_ok=True)
        (run.stage_dir("report") / "metrics.json").write_text("{}")
        return {}

    monkeypatch.setattr(engine, "run_stages", fake_run_stages)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    capsys.readouterr()
    with RunDir(out).locked():  # another t3s process is working in the directory
        for extra in ([], ["--overwrite"]):
            assert main(["demo", "--quick", "--out", str(out), "--seed", "1", *extra]) == 2
            assert "another t3s process" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 0
    from t3s.pipeline.rundir import DEMO_STAGING_PREFIX
    assert not [p for p in out.iterdir() if p.name.startswith(DEMO_STAGING_PREFIX)]


def test_demo_redo_reruns_a_stage(quick_run, capsys):
    """Last in this file: it rewrites the quick run's report."""
    out, rc, _, _ = quick_run
    assert rc == 0
    before = (out / "stages.json").read_text()
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--redo", "report", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[report] running (asked to redo)" in printed and "[pilot] already done" in printed
    assert "t3s demo: ran report" in printed
    assert json.loads(before)["stages"]["pilot"] == \
        json.loads((out / "stages.json").read_text())["stages"]["pilot"]


#: the sweep's choices on the quick demo: b, the held-out minimum and the evaluations next
#: to b (its b is the first evaluation after θ0: before_1/2 are skipped with a reason,
#: after_1 is retrained, the minima reuse b's model), one retraining instead of the
#: default list's three; every kind of choice and the default list run through the stage
#: in tests/pipeline/test_sensitivity.py, on a tiny model
SWEEP_CHOICES = "train_acc_min,heldout_acc_min,before,after_1"


def test_sensitivity_on_the_quick_demo_writes_every_key(quick_run, tmp_path):
    """`t3s sensitivity` on (a copy of) the quick demo: every choice asked for trained or
    skipped with a reason, every key present, both eval sets, the report's section and
    figure (a copy, so that the session's demo keeps its settings)."""
    import shutil
    from t3s.pipeline.sensitivity import sensitivity_settings
    out, rc, _, _ = quick_run
    assert rc == 0
    run = tmp_path / "quick"
    shutil.copytree(out, run)
    assert main(["sensitivity", str(run), "--no-progress",
                 "--sensitivity-param", f"choices={SWEEP_CHOICES}"]) == 0
    res = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    for key in ("bottleneck_step", "choices", "skipped", "params", "sets"):
        assert key in res, key
    asked = sensitivity_settings({"seed": 0, "sensitivity_params": {
        "choices": SWEEP_CHOICES}})["names"]
    assert len(asked) == 5 and sorted([*res["choices"], *res["skipped"]]) == sorted(asked)
    assert all(res["skipped"].values())                        # each with its reason
    assert any(not c["reused"] for c in res["choices"].values())   # one at least retrained
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert res["bottleneck_step"] == metrics["bottleneck_step"]
    assert res["choices"]["train_acc_min"]["step"] == metrics["bottleneck_step"]
    assert res["choices"]["train_acc_min"]["reused"] is True   # the T3S arm itself
    assert len(res["choices"]) >= 3
    for name, c in res["choices"].items():
        for key in ("step", "anchor_fraction", "mask_overlap_with_default", "accuracy", "n",
                    "reused", "same_step_as"):
            assert key in c, (name, key)
        assert set(c["accuracy"]) == {"heldout", "extra_test"}
        assert all(0.0 <= a <= 1.0 for a in c["accuracy"].values())
    assert set(metrics["sensitivity"]) == set(res["choices"])
    text = (run / "report" / "report.md").read_text()
    assert "sensitivity.png" in text and (run / "report" / "sensitivity.png").stat().st_size > 1000


def test_the_write_up_link_never_climbs_out_of_the_source_tree(tmp_path):
    """Inside the source tree the report links docs/demo/README.md; elsewhere it names it
    (a relative link from /tmp would climb into the machine's own folders)."""
    from t3s.pipeline.report import demo_writeup
    for run_dir, linked in ((ROOT / "runs" / "check-writeup-link", True), (tmp_path, False)):
        cfg = {"train": str(run_dir / "data" / "train.jsonl")}
        link = demo_writeup(run_dir, cfg)
        if linked:
            assert (run_dir / "report" / link).resolve() == ROOT / "docs" / "demo" / "README.md"
            assert not (run_dir / "report").exists()   # nothing was written
        else:
            assert link == ""
    assert demo_writeup(tmp_path, {"train": "/elsewhere/train.jsonl"}) is None
