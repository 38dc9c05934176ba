"""The diffusion demo: its shipped student shares the AR student's tokenizer and answers
the task, and `t3s demo --diffusion --quick` end to end (once per test run)."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from t3s import dllm
from t3s.artifact import tokenizer_fingerprint
from t3s.demo import model as demo_model
from t3s.demo import task
from t3s.dllm import demo as diffusion
from t3s.dllm import demo_model as dlm
from t3s.verify import get_verifier

ROOT = Path(__file__).resolve().parents[2]
QUICK_BUDGET_S = 60   # the budget for --diffusion --quick on 2 CPU cores: reported, never asserted


def test_the_diffusion_student_is_bidirectional_and_shares_the_selector_tokenizer():
    if not dlm.dlm_exists():
        pytest.skip("the diffusion student is not built (scripts/build_demo_diffusion_base.py)")
    model, tok = dlm.load_dlm()
    _, ar_tok = demo_model.load_base()
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(ar_tok)
    adapter = dllm.MaskedLMAdapter(model, tokenizer=tok)   # probes bidirectional attention
    assert adapter.mask_token_id == dlm.MASK_ID == len(demo_model.VOCAB)
    prompt = list(tok("23+45=")["input_ids"])
    (gen,) = dllm.diffusion_generate(adapter, [prompt], gen_length=24, steps=24,
                                     block_length=dlm.DLM_BLOCK_LENGTH,
                                     eos_token_id=tok.eos_token_id)
    assert len(gen) <= 24 and dlm.MASK_ID not in gen


def test_the_shipped_diffusion_student_answers_held_out_sums():
    """θ0 is a competent student by iterative unmasking, as its build_info says."""
    if not dlm.dlm_exists():
        pytest.skip("the diffusion student is not built (scripts/build_demo_diffusion_base.py)")
    info = dlm.load_dlm_build_info()
    assert min(info["heldout_accuracy"][k] for k in ("heldout2", "heldout3")) >= 0.9, info
    model, tok = dlm.load_dlm()
    adapter = dllm.MaskedLMAdapter(model, tokenizer=tok)
    seed = int.from_bytes(os.urandom(2), "little")       # other held-out sums than the build's
    problems = task.make_problems(16, 2, "held_out", seed=seed) + \
        task.make_problems(16, 3, "held_out", seed=seed)
    gens = dllm.diffusion_generate(adapter, [list(tok(p.prompt)["input_ids"]) for p in problems],
                                   gen_length=32, steps=32, block_length=dlm.DLM_BLOCK_LENGTH,
                                   eos_token_id=tok.eos_token_id)
    preds = [tok.decode(g, skip_special_tokens=True) for g in gens]
    verify = get_verifier("math")
    correct = [bool(verify(pred, p.answer)) for p, pred in zip(problems, preds)]
    assert sum(correct) >= 0.75 * len(problems), (seed, list(zip(preds, correct)))


def test_a_fresh_diffusion_student_has_the_documented_shape():
    m = dlm.build_dlm(0)
    assert m.config.vocab_size == len(demo_model.VOCAB) + 1
    assert m.config.mask_token_id == dlm.MASK_ID
    assert not m.config.is_decoder
    dllm.MaskedLMAdapter(m, mask_token_id=dlm.MASK_ID)       # probes bidirectional attention


@pytest.fixture(scope="session")
def quick_diffusion_demo(tmp_path_factory):
    """One `python -m t3s demo --diffusion --quick` for the whole test run, its output
    captured: (directory, exit status, seconds, the output)."""
    if not dlm.dlm_exists():
        pytest.skip("the diffusion student is not built")
    out = tmp_path_factory.mktemp("ddemo") / "quick"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "t3s", "demo", "--diffusion", "--quick", "--out",
                           str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          cwd=ROOT, timeout=1200)
    return out, proc.returncode, time.perf_counter() - t, proc.stdout.decode("utf-8", "replace")


def test_quick_diffusion_demo_end_to_end(quick_diffusion_demo):
    out, rc, seconds, log = quick_diffusion_demo
    assert rc == 0, log[-3000:]
    if seconds > QUICK_BUDGET_S:   # speed is not a pass/fail matter on a shared machine
        warnings.warn(f"t3s demo --diffusion --quick took {seconds:.0f} s, over its "
                      f"{QUICK_BUDGET_S} s budget")
    assert "\r" not in log and "%|" not in log            # no progress bars in a captured log
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert list(metrics)[:5] == ["base_acc", "sft_acc", "t3s_acc", "baseline_acc", "forced_fraction"]
    results = json.loads((out / "eval" / "results.json").read_text())
    n = results["n"]
    assert n == diffusion.QUICK_DIFFUSION_SIZES["heldout_size"]
    for arm in ("base", "sft", "t3s", "baseline"):
        acc = metrics[f"{arm}_acc"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, arm
        # the headline numbers are the eval stage's, recomputed from its predictions
        rows = [json.loads(line) for line in (out / "eval" / f"{arm}.jsonl").read_text().splitlines()]
        assert len(rows) == n and metrics["n_test"][arm] == n
        assert acc == pytest.approx(sum(r["correct"] for r in rows) / n), arm
        assert 0.0 <= metrics["accuracy_by_set"]["extra_test"][arm] <= 1.0
    assert metrics["base_acc"] == pytest.approx(results["arms"]["base"]["accuracy"])
    ff = metrics["forced_fraction"]
    assert isinstance(ff, float) and 0.0 < ff < 1.0
    assert metrics["baseline_forced_fraction"] == pytest.approx(ff)
    assert 0.0 < metrics["logged_forced_fraction"] < 1.0   # the trainer's log, per batch
    # metrics.json names models relative to the run directory, or to the package for the
    # shipped ones: never by the machine's absolute path
    assert metrics["sft_model"] == "plain/train/model"
    assert metrics["diffusion_model"] == "t3s/demo/assets/diffusion_base"
    assert metrics["selector"] == "t3s/demo/assets/base"
    assert (out / "plain" / "train" / "model" / "model.safetensors").is_file()
    assert (out / "report" / "shock.png").stat().st_size > 0
    report = (out / "report" / "report.md").read_text()
    assert f"{metrics['t3s_acc']:.3f}" in report and "shock.png" in report


def test_quick_diffusion_demo_resumes(quick_diffusion_demo, capsys):
    from t3s.cli import main
    out, rc, _, log = quick_diffusion_demo
    assert rc == 0, log[-3000:]
    n = torch.get_num_threads()
    try:
        assert main(["demo", "--diffusion", "--quick", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    assert "nothing to do" in capsys.readouterr().out


def test_the_demo_says_how_to_build_a_missing_student(tmp_path, monkeypatch, capsys):
    from t3s.cli import main
    from t3s.dllm import demo as diffusion
    monkeypatch.setattr(diffusion, "dlm_exists", lambda *a, **k: False)
    assert main(["demo", "--diffusion", "--quick", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "build_demo_diffusion_base.py" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
