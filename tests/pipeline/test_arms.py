"""Extra comparison arms (``--arms``) and the three trajectory-signal rules.

- The rules `entropy`, `logit_grad` and `kl` (t3s.selection) on hand-computed tables:
  thresholds, ties, fraction / budget, a missing column.
- The ``arms`` setting: parsing and every refusal, before any work.
- One `t3s run` on the tiny model (tests/tiny.py) with six arms: their artifacts keep
  T3S's budget where they should, every arm is trained, scored and reported; a second
  run does nothing; an arms stage killed in its last arm resumes it from its checkpoint
  and keeps the arms that had finished.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tiny import cli_error_line as error_line, make_tokenizer, write_run_assets  # noqa: E402

import t3s  # noqa: E402
import t3s.pipeline.stages as t3s_stages  # noqa: E402
from t3s import TokenTable  # noqa: E402
from t3s.cli import main  # noqa: E402
from t3s.pipeline import rundir  # noqa: E402
from t3s.pipeline.arms import check_signals  # noqa: E402
from t3s.pipeline.settings import (UsageError, arm_params, check_rule_params,  # noqa: E402
                                   normalize_config)

ARMS = ("dft", "rho1", "static", "random", "entropy", "kl")


def _table(**columns):
    """Two examples (ids 0 and 1), positions 1.. in key order, float columns."""
    n = len(next(iter(columns.values())))
    eid = np.array([0] * (n // 2) + [1] * (n - n // 2), dtype=np.int64)
    pos = np.concatenate([np.arange(1, n // 2 + 1), np.arange(1, n - n // 2 + 1)])
    return TokenTable(eid, pos, {k: np.asarray(v, np.float64) for k, v in columns.items()})


def _mask(out):
    return np.asarray(out["loss_mask"]).tolist()


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------

def test_entropy_rule_drops_tokens_whose_entropy_fell():
    t = _table(delta_entropy=[-0.5, 0.0, 0.2, -0.1, -0.3, 0.4])
    assert _mask(t3s.apply_rule("entropy", t)) == [False, True, True, False, False, True]
    # threshold 0.2: only ΔH < -0.2; exactly -threshold is kept
    assert _mask(t3s.apply_rule("entropy", t, threshold=0.3)) == [False, True, True, True,
                                                                   True, True]
    assert _mask(t3s.apply_rule("entropy", t, threshold=0.1)) == [False, True, True, True,
                                                                   False, True]
    # the function on a plain tensor: same shape, True keeps
    import torch
    m = t3s.entropy_change_mask(torch.tensor([[-1.0, 1.0], [0.0, -2.0]]))
    assert m.tolist() == [[False, True], [True, False]]


def test_logit_grad_rule_drops_tokens_the_pilot_was_fitting():
    t = _table(delta_logit_grad=[0.3, -0.3, -1e-9, 0.0, -2.0, 1.0])
    assert _mask(t3s.apply_rule("logit_grad", t)) == [True, False, False, True, False, True]
    assert _mask(t3s.apply_rule("logit_grad", t, threshold=0.3)) == [True, True, True, True,
                                                                      False, True]


def test_kl_rule_drops_the_largest_kl_ties_by_key_order():
    # keys in order: (0,1) (0,2) (0,3) (1,1) (1,2) (1,3); rows shuffled below
    kl = [0.5, 0.9, 0.5, 0.1, 0.9, 0.5]
    t = _table(kl=kl)
    # fraction 0.5: drop round(3) = the two 0.9 and the first 0.5 in key order (0,1)
    assert _mask(t3s.apply_rule("kl", t, fraction=0.5)) == [False, False, True, True, False, True]
    # budget = tokens kept: keep 4, drop 2 (both 0.9)
    assert _mask(t3s.apply_rule("kl", t, budget=4)) == [True, False, True, True, False, True]
    assert _mask(t3s.apply_rule("kl", t, budget=6)) == [True] * 6
    assert _mask(t3s.apply_rule("kl", t, budget=0)) == [False] * 6
    # default: the static rule's 20% (round(1.2) = 1): the first 0.9 in key order
    assert _mask(t3s.apply_rule("kl", t)) == [True, False, True, True, True, True]
    # row order does not matter: the same keys reversed give the same decision per key
    rev = TokenTable(t.example_id[::-1].copy(), t.position[::-1].copy(),
                     {"kl": np.asarray(kl, np.float64)[::-1].copy()})
    assert _mask(t3s.apply_rule("kl", rev, fraction=0.5))[::-1] == \
        [False, False, True, True, False, True]
    with pytest.raises(ValueError, match="exactly one of fraction or budget"):
        t3s.kl_mask(t, fraction=0.5, budget=2)
    with pytest.raises(ValueError, match="budget must be in"):
        t3s.apply_rule("kl", t, budget=7)
    with pytest.raises(ValueError, match="fraction must be in"):
        t3s.apply_rule("kl", t, fraction=1.5)


@pytest.mark.parametrize("rule,column", [("entropy", "delta_entropy"),
                                         ("logit_grad", "delta_logit_grad"), ("kl", "kl")])
def test_a_signal_rule_without_its_column_names_it(rule, column):
    with pytest.raises(ValueError, match=f"rule '{rule}' needs a '{column}' column"):
        t3s.apply_rule(rule, _table(delta=[0.1, -0.1]))


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

def test_arms_setting_is_parsed_and_made_canonical():
    assert normalize_config({})["arms"] == []
    cfg = normalize_config({"arms": " dft, rho1,inverse ,kl,"})
    assert cfg["arms"] == ["dft", "rho1", "inverse_anchor", "kl"]
    assert normalize_config({"arms": ["static", "DFT"]})["arms"] == ["static", "dft"]
    check_rule_params(cfg)


@pytest.mark.parametrize("values,message", [
    ({"arms": "dft,nope"}, "unknown arm 'nope'"),
    ({"arms": "kl,kl"}, "arm 'kl' is given twice"),
    ({"arms": "inverse,inverse_anchor"}, "arm 'inverse_anchor' is given twice"),
    ({"arms": "forced"}, "arm 'forced' marks tokens for diffusion-LM training"),
    ({"arms": "none"}, "arm 'none' is no arm"),
    ({"arms": "sft"}, "arm 'sft' is plain SFT, which the pilot already is"),
    ({"arms": "dft", "baseline": "dft"}, "arm 'dft' is the baseline"),
    ({"arms": "random", "baseline": "random"}, "arm 'random' is the baseline"),
    ({"arms": "anchor"}, "arm 'anchor' is the rule"),
    ({"arms": "random", "objective": "diffusion", "rule": "forced"},
     "arms are not supported with objective diffusion"),
    ({"arms": 3}, "arms must be a comma-separated string or a list"),
])
def test_bad_arms_are_refused(values, message):
    with pytest.raises(UsageError, match=message):
        normalize_config(values)


def test_arms_keep_the_rules_budget():
    cfg = normalize_config({"seed": 3})
    assert arm_params(cfg, "random", 30, 120) == {"seed": 3, "budget": 30}
    assert arm_params(cfg, "kl", 30, 120) == {"budget": 30}
    assert arm_params(cfg, "rho1", 30, 120) == {"keep_fraction": 0.25}
    assert arm_params(cfg, "static", 30, 120) == {"fraction": 0.75, "which": "top"}
    assert arm_params(cfg, "entropy", 30, 120) == {} and arm_params(cfg, "dft", 30, 120) == {}


def test_signal_rules_need_the_pilots_thetab(tmp_path):
    check_signals(normalize_config({"arms": "dft"}), None)      # no signal rule: fine
    with pytest.raises(UsageError, match=r"trajectory-signal rules \(kl, entropy\).*θb"):
        check_signals(normalize_config({"rule": "kl", "arms": "entropy"}), None)
    with pytest.raises(UsageError, match="θb"):
        check_signals(normalize_config({"baseline": "logit_grad"}), tmp_path / "gone")


# --------------------------------------------------------------------------------------
# A run with arms
# --------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_run_assets(tmp_path_factory.mktemp("assets"))


def settings(assets, arms=",".join(ARMS)):
    # 4 steps = one epoch of 16 traces: a stage killed after its last checkpoint resumes at
    # an epoch's end (resumed mid-epoch at max_steps, the Trainer would take one more step)
    return ["--model", str(assets / "model"), "--train", str(assets / "train.jsonl"),
            "--heldout", str(assets / "heldout.jsonl"), "--steps", "4", "--eval-steps", "2",
            "--eval-subset", "4", "--batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-2",
            "--arms", arms, "--no-progress"]


def test_bad_arms_fail_before_any_work(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # prob_threshold has no default threshold: its made-up mask fails at once
    assert main(["run", *settings(assets, "dft,prob"), "--run-dir", str(run_dir)]) == 2
    assert "arm 'prob_threshold'" in error_line(capsys)
    assert main(["run", *settings(assets, "sft"), "--run-dir", str(run_dir)]) == 2
    assert "arm 'sft' is plain SFT" in error_line(capsys)
    assert not run_dir.exists()
    assert main(["arms", *settings(assets, ""), "--run-dir", str(run_dir)]) == 2
    assert "arms is empty" in error_line(capsys)


@pytest.fixture(scope="module")
def arms_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert main(["run", *settings(assets), "--run-dir", str(run_dir)]) == 0
    return run_dir


def _ledger(run_dir: Path):
    return json.loads((run_dir / "stages.json").read_text())["stages"]


def test_every_arm_is_selected_trained_scored_and_reported(arms_run, assets):
    run_dir = arms_run
    assert list(_ledger(run_dir)) == ["pilot", "select", "train", "arms", "eval", "report"]
    tok = make_tokenizer()
    data = t3s.TraceDataset.from_jsonl(assets / "train.jsonl", tok)
    art = t3s.SelectionArtifact.load(run_dir / "select" / "selection.parquet", tokenizer=tok,
                                     examples=data)
    kept = int(art.table["loss_mask"].sum())
    select = _ledger(run_dir)["select"]["summary"]
    assert list(select["arms"]) == list(ARMS)
    for name in ARMS:
        arm = t3s.SelectionArtifact.load(run_dir / "select" / rundir.arm_file(name),
                                         tokenizer=tok, examples=data)
        n_kept = int(arm.table["loss_mask"].sum())
        if name in ("random", "rho1", "static", "kl"):   # T3S's budget, other tokens
            assert n_kept == kept, name
        assert select["arms"][name]["masked_fraction"] == pytest.approx(1 - n_kept / len(art.table))
    dft = t3s.SelectionArtifact.load(run_dir / "select" / rundir.arm_file("dft"))
    assert dft.table["loss_mask"].all()
    entropy = t3s.SelectionArtifact.load(run_dir / "select" / rundir.arm_file("entropy"))
    np.testing.assert_array_equal(entropy.table["loss_mask"],
                                  ~(entropy.table["delta_entropy"] < 0))

    # the signal columns are the library's trajectory signals θ0 -> θb, key by key
    from t3s.analysis import trajectory_signals
    from t3s.pipeline.loaders import load_model
    pilot = _ledger(run_dir)["pilot"]["summary"]
    cfg = normalize_config({"model": str(assets / "model")})
    sig = trajectory_signals(load_model(str(assets / "model"), cfg),
                             load_model(str(run_dir / "pilot" / pilot["thetab"]), cfg),
                             list(data), batch_size=8, pad_token_id=tok.pad_token_id)
    table = art.table.sorted()
    np.testing.assert_array_equal(table.example_id, sig["example_id"])
    np.testing.assert_array_equal(table.position, sig["position"])
    for column in ("delta_entropy", "delta_logit_grad", "kl"):
        np.testing.assert_allclose(table[column], sig[column], rtol=1e-5, atol=1e-6)

    # trained: one directory per arm, finished; dft with token scaling
    summary = _ledger(run_dir)["arms"]["summary"]
    assert list(summary) == list(ARMS)
    for name in ARMS:
        arm_dir = run_dir / "arms" / name
        assert (arm_dir / "model" / "model.safetensors").is_file(), name
        assert (arm_dir / "t3s_accuracy.json").is_file() and (arm_dir / "summary.json").is_file()
        assert not list(arm_dir.glob("checkpoint-*"))
        assert summary[name]["final_step"] == 4
    assert summary["dft"]["loss_options"] == {"token_scaling": True}
    assert summary["dft"]["kept_fraction"] == 1.0
    assert summary["rho1"]["loss_options"] == {}

    # scored and reported
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["arms"] == list(ARMS)
    for name in ARMS:
        assert results["arms"][name]["n"] == 8
        assert (run_dir / "eval" / rundir.predictions_file(name)).is_file()
        assert metrics[f"{name}_acc"] == results["arms"][name]["accuracy"]
        assert metrics["accuracy_by_set"]["heldout"][name] == metrics[f"{name}_acc"]
        assert metrics["n_test"][name] == 8
    for key in ("dft_acc", "rho1_acc", "static_acc", "random_acc", "entropy_acc", "kl_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["arms_params"]["static"]["which"] == "top"
    report = (run_dir / "report" / "report.md").read_text()
    for row in ("| DFT (every token, loss × stop-grad p) |", "| Rho-1 (same budget) |",
                "| static confidence (same budget: drops the most confident at θ0) |",
                "| random (same budget) |", "| entropy-change rule",
                "| KL rule (same budget"):
        assert row in report, row
    for name in ("DFT", "Rho-1", "the static-confidence rule", "the random mask",
                 "the entropy-change rule", "the KL rule"):
        assert any(line.startswith("- On the heldout set") and name in line
                   for line in report.splitlines()), name


def test_arms_resume_per_arm(arms_run, tmp_path, monkeypatch, capsys):
    """A second run does nothing; an arms stage killed in its last arm keeps the arms
    that finished and continues the last one from its checkpoint, to the same model."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(arms_run, run_dir)
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert "[arms] already done" in capsys.readouterr().out
    weights = (run_dir / "arms" / "kl" / "model" / "model.safetensors").read_bytes()
    save = t3s_stages._save_model

    def killed_in_kl(trainer, tok, path):
        if Path(path).parent.name == "kl":
            raise RuntimeError("killed while saving the model")
        save(trainer, tok, path)

    monkeypatch.setattr(t3s_stages, "_save_model", killed_in_kl)
    with pytest.raises(RuntimeError, match="killed"):
        main(["arms", "--run-dir", str(run_dir), "--redo", "arms", "--no-progress"])
    monkeypatch.undo()
    partial = run_dir / ".partial-arms"
    assert (partial / "dft" / "summary.json").is_file()
    assert not (partial / "kl" / "summary.json").exists()
    capsys.readouterr()
    assert main(["arms", "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[arms] resuming the attempt an interrupted run left" in out
    for name in ARMS[:-1]:
        assert f"[arms] {name}: finished before the interruption" in out, name
    assert "[arms/kl] continuing from its last checkpoint, checkpoint-4" in out
    assert (run_dir / "arms" / "kl" / "model" / "model.safetensors").read_bytes() == weights
    summary = _ledger(run_dir)["arms"]["summary"]
    assert summary["kl"]["resumed_from_step"] == 4 and summary["dft"]["resumed_from_step"] is None
    assert not partial.exists()
