"""Resuming interrupted training: the store's rewind, the Trainer paths, and kill -9 of
`t3s demo --quick` inside every stage.

The demo test kills the command from outside, as a user's machine would (SIGKILL, and
SIGINT once), at points found by watching the run directory; each rerun of the same
command must continue where the last complete checkpoint was, and the finished run
must equal an uninterrupted one bit for bit (models, trajectory, selection, metrics).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import t3s  # noqa: E402
from t3s.trainer import T3STrainer  # noqa: E402
from t3s.trajectory import TrajectoryReader, TrajectoryWriter  # noqa: E402
from tiny import arithmetic_records, jsonl_lines, make_tokenizer, tiny_llama  # noqa: E402

from transformers import Trainer, TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KEY = [("step", "ascending"), ("example_id", "ascending"), ("position", "ascending")]


def _write_steps(directory, steps, rows=3):
    w = TrajectoryWriter(directory, dataset_fingerprint="fp", world_size=1, rank=0)
    rng = np.random.default_rng()
    for s in steps:
        w.append(s, np.arange(rows), rng.integers(1, 50, rows), rng.standard_normal(rows))
    return w


# -------------------------------------------------------------------------------------
# the store
# -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sealed", [True, False])
def test_rewind_drops_the_steps_from_the_checkpoint_on(tmp_path, sealed):
    w = _write_steps(tmp_path, range(7))
    before = None
    if sealed:
        w.close()
        before = TrajectoryReader(tmp_path, dataset_fingerprint="fp").read()
    else:  # a killed run: never closed, no seal (the OS drops a dead process's locks)
        w._file.close()
        w._file = None
        w._shard_lock.release()
    w = TrajectoryWriter(tmp_path, dataset_fingerprint="fp", world_size=1, rank=0)
    assert w.rewind(4) == 9           # steps 4, 5, 6: 3 rows each
    assert w.rewind(4) == 0           # idempotent
    w.append(4, np.arange(2), np.arange(2), np.ones(2))
    w.close()
    table = TrajectoryReader(tmp_path, dataset_fingerprint="fp").read()
    assert sorted(set(table["step"].to_pylist())) == [0, 1, 2, 3, 4]
    assert table.num_rows == 4 * 3 + 2
    if before is not None:
        kept = before.filter(np.asarray(before["step"]) < 4)
        assert table.slice(0, kept.num_rows).equals(kept)


def test_rewind_refuses_records_out_of_step_order(tmp_path):
    w = _write_steps(tmp_path, [0, 1, 5, 2])
    size = w.path.stat().st_size
    with pytest.raises(ValueError, match="not in step order"):
        w.rewind(3)
    assert w.path.stat().st_size == size  # left unchanged
    w.close()


# -------------------------------------------------------------------------------------
# the Trainer paths
# -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset(tok):
    return t3s.TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(12, seed=3)), tok)


def _args(out, **kw):
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="steps", save_steps=3, use_cpu=True,
                             disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
                             **kw)


class _Stop(transformers.TrainerCallback):
    """Ends training abruptly at a step (as a kill would), after the step's records."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _run(kind, tok, dataset, out, *, stop=None, resume=None):
    torch.set_num_threads(1)
    cbs = [] if stop is None else [_Stop(stop)]
    traj = out / "traj"
    model = tiny_llama(tok, seed=0)
    if kind == "t3s":
        trainer = T3STrainer(model=model, args=_args(out), train_dataset=dataset,
                             processing_class=tok, trajectory_dir=traj, callbacks=cbs)
    else:  # a plain Trainer with the callback
        t3s.patch(model)
        trainer = Trainer(model=model, args=_args(out, remove_unused_columns=False),
                          train_dataset=dataset,
                          data_collator=t3s.PaddedCollator(tok.pad_token_id),
                          callbacks=[t3s.TrajectoryCallback(traj), *cbs])
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, t3s.TrajectoryCallback):
                cb.close_recorder()
        return None
    return model


