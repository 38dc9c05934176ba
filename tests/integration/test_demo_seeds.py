"""The multi-seed demo summary (`t3s.demo.seeds`) and the demo's tasks (`t3s.demo.tasks`)."""

import json
import math
from pathlib import Path

import pytest

from t3s.demo import seeds as S
from t3s.demo.tasks import DEFAULT_TASK, TASKS, task_named


def test_parse_seeds():
    assert S.parse_seeds("0,1,2") == [0, 1, 2]
    assert S.parse_seeds("3-5") == [3, 4, 5]
    assert S.parse_seeds(" 7 , 0-1") == [7, 0, 1]
    for bad in ("", "a", "1,1", "-1", "0-1,1", "1.5"):
        with pytest.raises(ValueError):
            S.parse_seeds(bad)


def test_mean_se_by_hand():
    st = S.mean_se([0.2, 0.4, 0.9])
    mean = 0.5
    sd = math.sqrt(((0.2 - mean) ** 2 + (0.4 - mean) ** 2 + (0.9 - mean) ** 2) / 2)
    assert st["mean"] == pytest.approx(mean)
    assert st["se"] == pytest.approx(sd / math.sqrt(3))
    assert st["n"] == 3 and st["per_seed"] == [0.2, 0.4, 0.9]
    assert S.mean_se([0.3])["se"] is None
    assert S.mean_se([])["mean"] is None


def _fake_seed(out: Path, seed: int, acc: dict, curve: dict):
    d = S.seed_dir(out, seed)
    (d / "eval").mkdir(parents=True)
    (d / "report").mkdir()
    (d / "pilot").mkdir()
    (d / "train").mkdir()
    sets = {key: {"path": f"/somewhere/data/{key}.jsonl", "n": 10,
                  "arms": {arm: {"accuracy": a} for arm, a in arms.items()}}
            for key, arms in acc.items()}
    (d / "eval" / "results.json").write_text(json.dumps({"test_key": "heldout", "sets": sets}))
    (d / "report" / "metrics.json").write_text(json.dumps(
        {"bottleneck_step": 10 + seed, "masked_fraction": 0.5, "baseline_rule": "random"}))
    for stage in ("pilot", "train"):
        (d / stage / "t3s_accuracy.json").write_text(json.dumps(
            {"heldout_acc": {str(k): v for k, v in curve.items()}}))


def test_summarize_writes_means_ses_and_paired_differences(tmp_path):
    per_seed = {
        0: {"heldout": {"base": 1.0, "sft": 0.2, "t3s": 0.6, "dft": 0.3},
            "extra_test": {"base": 0.0, "sft": 0.1, "t3s": 0.2, "dft": 0.1}},
        1: {"heldout": {"base": 1.0, "sft": 0.4, "t3s": 0.7, "dft": 0.5},
            "extra_test": {"base": 0.0, "sft": 0.0, "t3s": 0.1, "dft": 0.3}},
        2: {"heldout": {"base": 1.0, "sft": 0.3, "t3s": 0.5, "dft": 0.4},
            "extra_test": {"base": 0.0, "sft": 0.2, "t3s": 0.3, "dft": 0.2}},
    }
    for s, acc in per_seed.items():
        _fake_seed(tmp_path, s, acc, {0: 1.0, 10: 0.1 * s, 20: 0.5})
    m = S.summarize(tmp_path, [0, 1, 2])
    assert m["seeds"] == [0, 1, 2] and m["headline_set"] == "heldout"
    assert m["t3s_acc"] == pytest.approx(0.6)
    assert m["dft_acc_per_seed"] == [0.3, 0.5, 0.4]
    assert m["dft_acc_se"] == pytest.approx(S.mean_se([0.3, 0.5, 0.4])["se"])
    assert m["arms"]["base"]["extra_test"]["se"] == 0.0
    # paired by seed: T3S − DFT on extra_test is (0.1, −0.2, 0.1)
    diff = m["comparisons"]["dft"]["extra_test"]
    assert diff["per_seed"] == pytest.approx([0.1, -0.2, 0.1])
    assert m["bottleneck_step_per_seed"] == [10, 11, 12]
    curves = m["heldout_curves"]["sft"]
    assert curves["step"] == [0, 10, 20] and curves["mean"][1] == pytest.approx(0.1)
    summary = tmp_path / S.SUMMARY_DIR
    for name in (S.SUMMARY_METRICS, S.SUMMARY_REPORT, S.ARMS_FIGURE, S.CURVES_FIGURE):
        assert (summary / name).stat().st_size > 0
    text = (summary / S.SUMMARY_REPORT).read_text()
    assert "| T3S | 0.600 ± 0.058 |" in text and "seed-2/report/report.md" in text
    # the links to the seeds' reports resolve from summary/, where summary.md lives
    assert "](../seed-2/report/report.md)" in text and (summary / "../seed-2/report").is_dir()
    assert str(tmp_path) not in text and str(tmp_path) not in (summary / S.SUMMARY_METRICS).read_text()
    assert json.loads((summary / S.SUMMARY_METRICS).read_text())["t3s_acc"] == pytest.approx(0.6)


