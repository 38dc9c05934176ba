"""What the `t3s` command needs beyond the core package: a missing or too old piece of the
``hf`` extra (transformers, accelerate, tokenizers, math-verify) is one line naming the
extra, exit status 2 and nothing touched; and the run directory's lock (`filelock`)
refuses a second holder, in this process or another."""

import subprocess
import sys
from pathlib import Path

import pytest

from t3s.cli import main
from t3s.pipeline import commands
from t3s.pipeline.rundir import RunDir, RunDirError

ROOT = Path(__file__).resolve().parents[2]
DEMO_BASE = ROOT / "t3s" / "demo" / "assets" / "base"


def run_args(tmp_path, *extra):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2", "answer": "2"}\n')
    return ["run", "--model", str(DEMO_BASE), "--train", str(data), "--heldout", str(data),
            "--run-dir", str(tmp_path / "run"), "--no-progress", *extra]


def test_a_fresh_install_without_transformers_gets_one_line(tmp_path):
    """A process in which transformers was never importable: one line, no traceback."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from t3s.cli import main\n"
            f"sys.exit(main({run_args(tmp_path)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["t3s: error: transformers is not installed: the t3s command needs the hf "
                     "extra, pip install 't3s[hf]'"], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, name", [("accelerate", "accelerate"),
                                          ("tokenizers", "tokenizers"),
                                          ("math_verify", "math-verify")])
def test_each_missing_piece_is_named(module, name, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)
    assert main(run_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t3s: error: ")
    assert f"{name} is not installed" in err[0] and "pip install 't3s[hf]'" in err[0]
    assert not (tmp_path / "run").exists()
    if module == "math_verify":   # the exact verifier does not need it
        commands.check_extras("exact")
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    assert f"{name} is not installed" in capsys.readouterr().err


def test_an_old_transformers_is_named(tmp_path, monkeypatch, capsys):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda dist: "4.46.3" if dist == "transformers" else real(dist))
    assert main(run_args(tmp_path)) == 2
    assert capsys.readouterr().err.strip() == (
        "t3s: error: transformers 4.46.3 is older than t3s needs (4.56): "
        "pip install -U 't3s[hf]'")


def test_the_run_directory_lock_refuses_a_second_holder(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.locked():
        with pytest.raises(RunDirError, match="another t3s process"):
            with RunDir(tmp_path / "run").locked():
                pass
        code = ("import sys\nfrom t3s.pipeline.rundir import RunDir, RunDirError\n"
                f"try:\n    RunDir({str(tmp_path / 'run')!r}).locked().__enter__()\n"
                "except RunDirError:\n    sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 3, proc.stderr
    with run.locked():   # released: free again
        pass
