"""`t3s demo --quick` end to end through the command line, and resuming it."""

import json
import re
import time
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import pyarrow.parquet as pq  # noqa: E402

from t3s.cli import main  # noqa: E402
from t3s.pipeline.report import METRIC_KEYS  # noqa: E402

QUICK_BUDGET_S = 180  # the budget for --quick on 2 CPU cores: reported, never asserted


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    t = time.perf_counter()
    rc = main(["demo", "--quick", "--out", str(out)])
    return out, rc, time.perf_counter() - t


def test_quick_demo_end_to_end(quick_run):
    out, rc, seconds = quick_run
    assert rc == 0
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
    for arm in ("base", "sft", "t3s", "baseline"):
        assert metrics[f"{arm}_acc"] == metrics["accuracy_by_set"]["heldout"][arm]
        assert 0.0 <= metrics["accuracy_by_set"]["extra_test"][arm] <= 1.0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["sets"]["heldout"]["n"] == 100 and results["sets"]["extra_test"]["n"] == 50
    for arm in ("base", "sft", "t3s", "baseline"):
        assert len((out / "eval" / f"{arm}.jsonl").read_text().splitlines()) == 100
        assert len((out / "eval" / f"{arm}.extra_test.jsonl").read_text().splitlines()) == 50
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
    for png in ("shock.png", "delta_hist.png", "traces.png"):
        data = (report / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, png
        assert f"({png})" in text


def test_quick_demo_resumes(quick_run, capsys):
    out, rc, _ = quick_run
    assert rc == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "report").iterdir()}
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed
    assert "already done" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "report").iterdir()} == before


def test_demo_refuses_other_settings(quick_run, capsys):
    out, rc, _ = quick_run
    assert rc == 0
    assert main(["demo", "--out", str(out)]) == 2   # full settings in a quick directory
    assert "other settings" in capsys.readouterr().err


def test_demo_refuses_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a t3s demo directory" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