def test_summarize_names_an_unfinished_seed(tmp_path):
    _fake_seed(tmp_path, 0, {"heldout": {"base": 1.0, "t3s": 0.5}}, {0: 1.0})
    with pytest.raises(FileNotFoundError, match="seed 1"):
        S.summarize(tmp_path, [0, 1])


def test_run_seeds_runs_each_seed_then_summarises(tmp_path):
    calls = []

    def run_one(out, seed, say, **kw):
        calls.append((Path(out).name, seed, kw))
        _fake_seed(tmp_path, seed, {"heldout": {"base": 1.0, "t3s": 0.5 + 0.1 * seed}}, {0: 1.0})
        return {}

    m = S.run_seeds(run_one, [0, 1], tmp_path, say=lambda s: None, quick=True)
    assert calls == [("seed-0", 0, {"quick": True}), ("seed-1", 1, {"quick": True})]
    assert m["t3s_acc"] == pytest.approx(0.55)


def test_tasks():
    assert DEFAULT_TASK in TASKS and set(TASKS) >= {"teach", "style"}
    with pytest.raises(ValueError, match="teach"):
        task_named("nope")
    for t in TASKS.values():
        assert set(t.sizes) == set(t.quick_sizes) == {"trace_counts", "heldout_size",
                                                      "four_term_size"}


def test_demo_cli_refuses_bad_task_and_seeds(capsys):
    from t3s.cli import main
    assert main(["demo", "--quick", "--task", "nope"]) == 2
    assert "unknown demo task" in capsys.readouterr().err
    assert main(["demo", "--quick", "--seeds", "0,0"]) == 2
    assert "repeated" in capsys.readouterr().err
    assert main(["demo", "--quick", "--seeds", "0,1", "--seed", "2"]) == 2
    assert main(["demo", "--diffusion", "--task", "nope"]) == 2
    assert main(["demo", "--diffusion", "--seeds", "0,1"]) == 2


