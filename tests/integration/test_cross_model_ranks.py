"""A student retrained from a selector's artifact on 2 gloo ranks, its model sharded by
FSDP2 (`accelerate launch` with the shipped config), equals the one-process retraining:
the same masks, the same loss at every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import t3s
from t3s.cli import main
from tiny import make_tokenizer, tiny_llama, write_run_assets
from two_ranks import free_port

ROOT = Path(__file__).resolve().parents[2]


def _args(root: Path, run_dir: Path) -> list:
    return ["run", "--student", str(root / "student"), "--artifact", str(root / "sel.parquet"),
            "--train", str(root / "train.jsonl"), "--heldout", str(root / "heldout.jsonl"),
            "--run-dir", str(run_dir), "--steps", "4", "--eval-steps", "2", "--batch-size", "8",
            "--max-new-tokens", "8", "--lr", "1e-3", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A student (hidden 48) and an anchor artifact over the traces, made by the library
    from a drawn Δc (its selector is not at hand, as for a shipped artifact)."""
    root = write_run_assets(tmp_path_factory.mktemp("xm2"), n_train=16, n_heldout=8)
    tok = make_tokenizer()
    tiny_llama(tok, seed=1, hidden_size=48, intermediate_size=96).save_pretrained(
        root / "student")
    tok.save_pretrained(root / "student")
    examples = list(t3s.TraceDataset.from_jsonl(root / "train.jsonl", tok))
    keys = t3s.TokenTable.from_examples(examples)
    delta = np.random.default_rng(0).normal(size=len(keys)).astype(np.float32)
    t3s.SelectionArtifact.create(keys.with_columns(delta=delta), examples=examples,
                                 tokenizer=tok, rule="anchor").save(root / "sel.parquet")
    return root


def _losses(stage_dir: Path) -> np.ndarray:
    history = json.loads((stage_dir / "log_history.json").read_text())
    return np.array([e["loss"] for e in history if "loss" in e])


def test_two_ranks_retrain_a_student_from_an_artifact_as_one_process(assets, tmp_path):
    one = tmp_path / "one"
    assert main(_args(assets, one)) == 0
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # tests/fsdp2_on_cpu.py: accelerate's FSDP branch for CPU processes, as on GPUs
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "examples" / "accelerate_fsdp2.yaml"), "--num_processes",
                           "2", "--main_process_port", str(free_port()),
                           str(ROOT / "tests" / "fsdp2_on_cpu.py"), *_args(assets, two)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                          timeout=600)
    log = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, log[-3000:]
    assert log.count("[select] reusing") == 1 and "[pilot]" not in log
    for stage in ("train", "arms/sft"):
        l1, l2 = _losses(one / stage), _losses(two / stage)
        assert l1.size > 0 and l1.shape == l2.shape, stage
        np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4, err_msg=stage)
    record = json.loads((two / "train" / "stage.json").read_text())
    assert record["world_size"] == 2 and record["summary"]["parallelism"] == "fsdp2"
    assert record["summary"]["kept_fraction"] == json.loads(
        (one / "train" / "stage.json").read_text())["summary"]["kept_fraction"]
