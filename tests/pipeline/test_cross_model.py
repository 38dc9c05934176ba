"""Cross-model T3S: a selector's selection trains another student.

The library (`t3s.check_student`, `t3s.student_loss_masks`, `t3s.first_token_difference`)
on identical tokenizers, on a tokenizer that differs yet gives the same ids, and on BPE
tokenizers that differ in one merge; the command line (`t3s run --model SELECTOR
--student DIR`, and `--artifact` reusing a finished selection) end to end on tiny
models, its refusals before any directory is written, and a student's retraining
killed and resumed. The two-rank retraining is in tests/integration/test_cross_model_ranks.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

import t3s
from t3s.cli import main
from t3s.pipeline import stages as t3s_stages
from tiny import CHARS, SPECIAL, cli_error_line, make_tokenizer, tiny_llama, write_run_assets

pytestmark = pytest.mark.usefixtures("one_thread")

#: traces whose numbers the BPE tokenizers below merge ("12", "34")
RECORDS = [{"prompt": "5+6=", "response": "5+6=11;\\boxed{11}", "answer": "11"},
           {"prompt": "12+34=", "response": "12+34=46;\\boxed{46}", "answer": "46"},
           {"prompt": "3+4=", "response": "3+4=7;\\boxed{7}", "answer": "7"}]


def bpe_tokenizer(merges):
    """A BPE tokenizer over `CHARS` whose vocabulary holds "12" and "34"; only the
    ``merges`` given produce them."""
    vocab = {t: i for i, t in enumerate(list(SPECIAL) + list(CHARS) + ["12", "34"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def artifact_for(tok, examples, seed=0):
    """An anchor-rule artifact over ``examples`` with Δc drawn at random."""
    keys = t3s.TokenTable.from_examples(examples)
    delta = np.random.default_rng(seed).normal(size=len(keys)).astype(np.float32)
    return t3s.SelectionArtifact.create(keys.with_columns(delta=delta), examples=examples,
                                        tokenizer=tok, rule="anchor")


def traces(tok, records=RECORDS):
    return list(t3s.TraceDataset.from_jsonl(records, tok))


# -- the library ----------------------------------------------------------------------

def test_identical_tokenizers_give_the_artifact_masks():
    tok = make_tokenizer()
    ex = traces(tok)
    art = artifact_for(tok, ex)
    assert t3s.check_student(art, make_tokenizer(), ex) is None
    masks = t3s.student_loss_masks(art, make_tokenizer(), ex)
    expected = art.loss_masks(ex)
    assert masks.keys() == expected.keys()
    assert all(torch.equal(masks[k], expected[k]) for k in masks)
    assert 0 < sum(int(m.sum()) for m in masks.values()) < sum(m.numel() for m in masks.values())


def test_another_tokenizer_with_the_same_ids_goes_with_a_note():
    tok = make_tokenizer()
    other = make_tokenizer(chars=list(CHARS) + ["Ω"])     # one more token, unused by the data
    assert t3s.artifact.tokenizer_fingerprint(tok) != t3s.artifact.tokenizer_fingerprint(other)
    art = artifact_for(tok, traces(tok))
    note = t3s.check_student(art, other, traces(other))
    assert "same token ids for all 3 training examples" in note
    masks = t3s.student_loss_masks(art, other, traces(other))
    assert all(torch.equal(masks[k], v) for k, v in art.loss_masks(traces(tok)).items())


def test_a_tokenizer_one_merge_apart_is_refused_naming_example_and_position():
    selector = bpe_tokenizer([("1", "2"), ("3", "4")])
    student = bpe_tokenizer([("1", "2")])                 # the merge 3 4 is missing
    ex_sel, ex_stu = traces(selector), traces(student)
    art = artifact_for(selector, ex_sel)
    eid = int(ex_sel[1]["example_id"])
    ids = ex_sel[1]["input_ids"].tolist()
    pos = ids.index(selector.convert_tokens_to_ids("34"))   # the first token that splits
    with pytest.raises(ValueError, match=rf"example {eid}, token {pos}: selector id "
                                         rf"{ids[pos]}, student id {selector.convert_tokens_to_ids('3')}"):
        t3s.check_student(art, student, ex_stu, selector_examples=ex_sel)
    # without the selector's tokenization: the example, from the stored signature
    n_sel, n_stu = len(ex_sel[1]["input_ids"]), len(ex_stu[1]["input_ids"])
    with pytest.raises(ValueError, match=rf"example {eid}: {n_sel} tokens under the selector's "
                                         rf"tokenizer, {n_stu} under the student's"):
        t3s.student_loss_masks(art, student, ex_stu)
    # the examples before it are identical: example 0 holds no "34"
    assert t3s.first_token_difference(ex_sel[:1], ex_stu[:1]) is None


def test_first_token_difference_on_missing_examples_and_trained_flags():
    tok = make_tokenizer()
    ex = traces(tok)
    diff = t3s.first_token_difference(ex, ex[:2])
    assert diff["example_id"] == int(ex[2]["example_id"]) and diff["position"] is None
    assert "missing from the student's" in diff["why"]
    flipped = [dict(e) for e in ex]
    labels = flipped[0]["labels"].clone()
    first = int((labels != -100).nonzero()[0])
    labels[first] = -100
    flipped[0]["labels"] = labels
    diff = t3s.first_token_difference(ex, flipped)
    assert (diff["example_id"], diff["position"]) == (int(ex[0]["example_id"]), first)
    assert "trained on one side only" in diff["why"]


# -- the command line -----------------------------------------------------------------

def _args(root, run_dir, *extra):
    return ["run", "--train", str(root / "train.jsonl"), "--heldout", str(root / "heldout.jsonl"),
            "--run-dir", str(run_dir), "--steps", "4", "--eval-steps", "2", "--batch-size", "4",
            "--max-new-tokens", "8", "--baseline", "random", "--lr", "1e-3", "--device", "cpu",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A selector (``model``: the tiny Llama, hidden 32), a larger student (hidden 48,
    another seed) with the same tokenizer, the traces and held-out problems."""
    root = write_run_assets(tmp_path_factory.mktemp("xm"), n_train=16, n_heldout=8)
    tok = make_tokenizer()
    tiny_llama(tok, seed=1, hidden_size=48, intermediate_size=96).save_pretrained(
        root / "student")
    tok.save_pretrained(root / "student")
    return root


