"""The `t3s` command: a whole run on a tiny model, resuming, redoing, a killed stage,
settings from YAML, and the errors a user can fix.

The model is a ~30k-parameter Llama (tests/tiny.py) saved to a temporary
directory with its character-level tokenizer; nothing is downloaded. The
commands run in-process through `t3s.cli.main`.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
yaml = pytest.importorskip("yaml")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from tiny import (arithmetic_records, cli_error_line as error_line, make_tokenizer,  # noqa: E402
                  write_jsonl, write_run_assets)

import t3s  # noqa: E402
import t3s.pipeline.stages as t3s_stages  # noqa: E402
from t3s.cli import main  # noqa: E402
from t3s.pipeline import engine, rundir  # noqa: E402
from t3s.pipeline.settings import DEFAULTS, UsageError  # noqa: E402
from t3s.pipeline.report import METRIC_KEYS  # noqa: E402

STAGES = ("pilot", "select", "train", "baseline", "eval", "report")
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny θ0 (model + tokenizer directory) and train / held-out JSONL files."""
    return write_run_assets(tmp_path_factory.mktemp("assets"))


def settings(assets):
    return ["--model", str(assets / "model"), "--train", str(assets / "train.jsonl"),
            "--heldout", str(assets / "heldout.jsonl"), "--steps", "4", "--eval-steps", "2",
            "--eval-subset", "4", "--batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-2",
            "--baseline", "random", "--no-progress"]


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished `t3s run` (do not modify it; copy it with `copy_run`)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    t0 = time.perf_counter()
    rc = main(["run", *settings(assets), "--run-dir", str(run_dir)])
    assert rc == 0
    print(f"t3s run took {time.perf_counter() - t0:.1f} s")
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def ledger(run_dir: Path):
    return json.loads((run_dir / "stages.json").read_text())["stages"]


def run_ids(run_dir: Path):
    return {name: rec["run_id"] for name, rec in ledger(run_dir).items()}


# --------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------

