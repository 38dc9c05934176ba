"""The diffusion demo: its shipped student shares the AR student's tokenizer, and
`t3s demo --diffusion --quick` end to end (slow: several minutes on 2 cores)."""

import json

import pytest
import torch

from t3s import dllm
from t3s.artifact import tokenizer_fingerprint
from t3s.demo import dlm, model as demo_model


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


def test_a_fresh_diffusion_student_has_the_documented_shape():
    m = dlm.build_dlm(0)
    assert m.config.vocab_size == len(demo_model.VOCAB) + 1
    assert m.config.mask_token_id == dlm.MASK_ID
    assert not m.config.is_decoder


@pytest.mark.slow
def test_quick_diffusion_demo_end_to_end(tmp_path, capsys):
    from t3s.cli import main
    if not dlm.dlm_exists():
        pytest.skip("the diffusion student is not built")
    out = tmp_path / "dq"
    n = torch.get_num_threads()
    try:
        assert main(["demo", "--diffusion", "--quick", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert list(metrics)[:5] == ["base_acc", "sft_acc", "t3s_acc", "baseline_acc", "forced_fraction"]
    for k in ("base_acc", "sft_acc", "t3s_acc", "baseline_acc"):
        assert 0.0 <= metrics[k] <= 1.0
    assert 0.0 < metrics["forced_fraction"] < 1.0
    assert metrics["baseline_forced_fraction"] == pytest.approx(metrics["forced_fraction"])
    assert (out / "report" / "shock.png").is_file()
    assert (out / "plain" / "train" / "model" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["demo", "--diffusion", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_the_demo_says_how_to_build_a_missing_student(tmp_path, monkeypatch, capsys):
    from t3s.cli import main
    from t3s.demo import diffusion
    monkeypatch.setattr(diffusion, "dlm_exists", lambda *a, **k: False)
    assert main(["demo", "--diffusion", "--quick", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "build_demo_diffusion_base.py" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
