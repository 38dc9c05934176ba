"""The `t3s` command under a real launcher: 2 gloo ranks on CPU, started by the tests.

* ``torchrun --nproc_per_node 2 -m t3s demo --quick`` equals the one-process quick demo
  (the session's `quick_demo`): the accuracy histories and the bottleneck, Δc, the
  masks, the trained losses and the final accuracies; every token key of the exact
  profiling pass is written once, by one rank; rank 0 alone prints.
* A rank killed in the pilot brings the launcher down within a bounded time, leaves a
  readable run directory, and the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from two_ranks import free_port

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


def _launch(*args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "t3s", *args]


@pytest.fixture(scope="module")
def two_rank_demo(tmp_path_factory):
    """`t3s demo --quick` under torchrun with 2 ranks: (directory, exit status, output)."""
    out = tmp_path_factory.mktemp("demo2") / "quick"
    proc = subprocess.run(_launch("demo", "--quick", "--out", str(out)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, timeout=1200)
    return out, proc.returncode, proc.stdout.decode("utf-8", "replace")


def _read(path: Path):
    return json.loads(path.read_text())


def _losses(stage_dir: Path) -> np.ndarray:
    return np.array([e["loss"] for e in _read(stage_dir / "log_history.json") if "loss" in e])


def test_two_ranks_equal_one_process(two_rank_demo, quick_demo):
    out2, rc2, log2 = two_rank_demo
    out1, rc1, _, _ = quick_demo
    assert rc2 == 0, log2[-3000:]
    assert rc1 == 0
    # rank 0 alone prints: every stage line once
    for stage in ("pilot", "select", "train", "baseline", "eval", "analyze", "report"):
        assert log2.count(f"[{stage}] running") == 1, log2[-3000:]
    assert "2 ranks" in log2
    # the same pilot: accuracy at every evaluation, the bottleneck, the loss curve
    acc1, acc2 = (_read(o / "pilot" / "t3s_accuracy.json") for o in (out1, out2))
    assert acc2["train_acc"] == acc1["train_acc"]
    assert acc2["heldout_acc"] == acc1["heldout_acc"]
    s1, s2 = (_read(o / "pilot" / "stage.json") for o in (out1, out2))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert (s2["summary"]["parallelism"], s1["summary"]["parallelism"]) == ("ddp", "none")
    assert s2["summary"]["bottleneck_step"] == s1["summary"]["bottleneck_step"]
    for stage in ("pilot", "train", "baseline"):
        l1, l2 = _losses(out1 / stage), _losses(out2 / stage)
        assert l1.shape == l2.shape and l1.size > 0
        np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4, err_msg=stage)
    # Δc per token, and the masks wherever Δc is not within rounding of the threshold
    for name in ("delta_online.parquet", "delta_exact.parquet"):
        d1, d2 = (pq.read_table(o / "select" / name).to_pandas() for o in (out1, out2))
        assert len(d1) == len(d2) == s1["summary"]["trace_tokens"]
        assert (d1[["example_id", "position"]].values == d2[["example_id", "position"]].values).all()
        np.testing.assert_allclose(d2["delta"], d1["delta"], atol=2e-4, err_msg=name)
    sel1, sel2 = (pq.read_table(o / "select" / "selection.parquet").to_pandas()
                  for o in (out1, out2))
    # (many tokens sit at Δc ≈ 0: confident at θ0 and at θb)
    clear = np.abs(sel1["delta"].values) > 1e-3
    assert (sel1["loss_mask"].values[clear] == sel2["loss_mask"].values[clear]).all()
    assert (sel1["loss_mask"].values != sel2["loss_mask"].values).mean() < 0.005
    m1, m2 = (_read(o / "report" / "metrics.json") for o in (out1, out2))
    for key in ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "bottleneck_step"):
        assert m2[key] == pytest.approx(m1[key], abs=0.02), key


def test_two_ranks_write_every_token_once(two_rank_demo):
    """The exact profiling pass and the trajectory: each rank its own shard, every token
    key in exactly one of them, none missing."""
    from t3s.trajectory import TrajectoryReader
    from t3s.trajectory.shards import shard_path
    import pyarrow.ipc as ipc
    out, rc, log = two_rank_demo
    assert rc == 0, log[-3000:]
    summary = _read(out / "pilot" / "stage.json")["summary"]
    for store in (out / "select" / "profile", out / "pilot" / "trajectory"):
        keys = []
        for rank in (0, 1):
            with ipc.open_stream(shard_path(store, rank)) as r:
                t = r.read_all()
            assert t.num_rows > 0, (store, rank)
            keys.append(set(zip(t["step"].to_pylist(), t["example_id"].to_pylist(),
                                t["position"].to_pylist())))
            assert len(keys[-1]) == t.num_rows, f"{store}: a key written twice by rank {rank}"
        assert not keys[0] & keys[1], f"{store}: a key written by both ranks"
        merged = TrajectoryReader(store, dataset_fingerprint=None).read()
        assert merged.num_rows == len(keys[0]) + len(keys[1])
    profile = TrajectoryReader(out / "select" / "profile",
                               dataset_fingerprint=None).read().to_pandas()
    for step in (0, summary["bottleneck_step"]):
        assert (profile["step"] == step).sum() == summary["trace_tokens"], step


def _pids_of_rank(launcher: subprocess.Popen, rank: int):
    """The worker processes of ``launcher`` whose RANK is ``rank``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher.pid and f"RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