@pytest.fixture(scope="module")
def cross_run(assets):
    run_dir = assets / "cross"
    assert main(_args(assets, run_dir, "--model", str(assets / "model"),
                      "--student", str(assets / "student"))) == 0
    return run_dir


def _hidden(model_dir):
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def test_the_selector_pilots_and_the_student_is_retrained_and_scored(cross_run, assets):
    assert _hidden(cross_run / "pilot" / "final") == 32                     # the selector
    for model_dir in ("train/model", "baseline/model", "arms/sft/model"):
        assert _hidden(cross_run / model_dir) == 48, model_dir               # the student
    results = json.loads((cross_run / "eval" / "results.json").read_text())
    assert results["arms"]["base"]["model"] == str(assets / "student")
    assert results["arms"]["sft"]["model"].endswith("arms/sft/model")    # the student's SFT
    metrics = json.loads((cross_run / "report" / "metrics.json").read_text())
    assert (metrics["selector"], metrics["student"]) == ("model", "student")
    report = (cross_run / "report" / "report.md").read_text()
    assert "Selector (the pilot, Δc and the mask): `model`" in report
    assert "Student (θ0 of the base row, every retraining arm and the eval): `student`" in report


def test_a_reused_artifact_skips_the_pilot_and_gives_the_same_student(cross_run, assets, capsys):
    run_dir = assets / "reuse"
    capsys.readouterr()
    assert main(_args(assets, run_dir, "--student", str(assets / "student"),
                      "--artifact", str(cross_run))) == 0
    out = capsys.readouterr().out
    assert "[pilot]" not in out and "[select] reusing" in out
    assert not (run_dir / "pilot").exists()
    summary = json.loads((run_dir / "select" / "stage.json").read_text())["summary"]
    assert summary["artifact"].endswith("cross/select/selection.parquet")
    for name in ("selection.parquet", "baseline.parquet"):
        a, b = (pq.read_table(d / "select" / name) for d in (cross_run, run_dir))
        assert a.column("loss_mask").equals(b.column("loss_mask")), name
    for model in ("train/model/model.safetensors", "baseline/model/model.safetensors",
                  "arms/sft/model/model.safetensors"):
        assert (run_dir / model).read_bytes() == (cross_run / model).read_bytes(), model
    report = (run_dir / "report" / "report.md").read_text()
    assert "reused from `selection.parquet`" in report


