"""`t3s run --objective diffusion`: the AR selector's pilot and forced set, diffusion SFT of a
tiny bidirectional model, a same-size random forced set, evaluation by iterative unmasking,
resuming, and the errors a user can fix. Nothing is downloaded."""

import json

import pytest

from tiny import (MASK, SPECIAL, arithmetic_records, diffusion_tokenizer, make_tokenizer,
                  tiny_bert, tiny_llama, write_jsonl)

from t3s.cli import main
from t3s.pipeline import rundir


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dassets")
    tok = diffusion_tokenizer()
    tiny_llama(tok, seed=0).save_pretrained(root / "selector")
    tok.save_pretrained(root / "selector")
    tiny_bert(tok, seed=0, max_position_embeddings=128).save_pretrained(root / "dlm")
    tok.save_pretrained(root / "dlm")
    other = make_tokenizer(special=SPECIAL + [MASK], chars=list("0123456789+=;\\{}boxed "))
    other.mask_token = MASK
    tiny_bert(other, seed=0, max_position_embeddings=128).save_pretrained(root / "other_dlm")
    other.save_pretrained(root / "other_dlm")
    records = arithmetic_records(20, seed=1)
    write_jsonl(root / "train.jsonl", records[:12])
    write_jsonl(root / "heldout.jsonl", records[12:])
    return root


def flags(assets, run_dir, **over):
    f = {"--model": assets / "selector", "--diffusion-model": assets / "dlm",
         "--train": assets / "train.jsonl", "--heldout": assets / "heldout.jsonl",
         "--objective": "diffusion", "--rule": "forced", "--baseline": "random",
         "--steps": 2, "--eval-steps": 2, "--eval-subset": 4, "--batch-size": 6,
         "--max-new-tokens": 8, "--block-length": 4, "--lr": 1e-2, "--run-dir": run_dir}
    f.update(over)
    out = []
    for k, v in f.items():
        out += [k, str(v)]
    return out + ["--no-progress", "--no-agreement", "--rule-param", "tau=0.0"]


def test_diffusion_run_end_to_end_and_resume(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", *flags(assets, run_dir)]) == 0
    out = capsys.readouterr().out
    assert "diffusion SFT" in out and "random forced set" in out
    train = json.loads((run_dir / "train" / rundir.RECORD_FILE).read_text())["summary"]
    base = json.loads((run_dir / "baseline" / rundir.RECORD_FILE).read_text())["summary"]
    assert train["objective"] == "diffusion" and 0 < train["forced_fraction"] < 1
    assert base["forced_fraction"] == pytest.approx(train["forced_fraction"])
    assert train["logged_forced_fraction"] is not None
    results = json.loads((run_dir / "eval" / rundir.RESULTS_FILE).read_text())
    assert set(results["arms"]) == {"base", "t3s", "baseline"}
    assert results["objective"] == "diffusion" and results["generation"]["gen_length"] == 8
    metrics = json.loads((run_dir / "report" / rundir.METRICS_FILE).read_text())
    assert list(metrics)[:5] == ["base_acc", "sft_acc", "t3s_acc", "baseline_acc", "forced_fraction"]
    for k in ("base_acc", "t3s_acc", "baseline_acc"):
        assert metrics[k] == results["arms"][k[:-4]]["accuracy"]
    assert metrics["sft_acc"] is None          # no --sft-model given
    assert metrics["forced_fraction"] == pytest.approx(train["forced_fraction"])
    assert (run_dir / "report" / rundir.SHOCK_FIGURE).read_bytes()[:4] == b"\x89PNG"
    assert "T3S for a diffusion LM" in (run_dir / "report" / rundir.REPORT_FILE).read_text()
    assert (run_dir / "train" / rundir.MODEL_DIR / "model.safetensors").is_file()
    # resuming does nothing; eval alone can be run again on the same directory
    assert main(["run", *flags(assets, run_dir)]) == 0
    assert "diffusion SFT" not in capsys.readouterr().out
    assert main(["eval", *flags(assets, run_dir), "--redo", "eval"]) == 0
    assert "diffusion t3s" in capsys.readouterr().out
    # a plain diffusion-SFT model scored as arm 'sft' (here: the T3S model, for speed)
    sft = str(run_dir / "train" / rundir.MODEL_DIR)
    assert main(["run", *flags(assets, run_dir, **{"--sft-model": sft}), "--force"]) == 0
    out = capsys.readouterr().out
    assert "diffusion sft" in out and "diffusion SFT" not in out   # only eval and report reran
    metrics = json.loads((run_dir / "report" / rundir.METRICS_FILE).read_text())
    assert metrics["sft_acc"] == metrics["t3s_acc"]


def test_diffusion_settings_errors(assets, tmp_path, capsys):
    run_dir = tmp_path / "bad"
    assert main(["run", *flags(assets, run_dir, **{"--rule": "anchor"})]) == 2
    assert "rule 'forced'" in capsys.readouterr().err
    assert main(["run", *flags(assets, run_dir, **{"--rule": "none"})]) == 2
    assert "baseline 'random'" in capsys.readouterr().err


def test_a_diffusion_model_with_another_tokenizer_is_refused(assets, tmp_path, capsys):
    run_dir = tmp_path / "other"
    assert main(["run", *flags(assets, run_dir, **{"--diffusion-model": assets / "other_dlm",
                                                   "--steps": 1, "--eval-steps": 1})]) == 2
    err = capsys.readouterr().err
    assert "do not share a tokenizer" in err and err.count("\n") == 1