def test_killed_rank_stops_every_rank_and_the_run_resumes(tmp_path):
    """SIGKILL of rank 1 during the pilot: the launcher and rank 0 end within a bounded
    time, the partial stage stays readable, and the same command resumes from its last
    checkpoint and finishes with every (step, token) recorded once."""
    from t3s.demo import BASE_DIR, write_data
    from t3s.trajectory import TrajectoryReader
    data = tmp_path / "data"
    write_data(data, trace_counts={2: 40, 3: 40, 4: 40}, heldout_size=8, four_term_size=2)
    run_dir = tmp_path / "run"
    cmd = _launch("pilot", "--model", str(BASE_DIR), "--train", str(data / "train.jsonl"),
                  "--steps", "24", "--eval-steps", "6", "--checkpoint-steps", "6",
                  "--eval-subset", "8", "--batch-size", "32", "--max-new-tokens", "40",
                  "--device", "cpu", "--run-dir", str(run_dir))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                            cwd=ROOT)
    partial = run_dir / ".partial-pilot"
    deadline = time.monotonic() + 600
    while not (partial / "checkpoint-12" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the pilot never reached checkpoint-12"
        time.sleep(0.2)
    victims = _pids_of_rank(proc, 1)
    assert victims, "no rank-1 worker found"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.monotonic()
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # pragma: no cover - the failure this test is for
        proc.kill()
        raise AssertionError("a rank was killed and the launcher did not end within 120 s")
    waited = time.monotonic() - killed
    log = proc.stdout.read().decode("utf-8", "replace")
    assert rc != 0, log[-3000:]
    assert not _pids_of_rank(proc, 0), "rank 0 outlived the launcher"
    assert waited < 120
    assert (partial / "attempt.json").is_file()
    # the interrupted store reads back (rank 1's shard cut at its last whole batch)
    with pytest.warns(RuntimeWarning, match="traj-rank00001.arrow is not sealed"):
        TrajectoryReader(partial / "trajectory", dataset_fingerprint=None).read()
    # the same command resumes from a complete checkpoint and finishes
    again = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                           cwd=ROOT, timeout=900)
    log2 = again.stdout.decode("utf-8", "replace")
    assert again.returncode == 0, log2[-3000:]
    assert "[pilot] resuming the attempt" in log2 and "continuing from its last checkpoint" in log2
    record = _read(run_dir / "pilot" / "stage.json")
    assert record["summary"]["resumed_from_step"] in (12, 18)
    traj = TrajectoryReader(run_dir / "pilot" / "trajectory",
                            dataset_fingerprint=None).read().to_pandas()
    assert not traj.duplicated(["step", "example_id", "position"]).any()
    assert sorted(traj["step"].unique()) == list(range(24))


def test_accelerate_launch_with_the_shipped_fsdp2_config(tmp_path):
    """The README's `accelerate launch --config_file examples/accelerate_fsdp2.yaml` on 2 CPU
    processes: the pilot runs on both ranks, and t3s says that accelerate applies FSDP to GPU
    processes only (CPU ones train with DDP) instead of ignoring the config silently."""
    from t3s.demo import BASE_DIR, write_data
    data = tmp_path / "data"
    write_data(data, trace_counts={2: 16, 3: 16, 4: 0}, heldout_size=8, four_term_size=2)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate_fsdp2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "t3s", "pilot",
           "--model", str(BASE_DIR), "--train", str(data / "train.jsonl"), "--steps", "4",
           "--eval-steps", "2", "--eval-subset", "4", "--batch-size", "8",
           "--max-new-tokens", "30", "--device", "cpu", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                          cwd=ROOT, timeout=600)
    log = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, log[-3000:]
    assert log.count("accelerate does not apply to CPU processes") == 1, log[-3000:]
    record = _read(run_dir / "pilot" / "stage.json")
    assert record["world_size"] == 2 and record["summary"]["final_step"] == 4
    assert record["summary"]["parallelism"] == "ddp"
    assert sorted(p.name for p in (run_dir / "pilot" / "trajectory").glob("*.arrow")) == [
        "traj-rank00000.arrow", "traj-rank00001.arrow"]


