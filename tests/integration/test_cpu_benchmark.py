"""The CPU comparison script (`benchmarks/cpu_compare.py`) runs end to end at a tiny shape.

A smoke test, not a measurement: each row is a subprocess, as in a real run, and the
results it prints must agree (t3s's loss and log-probs with torch eager's, on the same
inputs). No timing is asserted.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "cpu_compare.py")


def test_cpu_compare_runs_at_a_tiny_shape(tmp_path):
    out = tmp_path / "rows.json"
    md = tmp_path / "RESULTS.md"
    cmd = [sys.executable, SCRIPT, "--n", "48", "--h", "24", "--v", "301", "--dtypes", "bf16",
           "--rounds", "1", "--reps", "1", "--threads", "1", "--temperature", "0.7",
           "--impls", "torch_eager,t3s",   # one peer and t3s: each row is a subprocess
           "--json", str(out), "--results", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "flags:" in data["head"] and "V=301, temperature 0.7" in data["head"]
    rows = {(r["task"], r["impl"]): r for r in data["rows"]}
    assert set(rows) == {(task, impl) for task in ("loss", "logprobs")
                         for impl in ("torch_eager", "t3s")}
    for task in ("loss", "logprobs"):
        eager, t3s = rows[task, "torch_eager"], rows[task, "t3s"]
        assert "seconds" in eager and "seconds" in t3s, (eager, t3s)
        assert t3s["value"] == pytest.approx(eager["value"], rel=2e-2)
        assert t3s["extra_mib"] >= 0 and t3s["peak_gib"] > 0
    text = md.read_text()
    assert "time / fastest peer" in text and "| t3s |" in text and "Fastest peer:" in text


def test_cpu_compare_sweep_and_bad_arguments(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, SCRIPT, "--sweep", "n=16,40", "--sweep", "mask_frac=0.25,0.75",
           "--h", "8", "--v", "33", "--dtypes", "fp32", "--tasks", "loss", "--rounds", "1",
           "--impls", "t3s", "--class-weight",
           "--reps", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    points = {(r["n"], r["mask_frac"]) for r in rows if r["impl"] == "t3s" and "seconds" in r}
    assert points == {(16, 0.25), (16, 0.75), (40, 0.25), (40, 0.75)}
    assert "| n | mask_frac | t3s s (loss, fp32) |" in proc.stdout
    for bad in (["--sweep", "q=1,2"], ["--dtypes", "fp64"], ["--tasks", "train"],
                ["--mask-frac", "1.0"], ["--impls", "nope"], ["--temperature", "0"]):
        proc = subprocess.run([sys.executable, SCRIPT, *bad], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == 2 and "error:" in proc.stderr, (bad, proc.stderr[-500:])


TRL_SFT = os.path.join(REPO, "benchmarks", "trl_sft.py")


def test_trl_sft_benchmark_runs_at_a_tiny_size(tmp_path):
    """`benchmarks/trl_sft.py`: a plain trl.SFTTrainer, patched and unpatched, one
    subprocess each; the table has both rows, the same training loss, and says which head
    ran (the script itself fails when t3s's kernels did not run in the patched row)."""
    md = tmp_path / "RESULTS.md"
    out = tmp_path / "rows.json"
    cmd = [sys.executable, TRL_SFT, "--layers", "1", "--vocab", "512", "--steps", "1",
           "--warmup", "1", "--rounds", "1", "--batch", "2", "--max-length", "64",
           "--prompt-len", "8,24", "--completion-len", "8,40", "--threads", "1",
           "--results", str(md), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = "| trl.SFTTrainer (fp32) | steps/s | tokens/s | extra peak MiB |"
    text = md.read_text()
    assert "## CPU: trl.SFTTrainer with and without t3s.patch" in text and "trl 1." in text
    for source in (proc.stdout, text):
        lines = source[source.index(head):].splitlines()
        rows = {}
        for line in lines[2:5]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
        assert set(rows) == {"SFTTrainer", "SFTTrainer + t3s.patch", "patched / unpatched"}
        plain, patched = rows["SFTTrainer"], rows["SFTTrainer + t3s.patch"]
        for cells in (plain, patched):
            steps, tokens, extra, step, peak, loss = map(float, cells[1:7])
            assert steps > 0 and tokens > 0 and peak > 0 and loss > 0
        assert float(patched[6]) == pytest.approx(float(plain[6]), rel=1e-3)  # same training
        # 'cpp' where the C++ kernels build (the torch reference without a compiler)
        assert patched[7].startswith("t3s (") and patched[7].endswith(") x2"), patched[7]
        assert plain[7] == "TRL chunked x2"
        assert float(rows["patched / unpatched"][1]) > 0
    records = json.loads(out.read_text())["rows"]
    assert sorted(r["impl"] for r in records) == ["patched", "unpatched"]
    assert all(r["tokens"] > 0 and len(r["step_seconds"]) == 1 for r in records)
    for bad in (["--dtype", "fp64"], ["--prompt-len", "8,600"], ["--steps", "0"],
                ["--completion-len", "9,3"]):
        proc = subprocess.run([sys.executable, TRL_SFT, *bad], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == 2 and "error:" in proc.stderr, (bad, proc.stderr[-500:])