@pytest.mark.parametrize("kind", ["t3s", "callback"])
def test_resumed_training_records_every_step_once(tmp_path, tok, dataset, kind):
    """Stopped at step 5 (after the checkpoint at step 3), resumed from the checkpoint:
    steps 3 and 4 were recorded twice by then; the store ends with each step once and
    equal to an uninterrupted run's, and so do the weights."""
    whole = _run(kind, tok, dataset, tmp_path / "whole")
    assert _run(kind, tok, dataset, tmp_path / "cut", stop=5) is None
    fp = t3s.dataset_fingerprint(dataset)
    partial = TrajectoryReader(tmp_path / "cut" / "traj", dataset_fingerprint=fp).read()
    assert max(partial["step"].to_pylist()) == 4
    resumed = _run(kind, tok, dataset, tmp_path / "cut", resume=True)
    a = TrajectoryReader(tmp_path / "whole" / "traj", dataset_fingerprint=fp).read()
    b = TrajectoryReader(tmp_path / "cut" / "traj", dataset_fingerprint=fp).read()
    assert sorted(set(b["step"].to_pylist())) == list(range(6))
    assert b.num_rows == a.num_rows
    assert a.sort_by(KEY).equals(b.sort_by(KEY))
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_resume_without_a_checkpoint_says_so(tmp_path):
    from t3s.trainer import checkpoint_step
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpoint_step(True, str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{\"glob")  # cut off
    with pytest.raises(ValueError, match="missing or unreadable"):
        checkpoint_step(tmp_path / "checkpoint-3", str(tmp_path))


# -------------------------------------------------------------------------------------
# kill -9 of `t3s demo --quick`, inside every stage
# -------------------------------------------------------------------------------------

#: (file whose appearance triggers the signal, signal): inside each stage, after a
#: checkpoint of the training ones (which then must be continued from, not redone)
KILL_POINTS = (
    (".partial-pilot/checkpoint-15/trainer_state.json", signal.SIGKILL),
    (".partial-select/profile", signal.SIGKILL),
    (".partial-train/checkpoint-10/trainer_state.json", signal.SIGINT),
    (".partial-arms/rho1/checkpoint-10/trainer_state.json", signal.SIGKILL),
    (".partial-eval/sft.jsonl", signal.SIGKILL),
)
# (the baseline's retraining is the train stage's code, killed above; one pilot kill is
# enough to show a pilot continued from its checkpoint: each restart costs seconds)


def _demo(out, log):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # SIGINT as at a terminal: a test run started in the background (`cmd &` in a script)
    # hands its children SIGINT ignored, and Python then keeps it ignored
    return subprocess.Popen([sys.executable, "-m", "t3s", "demo", "--quick", "--out", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _whole(trigger: Path) -> bool:
    """Whether the trigger file is there and, for a JSON file (a checkpoint's state, which
    the Trainer writes last), reads back whole: the file appears before its content."""
    if not trigger.exists():
        return False
    if trigger.suffix != ".json":
        return True
    try:
        json.loads(trigger.read_text())
    except (ValueError, OSError):
        return False
    return True


def _kill_at(proc, trigger: Path, sig, timeout=600):
    t = time.monotonic()
    while not _whole(trigger):
        if proc.poll() is not None:
            pytest.fail(f"the demo ended (rc {proc.returncode}) before {trigger} appeared")
        if time.monotonic() - t > timeout:
            proc.kill()
            pytest.fail(f"{trigger} did not appear in {timeout} s")
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=120)


def _summary(run, stage):
    return json.loads((run / stage / "stage.json").read_text())["summary"]


def test_kill_inside_every_stage_then_rerun_equals_a_clean_run(quick_demo, tmp_path):
    clean, rc, _, clean_log = quick_demo
    assert rc == 0, clean_log[-3000:]
    out = tmp_path / "killed"
    logs = []
    for i, (trigger, sig) in enumerate(KILL_POINTS):
        with open(tmp_path / f"log{i}.txt", "w") as log:
            _kill_at(_demo(out, log), out / trigger, sig)
        logs.append((tmp_path / f"log{i}.txt").read_text())
    with open(tmp_path / "final.txt", "w") as log:
        assert _demo(out, log).wait(timeout=900) == 0
    logs.append((tmp_path / "final.txt").read_text())
    joined = "\n".join(logs)
    assert "Traceback" not in joined.replace("KeyboardInterrupt", ""), joined[-3000:]
    # continued, not redone: each rerun after a training-stage kill went on from a
    # checkpoint at or after the one that triggered the kill
    assert "[pilot] continuing from its last checkpoint, checkpoint-" in logs[1]
    assert _summary(out, "pilot")["resumed_from_step"] >= 15
    assert _summary(out, "train")["resumed_from_step"] >= 10
    # the arms: the ones finished before the kill were kept, the interrupted one continued
    assert _summary(out, "arms")["rho1"]["resumed_from_step"] >= 10
    assert _summary(out, "arms")["dft"]["resumed_from_step"] is None
    assert "[select] removing the unfinished attempt" in logs[2]  # not resumable: restarted
    assert "[pilot] already done" in logs[2] and "[train] already done" in logs[-1]
    # the results equal the uninterrupted run's, bit for bit
    for f in ("pilot/final/model.safetensors", "train/model/model.safetensors",
              "baseline/model/model.safetensors", "arms/dft/model/model.safetensors",
              "arms/rho1/model/model.safetensors", "arms/static/model/model.safetensors"):
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f
    import pyarrow.parquet as pq
    for f in ("select/selection.parquet", "select/baseline.parquet"):
        assert pq.read_table(out / f).equals(pq.read_table(clean / f)), f
    fp = None  # both stores were recorded on the same data; compared row for row
    a = TrajectoryReader(clean / "pilot/trajectory", dataset_fingerprint=fp).read()
    b = TrajectoryReader(out / "pilot/trajectory", dataset_fingerprint=fp).read()
    assert a.num_rows == b.num_rows and a.sort_by(KEY).equals(b.sort_by(KEY))
    for stage in ("pilot", "train", "baseline"):
        steps = [e["step"] for e in json.loads((out / stage / "log_history.json").read_text())
                 if "loss" in e]
        assert steps == sorted(set(steps)) == list(range(1, steps[-1] + 1)), stage
        assert json.loads((out / stage / "t3s_accuracy.json").read_text())["train_acc"] == \
            json.loads((clean / stage / "t3s_accuracy.json").read_text())["train_acc"]
    m_clean = json.loads((clean / "report/metrics.json").read_text())
    m_out = json.loads((out / "report/metrics.json").read_text())
    numbers = {k for k, v in m_clean.items() if isinstance(v, (int, float))}
    assert {k: m_out[k] for k in numbers} == {k: m_clean[k] for k in numbers}
    assert not list(out.glob(".partial-*")) and not list(out.rglob("*.tmp-*"))