ENGINES = {
    # accelerate applies FSDP to GPU processes only: tests/fsdp2_on_cpu.py turns its FSDP
    # branch on for CPU ones, so that fsdp2_prepare_model shards the model as on GPUs
    "fsdp2": (["--config_file", str(ROOT / "examples" / "accelerate_fsdp2.yaml")],
              [str(ROOT / "tests" / "fsdp2_on_cpu.py")], {}),
    # DeepSpeed's CPU accelerator over gloo
    "deepspeed": (["--use_deepspeed", "--deepspeed_config_file",
                   str(ROOT / "examples" / "deepspeed_zero3.json")], ["-m", "t3s"],
                  {"DS_ACCELERATOR": "cpu"}),
}


def _small_run_args(data: Path) -> list:
    """Packed batches (the padded path under a launcher is the two-rank demo's): each rank
    packs its slice of every batch's examples, in training and profiling."""
    from t3s.demo import BASE_DIR
    return ["run", "--model", str(BASE_DIR), "--train", str(data / "train.jsonl"),
            "--heldout", str(data / "heldout.jsonl"), "--steps", "6", "--eval-steps", "3",
            "--eval-subset", "8", "--batch-size", "8", "--max-new-tokens", "30",
            "--lr", "3e-4", "--device", "cpu", "--packing", "on"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A small `t3s run` in one process: (data directory, run directory)."""
    from t3s.demo import write_data
    root = tmp_path_factory.mktemp("small")
    data, run_dir = root / "data", root / "one"
    write_data(data, trace_counts={2: 16, 3: 16, 4: 0}, heldout_size=8, four_term_size=2)
    proc = subprocess.run([sys.executable, "-m", "t3s", *_small_run_args(data), "--run-dir",
                           str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode("utf-8", "replace")[-3000:]
    return data, run_dir


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_run_equals_one_process(tmp_path, small_run, engine):
    """`t3s run` (pilot, select, train, eval, report) under `accelerate launch`
    with the model sharded, by FSDP2 from the shipped config or by DeepSpeed ZeRO-3 from
    the shipped one, its batches packed, on 2 CPU ranks equals one process: the accuracies, the bottleneck,
    the losses, Δc and the masks. The runs cover the full-state-dict checkpoints, θb's
    reload, the lockstep generation of a sharded model and the trajectory shards."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e "
                            "'.[deepspeed]')")
    launcher_args, target, extra_env = ENGINES[engine]
    data, one = small_run
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
           "--num_processes", "2", "--main_process_port", str(free_port()), *target,
           *_small_run_args(data), "--run-dir", str(two)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env={**_env(), **extra_env}, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode("utf-8", "replace")[-3000:]
    # (the baseline's retraining is the train stage's code: the default run covers it)
    for stage in ("pilot", "train"):
        s1, s2 = (_read(o / stage / "stage.json") for o in (one, two))
        assert (s1["summary"]["parallelism"], s2["summary"]["parallelism"]) == ("none", engine)
        assert s2["world_size"] == 2
        assert s1["summary"]["packed"] and s2["summary"]["packed"]
        l1, l2 = _losses(one / stage), _losses(two / stage)
        assert l1.shape == l2.shape == (6,)
        np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4, err_msg=stage)
    # each rank recorded its own half of the pilot's trajectory: together one process's
    from t3s.trajectory import TrajectoryReader
    t1, t2 = (TrajectoryReader(o / "pilot" / "trajectory", dataset_fingerprint=None).read()
              .to_pandas().sort_values(["step", "example_id", "position"]) for o in (one, two))
    assert len(list((two / "pilot" / "trajectory").glob("traj-rank*.arrow"))) == 2
    assert len(t1) == len(t2) > 0
    assert (t1[["step", "example_id", "position"]].values
            == t2[["step", "example_id", "position"]].values).all()
    np.testing.assert_allclose(t2["logprob"], t1["logprob"], atol=2e-4)
    acc1, acc2 = (_read(o / "pilot" / "t3s_accuracy.json") for o in (one, two))
    assert acc2["train_acc"] == acc1["train_acc"] and acc2["heldout_acc"] == acc1["heldout_acc"]
    p1, p2 = (_read(o / "pilot" / "stage.json")["summary"] for o in (one, two))
    assert p2["bottleneck_step"] == p1["bottleneck_step"] and p2["thetab"] == p1["thetab"]
    for name in ("delta_online.parquet", "delta_exact.parquet"):
        d1, d2 = (pq.read_table(o / "select" / name).to_pandas() for o in (one, two))
        assert len(d1) == len(d2) == p1["trace_tokens"]
        np.testing.assert_allclose(d2["delta"], d1["delta"], atol=2e-4, err_msg=name)
    sel1, sel2 = (pq.read_table(o / "select" / "selection.parquet").to_pandas()
                  for o in (one, two))
    clear = np.abs(sel1["delta"].values) > 1e-3
    assert clear.sum() > 100
    assert (sel1["loss_mask"].values[clear] == sel2["loss_mask"].values[clear]).all()
    m1, m2 = (_read(o / "report" / "metrics.json") for o in (one, two))
    for key in ("base_acc", "sft_acc", "t3s_acc", "bottleneck_step"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-9), key