def test_the_student_retraining_resumes_after_a_kill(cross_run, assets, tmp_path, monkeypatch,
                                                     capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(cross_run, run_dir)

    def killed(trainer, tok, path):
        raise RuntimeError("killed while saving the model")

    monkeypatch.setattr(t3s_stages, "_save_model", killed)
    with pytest.raises(RuntimeError, match="killed"):
        main(["run", "--run-dir", str(run_dir), "--redo", "train", "--no-progress"])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[train] continuing from its last checkpoint, checkpoint-4" in out
    assert "[pilot] already done" in out
    model = "train/model/model.safetensors"
    assert (run_dir / model).read_bytes() == (cross_run / model).read_bytes()


def _bad_student(root, name, chars):
    tok = make_tokenizer(chars=chars)
    tiny_llama(tok, seed=1).save_pretrained(root / name)
    tok.save_pretrained(root / name)
    return root / name


def test_a_student_with_other_token_ids_is_refused_before_any_directory(cross_run, assets,
                                                                        tmp_path, capsys):
    chars = list(CHARS)
    i, j = chars.index("1"), chars.index("2")
    chars[i], chars[j] = chars[j], chars[i]                  # "1" and "2" swap ids
    bad = _bad_student(tmp_path, "swapped", chars)
    for extra in (["--model", str(assets / "model")], ["--artifact", str(cross_run)]):
        run_dir = tmp_path / "refused"
        assert main(_args(assets, run_dir, "--student", str(bad), *extra)) == 2
        line = cli_error_line(capsys)
        assert "the student's tokenizer gives other tokens than the selector's" in line
        assert ", token " in line and "selector id" in line and "student id" in line, line
        assert not run_dir.exists()


def test_a_student_whose_tokenizer_differs_but_gives_the_same_ids_goes(assets, tmp_path,
                                                                      capsys):
    other = _bad_student(tmp_path, "extra", list(CHARS) + ["Ω"])
    run_dir = tmp_path / "extra_run"
    args = _args(assets, run_dir, "--model", str(assets / "model"), "--student", str(other))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("gives the same token ids for all 16 training examples") == 1


@pytest.mark.parametrize("extra, message", [
    (["--artifact", "ART"], "artifact needs student"),
    (["--student", "STU", "--artifact", "ART", "--rule", "inverse"],
     "its mask comes from rule 'anchor'"),
    (["--student", "STU", "--artifact", "ART", "--arms", "entropy"],
     "the comparison 'entropy' needs the column(s) delta_entropy"),
    (["--student", "STU", "--model", "MODEL", "--analyze"], "not supported with --student"),
    (["--student", "STU", "--artifact", "NOWHERE"], "--artifact NOWHERE does not exist"),
    (["--student", "STU", "--objective", "diffusion", "--rule", "forced"],
     "which is its student already"),
])
def test_bad_cross_model_settings_are_refused_in_one_line(cross_run, assets, tmp_path, capsys,
                                                         extra, message):
    names = {"ART": str(cross_run), "STU": str(assets / "student"),
             "MODEL": str(assets / "model"), "NOWHERE": str(tmp_path / "nowhere")}
    message = message.replace("NOWHERE", names["NOWHERE"])
    run_dir = tmp_path / "refused"
    assert main(_args(assets, run_dir, *[names.get(w, w) for w in extra])) == 2
    assert message in cli_error_line(capsys)
    assert not run_dir.exists()


def test_a_run_directory_as_artifact_names_its_selection_file(cross_run, assets):
    """The settings resolve ``--artifact RUN_DIR`` to the file the select stage writes, so
    that the file is what the run's identity fingerprints."""
    import os

    from t3s.pipeline import rundir
    from t3s.pipeline.settings import normalize_config
    from t3s.pipeline.settings.normalize import RUN_SELECTION
    assert RUN_SELECTION == os.path.join("select", rundir.SELECTION_FILE)
    cfg = normalize_config({"student": str(assets / "student"), "artifact": str(cross_run)})
    assert cfg["artifact"] == str(cross_run / "select" / rundir.SELECTION_FILE)
