"""examples/t3s_pipeline.py runs end to end and its outputs agree with each other."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
from tiny import load_example  # noqa: E402

import t3s  # noqa: E402
from t3s.trainer import read_accuracy_history  # noqa: E402


def test_pipeline_example(tmp_path, capsys):
    ex = load_example("t3s_pipeline")
    summary = ex.main(tmp_path, verbose=True)
    printed = capsys.readouterr().out
    assert "bottleneck: step" in printed and "T3S" in printed
    # the summary's "worst" names its column (training accuracy, not held-out)
    assert "(worst training acc" in printed and "(worst " not in printed.replace(
        "(worst training acc", "")

    # every stage left its output
    paths = summary["paths"]
    for key in ("theta0", "thetab", "trajectory", "profile", "artifact", "pilot_history",
                "t3s_history"):
        assert os.path.exists(paths[key]), key
    assert (Path(paths["theta0"]) / "model.safetensors").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["bottleneck_step"] == \
        summary["bottleneck_step"]

    # the bottleneck is the argmin of the recorded history, and its checkpoint was kept
    tok = ex.build_tokenizer()
    pilot = t3s.TraceDataset.from_jsonl(tmp_path / "data" / "pilot.jsonl", tok)
    history = read_accuracy_history(paths["pilot_history"])
    b = summary["bottleneck_step"]
    assert b == t3s.find_bottleneck(history["train_acc"]) == history["bottleneck_step"]
    assert sorted(history["train_acc"]) == list(range(0, ex.PILOT_STEPS + 1, ex.EVAL_STEPS))
    assert set(history["heldout_acc"]) == set(history["train_acc"])
    latest = max(summary["kept_checkpoints"])
    assert latest == ex.PILOT_STEPS
    # θ0 (step 0) is no candidate (find_bottleneck's default, the callback's too)
    bound = min(a for s, a in history["train_acc"].items() if s > 0) + 0.0
    assert all(history["train_acc"][s] <= bound for s in summary["kept_checkpoints"] if s != latest)
    assert b > 0
    assert b in summary["kept_checkpoints"] and paths["thetab"].endswith(f"checkpoint-{b}")

    # the trajectory: one record per pilot step, and every trace token was visited
    reader = t3s.TrajectoryReader(paths["trajectory"],
                                  dataset_fingerprint=t3s.dataset_fingerprint(pilot))
    assert reader.steps().tolist() == list(range(ex.PILOT_STEPS))
    table = reader.read()
    visited = {(int(e), int(p)) for e, p in zip(table["example_id"].to_numpy(),
                                                table["position"].to_numpy())}
    all_keys = pilot.keys()
    assert visited == set(zip(all_keys.example_id.tolist(), all_keys.position.tolist()))
    assert summary["trajectory_rows"] == reader.num_rows

    # the artifact: loads against the same tokenizer and data; mask = AR rule on its Δc
    art = t3s.SelectionArtifact.load(paths["artifact"], tokenizer=tok, examples=pilot)
    assert art.rule == "anchor" and art.metadata["extra"]["bottleneck_step"] == b
    delta, keep = art.table["delta"], art.table["loss_mask"]
    np.testing.assert_array_equal(keep, ~(delta > 0))
    assert int(keep.sum()) == summary["kept_tokens"]
    assert summary["trace_tokens"] == pilot.num_response_tokens() == len(art.table)
    masks = art.loss_masks(pilot)
    assert sum(int(m.sum()) for m in masks.values()) == summary["kept_tokens"]

    # online and exact Δc were compared on every token
    agreement = summary["agreement"]
    assert agreement["n_common"] == summary["trace_tokens"]
    assert 0.0 <= agreement["mask_agreement"] <= 1.0

    # the retraining ran the same schedule, from θ0 (same step-0 accuracy)
    t3s_hist = read_accuracy_history(paths["t3s_history"])
    assert sorted(t3s_hist["train_acc"]) == sorted(history["train_acc"])
    assert t3s_hist["train_acc"][0] == history["train_acc"][0]
    assert summary["seconds"] < 120