DDP_TRAINER_SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch.distributed as dist, transformers
from transformers import TrainingArguments
import t3s
from t3s.demo import BASE_DIR
from t3s.trainer import T3STrainer
from t3s.trajectory import TrajectoryReader
out = sys.argv[1]
tok = transformers.AutoTokenizer.from_pretrained(str(BASE_DIR))
rows = [{"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)}
        for a in range(10, 20) for b in range(10, 12)]
path = os.path.join(out, "traces.jsonl")
# TrainingArguments' defaults: the Trainer wraps in DDP with find_unused_parameters, which
# rebuilds the model output from its items
args = TrainingArguments(output_dir=out, use_cpu=True, max_steps=2, report_to=[],
                         per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
if dist.get_rank() == 0:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
dist.barrier()
data = t3s.TraceDataset.from_jsonl(path, tok)
model = transformers.AutoModelForCausalLM.from_pretrained(str(BASE_DIR))
T3STrainer(model=model, args=args, train_dataset=data, processing_class=tok,
           trajectory_dir=os.path.join(out, "traj")).train()
dist.barrier()
if dist.get_rank() == 0:
    table = TrajectoryReader(os.path.join(out, "traj"), dataset_fingerprint=None).read()
    assert sorted(set(table["step"].to_pylist())) == [0, 1], table
print(f"ok {dist.get_rank()}", flush=True)  # one write: the ranks share the pipe
dist.barrier()
os._exit(0)  # gloo's threads can abort a normal interpreter exit
"""


def test_t3s_trainer_under_plain_ddp(tmp_path):
    """T3STrainer with TrainingArguments' defaults under torchrun (plain DDP): the
    patched output survives DDP's rebuilding of it, and each rank records its shard."""
    script = tmp_path / "ddp_trainer.py"
    script.write_text(DDP_TRAINER_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), str(script), str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                          timeout=300)
    log = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0 and log.count("ok ") == 2, log[-3000:]


def test_plain_trl_sft_trainer_under_fsdp2_runs_on_t3s(tmp_path):
    """A plain trl.SFTTrainer under the shipped FSDP2 config on 2 CPU processes (accelerate's
    FSDP branch, as on GPUs): on a patched model TRL's fused head runs on t3s's kernels, and
    the losses and TRL's metrics equal the unpatched run's."""
    pytest.importorskip("trl")
    script = ROOT / "tests" / "plain_trl_sft.py"
    results = {}
    for flag in ("1", "0"):
        out = tmp_path / f"patched{flag}"
        out.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "accelerate_fsdp2.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(script), str(out), flag, "fsdp2"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                              cwd=ROOT, timeout=600)
        log = proc.stdout.decode("utf-8", "replace")
        assert proc.returncode == 0, log[-3000:]
        results[flag] = [_read(out / f"result.{r}.json") for r in (0, 1)]
    for ours, ref in zip(results["1"], results["0"]):
        assert ours["engine"] == "DistributedType.FSDP" and ours["sharded"], ours
        assert len(ours["logs"]) == 3
        assert ours["t3s_calls"] >= 3 and ref["t3s_calls"] == 0
        for a, b in zip(ours["logs"], ref["logs"]):
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