def test_run_writes_consistent_outputs(finished, assets):
    run_dir = finished
    assert list(ledger(run_dir)) == list(STAGES)
    assert not list(run_dir.glob(".partial-*"))
    for name in STAGES:
        assert (run_dir / name / "stage.json").is_file(), name
    assert (run_dir / "pilot" / "final" / "model.safetensors").is_file()
    assert (run_dir / "train" / "model" / "model.safetensors").is_file()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["config"]["steps"] == 4 and cfg["config"]["rule"] == "anchor"

    # the bottleneck: argmin of the pilot's training accuracy after step 0 (one rule in
    # the library and the command); θb kept
    hist = t3s.read_accuracy_history(run_dir / "pilot")
    after = {s: a for s, a in hist["train_acc"].items() if s > 0}
    b = t3s.find_bottleneck(hist["train_acc"])
    assert b == t3s.find_bottleneck(after) > 0
    assert sorted(hist["train_acc"]) == [0, 2, 4]
    assert hist["bottleneck_step"] == b
    pilot = ledger(run_dir)["pilot"]["summary"]
    assert pilot["bottleneck_step"] == b
    thetab = run_dir / "pilot" / pilot["thetab"]
    assert (thetab / "model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "pilot").glob("checkpoint-*")) == \
        ([] if pilot["thetab"] == "final" else [pilot["thetab"]])

    # the artifact: anchors are Δc > 0, checked against the tokenizer and the data
    tok = make_tokenizer()
    data = t3s.TraceDataset.from_jsonl(assets / "train.jsonl", tok)
    art = t3s.SelectionArtifact.load(run_dir / "select" / "selection.parquet", tokenizer=tok,
                                     examples=data)
    assert art.rule == "anchor"
    assert len(art.table) == data.num_response_tokens()
    np.testing.assert_array_equal(art.table["loss_mask"], ~(art.table["delta"] > 0))
    base = t3s.SelectionArtifact.load(run_dir / "select" / "baseline.parquet")
    assert base.rule == "random"
    assert int(base.table["loss_mask"].sum()) == int(art.table["loss_mask"].sum())  # same budget

    # metrics.json: the stable keys first, equal to what the stages recorded
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert tuple(metrics)[:len(METRIC_KEYS)] == METRIC_KEYS
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for arm in ("base", "sft", "t3s", "baseline"):
        assert metrics[f"{arm}_acc"] == results["arms"][arm]["accuracy"]
        assert 0.0 <= metrics[f"{arm}_acc"] <= 1.0
        lines = (run_dir / "eval" / f"{arm}.jsonl").read_text().splitlines()
        assert len(lines) == results["arms"][arm]["n"] == 8
    assert metrics["bottleneck_step"] == b
    # every accuracy names its set and size (the curves: --eval-subset 4 of each set)
    assert metrics["accuracy_set"] == "heldout" and metrics["n_test"]["t3s"] == 8
    assert metrics["curve_sets"] == {"train_acc": {"set": "train", "n": 4, "of": 16},
                                     "heldout_acc": {"set": "heldout", "n": 4, "of": 8}}
    assert metrics["masked_fraction"] == pytest.approx(1 - art.table["loss_mask"].mean())
    # the sets live outside the run directory: metrics.json names them by file, never by
    # the machine's absolute path (the run's config.json keeps that)
    assert metrics["test_set"] == "heldout.jsonl"
    assert metrics["set_paths"] == {"heldout": "heldout.jsonl"}
    assert str(assets) not in (run_dir / "report" / "metrics.json").read_text()
    online = pq.read_table(run_dir / "select" / "delta_online.parquet")
    exact = pq.read_table(run_dir / "select" / "delta_exact.parquet")
    agreement = t3s.compare_deltas(online, exact, bottleneck_step=b)
    assert metrics["mask_agreement"] == pytest.approx(agreement.mask_agreement)

    # report.md: the table, and plain statements that follow from the numbers
    report = (run_dir / "report" / "report.md").read_text()
    assert "## What this run is" in report and "**Imitation Shock**" in report
    assert "docs/demo/README.md" not in report          # not the demo
    assert "(heldout set, n=8)" in report and "on 4 of the 8 held-out problems" in report
    for text in ("| base (θ0) |", "| plain SFT", "| T3S (rule `anchor`) |", "| baseline",
                 "bottleneck step", "masked fraction", "mask agreement",
                 "shock.png", "delta_hist.png", "traces.png"):
        assert text in report, text
    if metrics["t3s_acc"] <= metrics["sft_acc"]:
        assert "T3S did not beat plain SFT" in report
    else:
        assert "did not beat plain SFT" not in report
    for name in ("shock.png", "delta_hist.png", "traces.png"):
        png = (run_dir / "report" / name).read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000, name


def test_second_run_does_nothing(finished, assets, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    before = run_ids(run_dir)
    assert main(["run", *settings(assets), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out
    assert run_ids(run_dir) == before  # no stage ran again (checked by id, not by time)
    # with no settings at all the stored ones are used
    assert main(["run", "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert run_ids(run_dir) == before


def test_progress_follows_each_invocation(finished):
    """--no-progress is stored with the run but not inherited: the next command's bars
    follow its own terminal (or its own flag)."""
    from t3s.pipeline.commands import resolve_config
    stored = json.loads((finished / "config.json").read_text())["config"]
    assert stored["progress"] is False
    cfg, _, _ = resolve_config({"run_dir": str(finished)})
    assert cfg["progress"] is None and cfg["steps"] == 4   # the rest is inherited
    assert resolve_config({"run_dir": str(finished), "progress": True})[0]["progress"] is True


def test_redo_train_redoes_train_and_what_uses_it(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    before = run_ids(run_dir)
    assert main(["run", "--run-dir", str(run_dir), "--redo", "train", "--no-progress"]) == 0
    after = run_ids(run_dir)
    out = capsys.readouterr().out
    assert "[train] running (asked to redo)" in out
    # upstream and unrelated stages untouched; train redone; eval and report used the old
    # train's model and report, so they follow
    for name in ("pilot", "select", "baseline"):
        assert after[name] == before[name], name
    for name in ("train", "eval", "report"):
        assert after[name] != before[name], name
    assert ledger(run_dir)["eval"]["inputs"]["train"] == after["train"]
    # `t3s train --redo train` runs the one stage only
    assert main(["train", "--run-dir", str(run_dir), "--redo", "train", "--no-progress"]) == 0
    again = run_ids(run_dir)
    assert again["train"] != after["train"]
    assert {k: v for k, v in again.items() if k != "train"} == \
        {k: v for k, v in after.items() if k != "train"}


def _kill_train_while_saving(run_dir, monkeypatch, extra=()):
    def killed(trainer, tok, path):
        raise RuntimeError("killed while saving the model")

    monkeypatch.setattr(t3s_stages, "_save_model", killed)
    with pytest.raises(RuntimeError, match="killed"):
        main(["run", "--run-dir", str(run_dir), "--redo", "train", "--no-progress", *extra])
    monkeypatch.undo()
    partial = run_dir / ".partial-train"
    assert (partial / "t3s_accuracy.json").is_file()      # it had started writing
    assert (partial / rundir.ATTEMPT_FILE).is_file()
    assert not (run_dir / "train").exists()
    assert "train" not in ledger(run_dir)
    return partial


def test_killed_stage_resumes_from_its_checkpoint(finished, tmp_path, monkeypatch, capsys):
    """A training stage killed after its last checkpoint continues from it (no step is
    trained twice) and ends with the same model as the uninterrupted run."""
    run_dir = copy_run(finished, tmp_path / "run")
    before = run_ids(run_dir)
    weights = (run_dir / "train" / "model" / "model.safetensors").read_bytes()
    partial = _kill_train_while_saving(run_dir, monkeypatch)
    assert ledger(run_dir)["pilot"]["run_id"] == before["pilot"]
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[train] resuming the attempt an interrupted run left" in out
    assert "[train] continuing from its last checkpoint, checkpoint-4" in out
    assert "[pilot] already done" in out and "[select] already done" in out
    after = run_ids(run_dir)
    assert after["pilot"] == before["pilot"] and after["select"] == before["select"]
    assert after["train"] != before["train"]
    assert not partial.exists()
    assert (run_dir / "train" / "model" / "model.safetensors").read_bytes() == weights
    summary = json.loads((run_dir / "train" / "stage.json").read_text())["summary"]
    assert summary["resumed_from_step"] == 4 and summary["final_step"] == 4
    assert not list((run_dir / "train").glob("checkpoint-*"))  # only kept for resuming
    assert not (run_dir / "train" / rundir.ATTEMPT_FILE).exists()
    assert (run_dir / "report" / "report.md").is_file()


def test_an_attempt_under_other_settings_is_removed_not_resumed(finished, tmp_path, monkeypatch,
                                                                capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    partial = _kill_train_while_saving(run_dir, monkeypatch)
    capsys.readouterr()
    # another learning rate: the attempt's checkpoint belongs to other settings
    assert main(["run", "--run-dir", str(run_dir), "--no-progress", "--lr", "5e-3",
                 "--force"]) == 0
    out = capsys.readouterr().out
    assert "[train] removing the unfinished attempt left by an interrupted run" in out
    assert "continuing from" not in out
    assert not partial.exists()
    assert json.loads((run_dir / "train" / "stage.json").read_text())["summary"][
        "resumed_from_step"] is None


def test_ledger_adopts_a_stage_renamed_before_the_ledger_was_written(tmp_path):
    run = rundir.RunDir(tmp_path / "run")
    run.create()
    record = {"stage": "pilot", "run_id": "abc", "hash": "h", "inputs": {}}
    run.partial_dir("pilot").mkdir()
    run.commit("pilot", record)
    assert run.ledger()["pilot"]["run_id"] == "abc"
    # killed after the rename, before the ledger write: the stage record is adopted
    (run.path / "stages.json").unlink()
    assert run.ledger()["pilot"]["run_id"] == "abc"
    # a ledger entry whose directory is gone is dropped
    shutil.rmtree(run.stage_dir("pilot"))
    assert "pilot" not in run.ledger()


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

def test_yaml_config_and_flag_override(assets, tmp_path, capsys):
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(assets / "train.jsonl", conf / "traces.jsonl")
    (conf / "run.yaml").write_text(yaml.safe_dump({
        "model": str(assets / "model"), "train": "traces.jsonl", "steps": 7, "lr": 0.001,
        "eval-steps": 3, "rule": "inverse", "rule_params": {"threshold": 0.5},
        "run_dir": "out"}))
    assert main(["run", "--config", str(conf / "run.yaml"), "--lr", "0.5",
                 "--rule-param", "threshold=0.25", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["lr"] == 0.5                      # the flag wins
    assert cfg["steps"] == 7 and cfg["eval_steps"] == 3
    assert cfg["rule"] == "inverse_anchor"        # alias made canonical
    assert cfg["rule_params"] == {"threshold": 0.25}
    assert cfg["train"] == str(conf / "traces.jsonl")   # relative to the YAML file
    assert cfg["run_dir"] == str(conf / "out")
    assert cfg["batch_size"] == DEFAULTS["batch_size"]
    assert not (conf / "out").exists()           # --print-config does nothing else


def test_unknown_yaml_key(assets, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlearning_rate: 0.1\n")
    assert main(["run", "--config", str(path)]) == 2
    line = error_line(capsys)
    assert "unknown setting 'learning_rate'" in line and "run.yaml" in line


def test_bad_yaml_values(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("steps: many\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "steps must be an integer" in error_line(capsys)
    path.write_text("- a\n- b\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "expected a mapping" in error_line(capsys)
    path.write_text("rule: nonsense\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "unknown rule 'nonsense'" in error_line(capsys)


# --------------------------------------------------------------------------------------
# Errors a user can fix: one line, exit status 2, nothing created
# --------------------------------------------------------------------------------------

def test_missing_model_path(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = settings(assets)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(["run", *args, "--run-dir", str(run_dir)]) == 2
    line = error_line(capsys)
    assert "no-such-model does not exist" in line
    assert not run_dir.exists()
    assert main(["run", "--run-dir", str(run_dir), "--train", str(assets / "train.jsonl")]) == 2
    assert "no model given" in error_line(capsys)


def test_model_needing_remote_code(assets, tmp_path, capsys):
    model = shutil.copytree(assets / "model", tmp_path / "custom")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    args = settings(assets)
    args[args.index("--model") + 1] = str(model)
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "--trust-remote-code" in line and "auto_map" in line
    assert not (tmp_path / "run").exists()


def test_pickle_weights_are_refused(assets, tmp_path, capsys):
    model = shutil.copytree(assets / "model", tmp_path / "pickled")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not even unpickled")
    args = settings(assets)
    args[args.index("--model") + 1] = str(model)
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "pickle weights (pytorch_model.bin)" in line and "safe_serialization=True" in line
    assert not (tmp_path / "run").exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(assets, tmp_path, monkeypatch,
                                                              capsys):
    """ENOSPC while a stage writes its JSON: one `t3s: error:` line naming the file, no
    traceback, no `*.tmp-NNNN` left behind; the same command resumes once there is room."""
    import errno

    from t3s.pipeline import rundir
    real_replace = rundir.os.replace
    full = {"on": True}

    def replace(src, dst):
        if full["on"] and str(dst).endswith("stage.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)
    run_dir = tmp_path / "run"
    args = [*settings(assets), "--run-dir", str(run_dir)]
    assert main(["pilot", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t3s: error: no space left on the device "
                                               "writing ") and "stage.json" in err[0]
    assert not list(run_dir.rglob("*.tmp-*"))
    full["on"] = False
    assert main(["pilot", *args]) == 0
    assert (run_dir / "pilot" / "stage.json").is_file()


def test_a_real_full_disk_is_one_line_and_the_rerun_resumes(assets, finished, tmp_path):
    """The run directory on a 400 KiB tmpfs (a mount namespace of its own: `unshare`):
    the disk fills while the pilot saves a checkpoint (safetensors raises its own error
    type there, not OSError). One `t3s: error:` line, exit 1; with the tmpfs grown, the
    same command continues from the last checkpoint and ends with the results of a run
    that never failed."""
    import shutil as sh
    if sh.which("unshare") is None:
        pytest.skip("needs util-linux `unshare` to mount a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs "
                            f"{tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here "
                    f"({probe.stderr.decode().strip()}); the injected-ENOSPC tests cover it")
    mnt, run_dir, keep = tmp_path / "mnt", tmp_path / "mnt" / "run", tmp_path / "kept"
    mnt.mkdir()
    t3s_cmd = f"{sys.executable} -m t3s"
    # one thread, as the in-process `finished` run used: the sums then add in the same order
    args = " ".join(f"'{a}'" for a in [*settings(assets), "--run-dir", str(run_dir),
                                       "--threads", "1"])
    script = f"""set -u
mount -t tmpfs -o size=400k tmpfs {mnt}
{t3s_cmd} run {args} > {tmp_path}/out1.txt 2> {tmp_path}/err1.txt; echo $? > {tmp_path}/rc1
ls -A {run_dir} > {tmp_path}/left.txt
mount -o remount,size=64m {mnt}
{t3s_cmd} run --run-dir {run_dir} --no-progress --threads 1 > {tmp_path}/out2.txt 2>&1; echo $? > {tmp_path}/rc2
cp -r {run_dir} {keep}
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env, timeout=900)
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    err = read("err1.txt").strip().splitlines()
    assert read("rc1").strip() == "1", read("err1.txt")[-3000:]
    assert len(err) == 1 and err[0].startswith("t3s: error: no space left on the device "), err
    assert "MiB free there" in err[0] and "run the same command again" in err[0]
    assert "pilot" not in read("left.txt").split()       # nothing half-done was committed
    assert read("rc2").strip() == "0", read("out2.txt")[-3000:]
    assert "[pilot] continuing from its last checkpoint, checkpoint-2" in read("out2.txt")
    assert not list(keep.rglob("*.tmp-*"))
    for f in ("pilot/final/model.safetensors", "train/model/model.safetensors"):
        assert (keep / f).read_bytes() == (finished / f).read_bytes(), f
    m_keep = json.loads((keep / "report" / "metrics.json").read_text())
    m_fin = json.loads((finished / "report" / "metrics.json").read_text())
    for key in ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "bottleneck_step",
                "masked_fraction", "mask_agreement"):
        assert m_keep[key] == m_fin[key], key


def test_under_a_launcher_a_bad_input_stops_every_rank_with_one_line(tmp_path):
    """`torchrun --nproc_per_node 2 -m t3s run` without a model: rank 0 finds it, every
    rank exits with status 2, the message is printed once, and nothing is created."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "t3s", "run",
         "--run-dir", str(run_dir), "--device", "cpu"], capture_output=True, text=True, env=env,
        timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("t3s: error")]
    assert len(lines) == 1 and lines[0].startswith("t3s: error: no model given"), \
        proc.stderr[-3000:]
    assert not run_dir.exists()
    print(f"refused in {time.perf_counter() - t0:.1f} s")


def test_what_cannot_run_across_ranks_is_refused(monkeypatch):
    from t3s import dist
    from t3s.pipeline import commands
    from t3s.pipeline.settings import normalize_config
    cfg = normalize_config({"batch_size": 9})
    commands.check_launch(cfg)   # one process: nothing to refuse
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--batch-size 9 is the global batch.*multiple of 2"):
        commands.check_launch(cfg)
    with pytest.raises(UsageError, match="diffusion.*runs in one process.*WORLD_SIZE=2"):
        commands.check_launch(normalize_config({"batch_size": 8, "objective": "diffusion",
                                               "rule": "forced"}))
    assert commands.launch_notes(normalize_config({"device": "cpu"})) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    notes = commands.launch_notes(normalize_config({"device": "cpu"}))
    assert len(notes) == 1 and "asks for FSDP" in notes[0] and "DDP" in notes[0]


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_damaged_trajectory_stops_the_selection(finished, tmp_path, capsys, damage):
    """A deleted or bit-flipped pilot shard: `--redo select` refuses in one line (it used to
    set every Δc to 0 and mask nothing, silently turning T3S into plain SFT)."""
    run_dir = copy_run(finished, tmp_path / "run")
    shard = run_dir / "pilot" / "trajectory" / "traj-rank00000.arrow"
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x04
        shard.write_bytes(bytes(data))
    assert main(["run", "--run-dir", str(run_dir), "--redo", "select"]) == 2
    line = error_line(capsys)
    assert "the pilot's trajectory cannot be used" in line and "traj-rank00000.arrow" in line
    assert "--redo pilot" in line
    assert "select" not in ledger(run_dir)  # nothing downstream can use a zero Δc


def test_bad_jsonl_names_the_line(assets, tmp_path, capsys):
    lines = (assets / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"prompt": "1+1=", "response": '] + lines[2:]) + "\n")
    args = settings(assets)
    args[args.index("--train") + 1] = str(bad)
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "bad training data" in line and "line 3" in line and "invalid JSON" in line
    assert "Unterminated string starting at: column" in line or "Expecting value: column" in line
    # every bad line in one error (not only the first), still one line and status 2
    bad.write_text("\n".join(lines[:2] + ["{oops", lines[2], '{"prompt": "1+1=", "response": "2"}',
                                          '{"prompt": "1+1=", "response": "2'] + lines[3:]) + "\n")
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "3 bad lines" in line and "Traceback" not in line
    assert "line 3: invalid JSON" in line and "line 5: missing 'answer'" in line
    assert "line 6: invalid JSON (Unterminated string starting at: column" in line
    # a record without its answer
    bad.write_text(lines[0] + "\n" + '{"prompt": "1+1=", "response": "2"}\n')
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "line 2" in line and "answer" in line


def test_empty_dataset(assets, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    args = settings(assets)
    args[args.index("--heldout") + 1] = str(empty)
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    assert "held-out data" in (line := error_line(capsys)) and "holds no examples" in line
    args[args.index("--train") + 1] = str(empty)
    assert main(["run", *args, "--run-dir", str(tmp_path / "run")]) == 2
    assert "training data" in (line := error_line(capsys)) and "holds no examples" in line


def test_run_dir_from_a_different_config(finished, assets, tmp_path, capsys):
    config_before = (finished / "config.json").read_bytes()
    assert main(["run", *settings(assets), "--run-dir", str(finished), "--lr", "0.5"]) == 2
    line = error_line(capsys)
    assert "other settings" in line and "lr (0.01 -> 0.5)" in line and "--force" in line
    assert (finished / "config.json").read_bytes() == config_before
    # data with other contents is another config (paths do not matter, contents do)
    data = tmp_path / "train.jsonl"
    write_jsonl(data, arithmetic_records(24, seed=0)[1:17])
    args = settings(assets)
    args[args.index("--train") + 1] = str(data)
    assert main(["run", *args, "--run-dir", str(finished)]) == 2
    assert "train (contents differ)" in error_line(capsys)
    shutil.copy(assets / "train.jsonl", data)   # same contents elsewhere: the same run
    assert main(["run", *args, "--run-dir", str(finished), "--print-config"]) == 0
    capsys.readouterr()
    # a directory that is not a run directory is never used or deleted
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["run", *settings(assets), "--run-dir", str(other), *extra]) == 2
        assert "not a t3s run directory" in error_line(capsys)
    assert (other / "notes.txt").read_text() == "mine"


def test_force_keeps_the_stages_a_change_does_not_affect(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    before = run_ids(run_dir)
    assert main(["select", "--run-dir", str(run_dir), "--rule", "static", "--rule-param",
                 "fraction=0.3", "--force", "--no-progress"]) == 0
    after = run_ids(run_dir)
    assert after["pilot"] == before["pilot"] and after["select"] != before["select"]
    art = t3s.SelectionArtifact.load(run_dir / "select" / "selection.parquet")
    assert art.rule == "static" and art.params == {"fraction": 0.3}
    assert art.table["loss_mask"].mean() == pytest.approx(0.7, abs=0.01)
    # the stages that used the old mask are stale; the pilot is not
    status = engine.stage_status(
        rundir.RunDir(run_dir), json.loads((run_dir / "config.json").read_text())["config"],
        json.loads((run_dir / "config.json").read_text())["fingerprints"])
    assert status["pilot"][0] == before["pilot"]
    assert status["train"][0] is None and status["report"][0] is None


def test_extra_test_set_is_scored_and_reported(finished, assets, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    before = run_ids(run_dir)
    extra = tmp_path / "hard.jsonl"
    write_jsonl(extra, arithmetic_records(30, seed=5)[24:])
    assert main(["eval", "--run-dir", str(run_dir), "--extra-test", str(extra), "--force",
                 "--no-progress"]) == 0
    after = run_ids(run_dir)
    assert all(after[s] == before[s] for s in ("pilot", "select", "train", "baseline"))
    assert after["eval"] != before["eval"]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(results["sets"]) == ["heldout", "extra_test"]  # the headline set stays first
    assert results["sets"]["extra_test"]["n"] == 6
    for arm in ("base", "sft", "t3s", "baseline"):
        assert len((run_dir / "eval" / f"{arm}.extra_test.jsonl").read_text().splitlines()) == 6
    assert main(["report", "--run-dir", str(run_dir), "--no-progress"]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "(extra_test set, n=6)" in report and "hard.jsonl" in report
    assert "(heldout set, n=8, headline)" in report
    # a missing file is a clear error before anything runs
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run_dir), "--extra-test", str(tmp_path / "no.jsonl"),
                 "--force", "--no-progress"]) == 2
    assert "no.jsonl" in error_line(capsys)


def test_stage_needs_the_stages_before_it(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["select", *settings(assets), "--run-dir", str(run_dir)]) == 2
    assert "needs stage 'pilot'" in error_line(capsys)
    assert not run_dir.exists()


def test_rule_parameters_are_checked_before_training(assets, tmp_path, capsys):
    assert main(["run", *settings(assets), "--run-dir", str(tmp_path / "run"),
                 "--rule", "rho1"]) == 2
    assert "keep_fraction" in error_line(capsys)
    assert main(["run", *settings(assets), "--run-dir", str(tmp_path / "run"),
                 "--rule", "forced"]) == 2
    assert "diffusion" in error_line(capsys)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------

def test_demo_subcommand(monkeypatch, capsys):
    import types
    calls = []
    fake = types.ModuleType("t3s.demo")
    monkeypatch.setitem(sys.modules, "t3s.demo", fake)
    monkeypatch.setattr(t3s, "demo", fake, raising=False)
    assert main(["demo", "--quick"]) == 2
    assert "no main()" in error_line(capsys)
    fake.main = lambda quick, out, **kw: calls.append((quick, out, kw))
    assert main(["demo", "--quick", "--out", "somewhere"]) == 0
    assert main(["demo", "--out", "elsewhere", "--seed", "2"]) == 0
    # the options the demo's own messages name, with `t3s run`'s meaning
    assert main(["demo", "--redo", "train", "--redo", "all", "--overwrite", "--no-progress"]) == 0
    assert main(["demo", "--progress"]) == 0
    assert calls == [(True, "somewhere", {}), (False, "elsewhere", {"seed": 2}),
                     (False, None, {"redo": ["train", "all"], "overwrite": True,
                                    "progress": False}),
                     (False, None, {"progress": True})]
    assert main(["demo", "--redo", "nope"]) == 2


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-m", "t3s", "run", "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--trust-remote-code", "--dtype", "--grad-accum", "--eval-subset",
                 "--max-new-tokens", "--redo", "--config", "--force", "--overwrite"):
        assert flag in out.stdout, flag
    bad = subprocess.run([sys.executable, "-m", "t3s", "report", "--run-dir",
                          str(tmp_path / "nothing")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("t3s: error:") and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------
# Layout: imports point one way (library <- pipeline <- cli / demo), no cycles
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# The DFT baseline
# --------------------------------------------------------------------------------------

def test_dft_baseline_trains_every_token_with_token_scaling(assets, tmp_path, monkeypatch,
                                                           capsys):
    """`--baseline dft`: the baseline arm retrains from θ0 on every trace token with the
    kernels' token_scaling (DFT), and the report names it; diffusion refuses it."""
    import t3s.loss as t3s_loss

    seen = []
    original = t3s_loss.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("token_scaling"))
        return original(*args, **kwargs)

    monkeypatch.setattr(t3s_loss, "linear_cross_entropy", spy)
    args = [a for a in settings(assets)]
    args[args.index("--baseline") + 1] = "dft"
    run_dir = tmp_path / "run"
    assert main(["run", *args, "--steps", "2", "--eval-steps", "2", "--run-dir",
                 str(run_dir)]) == 0
    summary = json.loads((run_dir / "baseline" / "stage.json").read_text())["summary"]
    assert summary["loss_options"] == {"token_scaling": True}
    assert summary["kept_fraction"] == 1.0
    assert True in seen and False in seen  # the baseline scaled, the other arms did not
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["baseline_rule"] == "dft"
    report = (run_dir / "report" / "report.md").read_text()
    assert "DFT" in report and "stop-gradient probability" in report
    capsys.readouterr()
    assert main(["run", *args, "--objective", "diffusion", "--rule", "forced", "--run-dir",
                 str(tmp_path / "diffusion")]) != 0
    assert "baseline 'random'" in error_line(capsys)


def test_report_has_the_verifier_free_bottleneck(finished):
    """metrics.json: the step whose greedy answers agree least with θ0's, and the curve."""
    metrics = json.loads((finished / "report" / "metrics.json").read_text())
    agreement = metrics["pilot_answer_agreement"]
    assert agreement["0"] == 1.0 and len(agreement) >= 2
    step = metrics["verifier_free_bottleneck_step"]
    assert str(step) in agreement and step != 0
    assert agreement[str(step)] == min(v for k, v in agreement.items() if k != "0")
    assert "Without a verifier" in (finished / "report" / "report.md").read_text()
