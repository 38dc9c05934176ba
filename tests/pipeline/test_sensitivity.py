"""The bottleneck-sensitivity sweep: the steps each choice gives (a hand-made accuracy
curve with a crash), its parameters refused up front, and `t3s run --sensitivity` /
`t3s sensitivity` on a tiny model (tests/tiny.py): outputs, the report's section,
reuse of the train stage's model, resuming an interrupted sweep (about 30 s on 2 cores).
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from t3s.pipeline.sensitivity import choice_names, sensitivity_settings, sensitivity_steps
from t3s.pipeline.settings import DEFAULTS, UsageError

# a crash at step 3 (tied with 5: the earliest wins), recovery after
TRAIN_ACC = {0: 0.5, 1: 0.4, 2: 0.2, 3: 0.1, 4: 0.3, 5: 0.1, 6: 0.6, 7: 0.7}
HELDOUT_ACC = {0: 0.5, 1: 0.45, 2: 0.3, 3: 0.35, 4: 0.3, 5: 0.5, 6: 0.6, 7: 0.65}
LOSS = {1: 2.0, 2: 1.5, 3: 1.7, 4: 1.2, 5: 1.2, 6: 1.3, 7: 1.4}


def test_each_choice_on_a_curve_with_a_crash():
    steps, skipped = sensitivity_steps(TRAIN_ACC, HELDOUT_ACC, LOSS, seed=0)
    assert list(steps) == choice_names((1, 2), 2) and skipped == {}   # in listing order
    expect = {"train_acc_min": 3, "heldout_acc_min": 2,  # ties: 3 and 5, 2 and 4
              "train_loss_min": 4,                       # tie with 5
              "before_1": 2, "before_2": 1, "after_1": 4, "after_2": 5}
    assert {k: steps[k] for k in expect} == expect
    # random: two distinct evaluated steps within ±3 evaluations of b, b excluded
    drawn = [steps["random_1"], steps["random_2"]]
    assert drawn == sorted(set(drawn)) and set(drawn) <= {1, 2, 4, 5, 6}
    # deterministic under the seed; other seeds draw other steps
    assert sensitivity_steps(TRAIN_ACC, HELDOUT_ACC, LOSS, seed=0)[0] == steps
    draws = {tuple(sensitivity_steps(TRAIN_ACC, HELDOUT_ACC, LOSS, seed=s)[0][f"random_{i}"]
                   for i in (1, 2)) for s in range(8)}
    assert len(draws) > 1


def test_training_loss_is_the_latest_logged_at_or_below_each_evaluation():
    # logged every 2 steps: step 1 has none below it; 6 and 7 share step 6's loss (tie: 6)
    steps, _ = sensitivity_steps(TRAIN_ACC, None, {2: 1.5, 4: 1.1, 6: 1.0}, choices=[
        "train_loss_min"])
    assert steps == {"train_loss_min": 6}
    steps, skipped = sensitivity_steps(TRAIN_ACC, None, {}, choices=["train_loss_min"])
    assert steps == {} and "no training loss" in skipped["train_loss_min"]


@pytest.mark.parametrize("train_acc, b, expect, skip", [
    # b at the first evaluation: nothing before it
    ({0: 0.5, 2: 0.1, 4: 0.3, 6: 0.4}, 2, {"after_1": 4, "after_2": 6},
     {"before_1", "before_2"}),
    # b at the last: nothing after it
    ({0: 0.5, 2: 0.4, 4: 0.3, 6: 0.1}, 6, {"before_1": 4, "before_2": 2},
     {"after_1", "after_2"}),
    # one evaluation only: no offset, no random step
    ({0: 0.5, 2: 0.1}, 2, {}, {"before_1", "before_2", "after_1", "after_2", "random_1",
                               "random_2"}),
])
def test_edges_are_skipped_with_a_reason(train_acc, b, expect, skip):
    steps, skipped = sensitivity_steps(train_acc, {}, {}, seed=1)
    assert steps["train_acc_min"] == b
    assert "no held-out set" in skipped["heldout_acc_min"]          # none given
    assert {k: v for k, v in steps.items() if k.startswith(("before", "after"))} == expect
    assert skip <= set(skipped) and all(skipped[k] for k in skip)
    assert not set(steps) & set(skipped)


def test_random_steps_beyond_the_pool_are_skipped_and_no_bottleneck_is_an_error():
    steps, skipped = sensitivity_steps({0: 0.5, 2: 0.1, 4: 0.3}, None, {}, n_random=3,
                                       radius=1, choices=["random_1", "random_2", "random_3"])
    assert steps == {"random_1": 4} and set(skipped) == {"random_2", "random_3"}
    with pytest.raises(ValueError, match="no step after θ0"):
        sensitivity_steps({0: 0.5}, None, {})


@pytest.mark.parametrize("params, message", [
    ({"nope": 1}, "unknown sensitivity parameter"),
    ({"choices": "before,best"}, "unknown choice(s) best"),
    ({"choices": "before_3"}, "unknown choice(s) before_3"),
    ({"offsets": "0,1"}, "offsets must be integers >= 1"),
    ({"offsets": "a"}, "offsets must be integers >= 1"),
    ({"n_random": -1}, "n_random must be an integer >= 0"),
    ({"radius": 0}, "radius must be an integer >= 1"),
    ({"choices": "random", "n_random": 0}, "selects nothing"),
])
def test_bad_parameters_are_refused(params, message):
    with pytest.raises(UsageError, match=None) as e:
        sensitivity_settings({**DEFAULTS, "sensitivity_params": params})
    assert message in str(e.value)


def test_parameters_the_settings_allow():
    p = sensitivity_settings({**DEFAULTS, "seed": 7, "sensitivity_params": {
        "offsets": "2,1", "choices": "train_acc_min,after,random_2", "n_random": 2}})
    assert p["offsets"] == [1, 2] and p["seed"] == 7
    assert p["names"] == ["train_acc_min", "after_1", "after_2", "random_2"]
    with pytest.raises(UsageError, match="objective diffusion"):
        sensitivity_settings({**DEFAULTS, "objective": "diffusion"})


# --------------------------------------------------------------------------------------
# The stage, on a tiny model
# --------------------------------------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tiny import write_run_assets  # noqa: E402

import t3s  # noqa: E402
import t3s.pipeline.stages as t3s_stages  # noqa: E402
from t3s._util import torch_threads  # noqa: E402
from t3s.cli import main  # noqa: E402
from t3s.pipeline.report.sensitivity import SECTION_TITLE  # noqa: E402

PARAMS = ["--sensitivity-param", "offsets=1", "--sensitivity-param", "n_random=1",
          "--sensitivity-param", "radius=2"]


def _main(args):
    """`t3s.cli.main` with its stdout: (exit status, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """`t3s run --sensitivity` of 6 steps evaluated at every step: (run dir, output)."""
    root = write_run_assets(tmp_path_factory.mktemp("sensitivity"))
    run = root / "run"
    with torch_threads(1):
        rc, out = _main(["run", "--model", str(root / "model"), "--train",
                         str(root / "train.jsonl"), "--heldout", str(root / "heldout.jsonl"),
                         "--steps", "6", "--eval-steps", "1", "--eval-subset", "4",
                         "--batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-2",
                         "--no-progress", "--run-dir", str(run), "--sensitivity", *PARAMS])
    assert rc == 0, out
    return run, out


def test_sweep_writes_every_key_model_figure_and_section(swept):
    run, out = swept
    res = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    b = json.loads((run / "stages.json").read_text())["stages"]["pilot"]["summary"][
        "bottleneck_step"]
    assert res["bottleneck_step"] == b and res["sets"] == ["heldout"]
    assert res["params"]["offsets"] == [1] and res["params"]["n_random"] == 1
    names = choice_names([1], 1)
    assert sorted(list(res["choices"]) + list(res["skipped"])) == sorted(names)
    for name, c in res["choices"].items():
        assert set(c) >= {"step", "anchor_fraction", "mask_overlap_with_default", "accuracy",
                          "n", "reused", "same_step_as"}, name
        assert 0.0 <= c["accuracy"]["heldout"] <= 1.0 and c["n"]["heldout"] == 8
        assert 0.0 <= c["anchor_fraction"] <= 1.0
        assert 0.0 <= c["mask_overlap_with_default"] <= 1.0
        assert (run / c["model"] / "model.safetensors").is_file(), name
        same = [n for n, d in res["choices"].items() if d["step"] == c["step"] and n != name]
        assert c["same_step_as"] == same
        # the mask: the anchors (Δc > 0) of the online Δc at its step
        art = t3s.SelectionArtifact.load(run / "sensitivity" / f"step-{c['step']}" /
                                         "selection.parquet")
        assert art.rule == "anchor" and art.metadata["extra"]["bottleneck_step"] == c["step"]
        np.testing.assert_array_equal(art.table["loss_mask"], ~(art.table["delta"] > 0))
    # b: the train stage's model and mask, reused (said), not retrained
    default = res["choices"]["train_acc_min"]
    assert default["step"] == b and default["reused"] and default["model"] == "train/model"
    assert default["mask_overlap_with_default"] == 1.0
    assert "reusing the train stage's model, not retraining" in out
    sel = t3s.SelectionArtifact.load(run / "select" / "selection.parquet")
    art = t3s.SelectionArtifact.load(run / "sensitivity" / f"step-{b}" / "selection.parquet")
    np.testing.assert_array_equal(art.table["loss_mask"], sel.table["loss_mask"])
    trained = {c["step"] for c in res["choices"].values() if not c["reused"]}
    assert out.count("retraining from θ0 with the anchors at step") == len(trained)
    for s in trained:
        assert (run / "sensitivity" / f"step-{s}" / "result.json").is_file()
    for folder in ("sensitivity", "report"):
        png = (run / folder / "sensitivity.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    report = (run / "report" / "report.md").read_text()
    section = report.split(SECTION_TITLE)[1]
    assert "](sensitivity.png)" in section and "| train_acc_min (b, reused) |" in section
    assert "± " in section and ("spans" in section or "no spread" in section)
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["sensitivity"] == {n: c["accuracy"]["heldout"]
                                      for n, c in res["choices"].items()}


def test_sweep_resumes_and_refuses_bad_parameters_up_front(swept, tmp_path, monkeypatch):
    src, _ = swept
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ids = {k: v["run_id"] for k, v in json.loads((run / "stages.json").read_text())[
        "stages"].items()}
    rc, out = _main(["sensitivity", str(run), "--no-progress"])
    assert rc == 0 and "[sensitivity] already done" in out
    for params, message in ((["choices=nope"], "unknown choice(s) nope"),
                            (["offsets=0"], "offsets must be integers"),
                            (["bogus=1"], "unknown sensitivity parameter")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc, out = _main(["sensitivity", str(run), "--no-progress", "--redo", "sensitivity",
                             *[a for p in params for a in ("--sensitivity-param", p)]])
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], lines
        assert "running" not in out
    after = json.loads((run / "stages.json").read_text())["stages"]
    assert after["sensitivity"]["run_id"] == ids["sensitivity"]   # nothing was touched

    # killed while saving the second retrained model: the first is kept, the second
    # continues from its checkpoint
    calls = []
    save = t3s_stages._save_model

    def killed_on_second(trainer, tok, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("killed while saving the model")
        save(trainer, tok, path)

    monkeypatch.setattr(t3s_stages, "_save_model", killed_on_second)
    with torch_threads(1), pytest.raises(RuntimeError, match="killed"):
        _main(["sensitivity", str(run), "--no-progress", "--redo", "sensitivity"])
    monkeypatch.undo()
    partial = run / ".partial-sensitivity"
    done = [json.loads(p.read_text()) for p in partial.glob("step-*/result.json")]
    assert sum(not r["reused"] for r in done) == 1    # and b's, reused, when it came first
    with torch_threads(1):
        rc, out = _main(["sensitivity", str(run), "--no-progress"])
    assert rc == 0, out
    assert "[sensitivity] resuming the attempt" in out
    assert out.count("already done (from the interrupted attempt)") == len(done)
    trained = {c["step"] for c in json.loads((src / "sensitivity" / "sensitivity.json")
                                             .read_text())["choices"].values() if not c["reused"]}
    assert out.count("retraining from θ0 with the anchors at step") == len(trained) - 1
    assert "continuing from its last checkpoint, checkpoint-6" in out
    assert not partial.exists()
    old = json.loads((src / "sensitivity" / "sensitivity.json").read_text())["choices"]
    new = json.loads((run / "sensitivity" / "sensitivity.json").read_text())["choices"]
    assert {n: c["step"] for n, c in new.items()} == {n: c["step"] for n, c in old.items()}
    assert (run / "report" / "report.md").read_text().count(SECTION_TITLE) == 1


def test_the_stage_is_off_by_default_and_named_in_the_help(swept, capsys):
    assert DEFAULTS["sensitivity"] is False
    assert main(["sensitivity", "--help"]) == 0
    assert "--sensitivity-param" in capsys.readouterr().out
    run, _ = swept
    assert Path(run / "sensitivity" / "stage.json").is_file()