def test_signals_as_rules_by_hand(tmp_path):
    """The summary's signal table: AUC/overlap from each seed's analysis, the Jaccard of
    the dropped tokens of the signal's arm and of T3S (from the artifacts), its accuracy."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    acc = {"heldout": {"base": 1.0, "t3s": 0.5, "kl": 0.25}}
    for s, (ours, theirs) in enumerate((([0, 0, 1, 1], [0, 1, 1, 1]),     # Jaccard 1/2
                                        ([0, 0, 0, 1], [0, 0, 1, 1]))):   # Jaccard 2/3
        _fake_seed(tmp_path, s, acc, {0: 1.0})
        d = S.seed_dir(tmp_path, s)
        (d / "select").mkdir()
        for name, keep in (("selection.parquet", ours), ("arm_kl.parquet", theirs)):
            pq.write_table(pa.table({"example_id": [0, 0, 1, 1], "position": [1, 2, 1, 2],
                                     "loss_mask": keep}), d / "select" / name)
        (d / "analyze").mkdir()
        (d / "analyze" / "analysis.json").write_text(json.dumps({"trajectory_signals": {
            "kl": {"auc": 0.6 + 0.2 * s, "overlap": 0.5}, "delta_conf": {"auc": 1.0,
                                                                        "overlap": 1.0}}}))
    m = S.summarize(tmp_path, [0, 1])
    kl = m["signals"]["kl"]
    assert kl["arm"] == "kl" and kl["auc_vs_anchors"]["mean"] == pytest.approx(0.7)
    assert kl["dropped_jaccard_vs_t3s"]["per_seed"] == pytest.approx([0.5, 2 / 3])
    assert kl["accuracy"]["mean"] == pytest.approx(0.25)
    assert m["signals"]["delta_conf"]["dropped_jaccard_vs_t3s"] is None
    text = (tmp_path / S.SUMMARY_DIR / S.SUMMARY_REPORT).read_text()
    assert "| `kl` | kl | 0.700 ± 0.100 |" in text and "(itself)" in text


def test_each_task_sets_its_own_budget_and_arms(tmp_path):
    """The tasks differ only in data sizes and `t3s run` settings: style keeps the first
    demo's (90 steps at lr 3e-4, the random baseline alone); teach trains 240 steps at
    lr 1e-3 with every comparison arm; the quick teach variant keeps three arms of
    different kinds (tests/pipeline/test_arms.py runs every arm)."""
    from t3s.demo import SETTINGS, demo_settings
    from t3s.pipeline.settings import normalize_config
    data = {k: str(tmp_path / f"{k}.jsonl") for k in ("train", "heldout", "extra_test")}
    style = normalize_config(demo_settings(False, tmp_path, data, task="style"))
    assert (style["steps"], style["lr"], style["arms"]) == (SETTINGS["steps"], 3e-4, [])
    teach = normalize_config(demo_settings(False, tmp_path, data, task="teach"))
    assert (teach["steps"], teach["lr"], teach["baseline"]) == (240, 1e-3, "random")
    assert {"dft", "rho1", "static", "entropy", "logit_grad", "kl"} == set(teach["arms"])
    quick = normalize_config(demo_settings(True, tmp_path, data, task="teach"))
    assert quick["arms"] == ["dft", "rho1", "static"] and quick["steps"] < teach["steps"]
    with pytest.raises(ValueError, match="unknown demo task"):
        demo_settings(False, tmp_path, data, task="nope")


def test_sensitivity_over_the_seeds_that_ran_it(tmp_path):
    acc = {"heldout": {"base": 1.0, "t3s": 0.5}}
    for s in range(3):
        _fake_seed(tmp_path, s, acc, {0: 1.0})
    for s, (step, a) in enumerate(((20, 0.5), (40, 0.7))):   # seed 2 never ran the sweep
        d = S.seed_dir(tmp_path, s) / "sensitivity"
        d.mkdir()
        (d / "sensitivity.json").write_text(json.dumps({"choices": {
            "train_acc_min": {"step": step, "anchor_fraction": 0.8,
                              "mask_overlap_with_default": 1.0, "accuracy": {"heldout": a}},
            "after_1": {"step": step + 20, "anchor_fraction": 0.7,
                        "mask_overlap_with_default": 0.9, "accuracy": {"heldout": a - 0.1}}}}))
    m = S.summarize(tmp_path, [0, 1, 2])["sensitivity"]
    assert m["seeds_with_sweep"] == 2
    assert m["choices"]["train_acc_min"]["step_per_seed"] == [20, 40]
    assert m["choices"]["after_1"]["accuracy"]["heldout"]["mean"] == pytest.approx(0.5)
    text = (tmp_path / S.SUMMARY_DIR / S.SUMMARY_REPORT).read_text()
    assert "| after_1 | 40, 60 |" in text
    assert S.summarize(tmp_path, [2])["sensitivity"] is None
