"""The demo's task, data files, tokenizer, shipped base student and evaluator."""

import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from t3s.data import TraceDataset, read_traces  # noqa: E402
from t3s.demo import model as demo_model  # noqa: E402
from t3s.demo import task  # noqa: E402
from t3s.demo import write_data  # noqa: E402
from t3s.demo.evaluate import Evaluator, max_new_tokens_for  # noqa: E402
from t3s.verify import get_verifier  # noqa: E402


# ------------------------------------------------------------------------------ task
def test_problem_styles():
    p = task.Problem((23, 45, 12))
    assert p.prompt == "23+45+12="
    assert p.answer == "80"
    assert p.direct_response() == "\\boxed{80}"
    assert p.steps_response() == "23+45=68;68+12=80;\\boxed{80}"
    assert p.teacher_response() == "23 + 45 = 68\n68 + 12 = 80\n\\boxed{80}"
    assert task.Problem((10, 99)).teacher_response() == "10 + 99 = 109\n\\boxed{109}"
    assert [p.response(s) for s in task.STYLES] == [
        p.steps_response(), p.teacher_response(), p.direct_response()]
    with pytest.raises(ValueError):
        p.response("other")
    with pytest.raises(ValueError):
        task.Problem((5,))


def test_generation_is_deterministic():
    for split in ("train", "held_out"):
        a = task.make_problems(50, 3, split, seed=7)
        assert a == task.make_problems(50, 3, split, seed=7)
        assert a != task.make_problems(50, 3, split, seed=8)
        assert len(set(a)) == 50
        assert all(p.n_terms == 3 and all(10 <= t <= 99 for t in p.terms) for p in a)
    s1 = task.iter_problems((2, 3), seed=3)
    s2 = task.iter_problems((2, 3), seed=3)
    assert [next(s1) for _ in range(100)] == [next(s2) for _ in range(100)]
    mixed = task.make_mixed_problems({2: 5, 3: 6, 4: 7}, seed=1)
    assert mixed == task.make_mixed_problems({2: 5, 3: 6, 4: 7}, seed=1)
    assert sorted(p.n_terms for p in mixed) == [2] * 5 + [3] * 6 + [4] * 7


def test_splits_are_disjoint():
    for k in (2, 3, 4):
        train = set(task.make_problems(300, k, "train", seed=0))
        held = set(task.make_problems(300, k, "held_out", seed=0))
        assert not train & held
        assert not any(task.is_held_out(p) for p in train)
        assert all(task.is_held_out(p) for p in held)
    stream = task.iter_problems((2, 3), "train", seed=0)
    assert not any(task.is_held_out(next(stream)) for _ in range(2000))
    # the held-out pool is about HELD_OUT_PERCENT of all problems
    rng = random.Random(0)
    frac = np.mean([task.is_held_out(task.Problem((rng.randint(10, 99), rng.randint(10, 99))))
                    for _ in range(4000)])
    assert abs(frac - task.HELD_OUT_PERCENT / 100) < 0.03
    with pytest.raises(ValueError):
        task.make_problems(10_000, 2, "held_out")


@pytest.mark.parametrize("style", task.STYLES)
def test_responses_verify(style):
    verify = get_verifier("math")
    for p in task.make_mixed_problems({2: 10, 3: 10, 4: 10}, seed=2):
        r = p.response(style)
        assert r.endswith("\\boxed{" + p.answer + "}")
        assert verify(r, p.answer)
        assert not verify(r, str(int(p.answer) + 1))


def test_jsonl_round_trip(tmp_path):
    probs = task.make_mixed_problems({2: 3, 4: 2}, seed=0)
    path = task.write_jsonl(tmp_path / "d" / "traces.jsonl", probs, "teacher")
    lines = open(path, encoding="utf-8").read().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == [p.prompt for p in probs]
    recs = read_traces(path)
    assert [r.response for r in recs] == [p.teacher_response() for p in probs]
    assert [r.answer for r in recs] == [p.answer for p in probs]
    assert [r.example_id for r in recs] == list(range(len(probs)))
    tok = demo_model.build_tokenizer()
    ds = TraceDataset.from_jsonl(path, tok)
    ex = ds[0]
    ids = ex["input_ids"].tolist()
    n = ex["prompt_length"]
    assert ids[0] == demo_model.BOS_ID and ids[-1] == demo_model.EOS_ID
    assert tok.decode(ids[1:n]) == probs[0].prompt
    assert tok.decode(ids[n:-1]) == probs[0].teacher_response()
    assert (ex["labels"][:n] == -100).all() and (ex["labels"][n:] == ex["input_ids"][n:]).all()


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trips_every_character():
    tok = demo_model.build_tokenizer()
    assert len(tok) == len(demo_model.VOCAB)
    for i, t in enumerate(demo_model.VOCAB):
        assert tok.convert_tokens_to_ids(t) == i
    for ch in demo_model.CHARS:
        ids = tok(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != demo_model.UNK_ID
        assert tok.decode(ids) == ch
    text = demo_model.CHARS + "\\boxed{123}" + demo_model.CHARS[::-1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("boxed")) == 1
    assert tok(text)["input_ids"] == [demo_model.BOS_ID] + ids
    assert tok.decode([demo_model.BOS_ID] + ids + [demo_model.EOS_ID], skip_special_tokens=True) == text
    assert tok("x", add_special_tokens=False)["input_ids"] == [demo_model.UNK_ID]
    rng = random.Random(0)
    pieces = list(demo_model.CHARS) + ["boxed", "box", "b", "xed"]
    for _ in range(200):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        assert demo_model.encode(s) == tok(s, add_special_tokens=False)["input_ids"]


def test_tokenizer_save_load(tmp_path):
    tok = demo_model.build_tokenizer()
    tok.save_pretrained(tmp_path)
    import transformers
    tok2 = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    s = "12+34=46;\\boxed{46}"
    assert tok2(s)["input_ids"] == tok(s)["input_ids"]
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (demo_model.BOS_ID, demo_model.EOS_ID,
                                                                        demo_model.PAD_ID)


# ------------------------------------------------------------------------------ model
def test_fresh_model_parameter_count():
    assert demo_model.count_parameters(demo_model.build_model()) == demo_model.PARAM_COUNT


def test_shipped_base_loads():
    base = demo_model.BASE_DIR
    assert demo_model.base_exists(base), "build it with: python scripts/build_demo_base.py"
    size = sum(f.stat().st_size for f in base.iterdir() if f.is_file())
    assert size < 10 * 2**20
    assert not list(base.glob("*.bin")) and not list(base.glob("*.pt"))  # safetensors only
    model, tok = demo_model.load_base()
    assert demo_model.count_parameters(model) == demo_model.PARAM_COUNT
    assert model.config.vocab_size == len(demo_model.VOCAB) == len(tok)
    info = demo_model.load_build_info()
    assert info["seed"] == 0 and info["parameters"] == demo_model.PARAM_COUNT
    # the base answers in its own step-by-step style, not in the teacher's layout
    p = task.make_problems(8, 2, "held_out", seed=0)
    gen = demo_model.greedy_generate(model, [tok(q.prompt)["input_ids"] for q in p],
                                     max_new_tokens=max_new_tokens_for(2, "steps"))
    outs = [tok.decode(g) for g in gen]
    assert sum(o == q.steps_response() for o, q in zip(outs, p)) >= 6, outs
    assert not any(" " in o or "\n" in o for o in outs), outs


def test_greedy_generate_is_the_argmax_of_every_step():
    """Batched ``generate`` (prompts of several lengths, batches of 2) against the plain
    definition: one prompt at a time, the whole sequence run again for each token, the
    argmax taken, stopping at EOS."""
    model, tok = demo_model.load_base()
    prompts = [tok(q.prompt)["input_ids"] for q in task.make_mixed_problems({2: 3, 4: 2}, "held_out")]
    ours = demo_model.greedy_generate(model, prompts, max_new_tokens=12, batch_size=2)
    for p, g in zip(prompts, ours):
        seq, ref = list(p), []
        with torch.no_grad():
            for _ in range(12):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == demo_model.EOS_ID:
                    break
                ref.append(nxt)
                seq.append(nxt)
        assert g == ref


# ------------------------------------------------------------------------------ demo data, evaluator
def test_write_data(tmp_path):
    sizes = dict(trace_counts={2: 5, 3: 4, 4: 3}, heldout_size=7, four_term_size=6)
    paths = write_data(tmp_path / "a", **sizes)
    again = write_data(tmp_path / "b", **sizes)
    for key in ("train", "heldout", "extra_test"):
        assert open(paths[key], "rb").read() == open(again[key], "rb").read()  # deterministic
    recs = {k: [json.loads(x) for x in open(p, encoding="utf-8")] for k, p in paths.items()}
    assert sorted(r["n_terms"] for r in recs["train"]) == [2] * 5 + [3] * 4 + [4] * 3
    assert sorted(r["n_terms"] for r in recs["heldout"]) == [2] * 3 + [3] * 4
    assert [r["n_terms"] for r in recs["extra_test"]] == [4] * 6
    train = {r["prompt"] for r in recs["train"]}
    assert not train & {r["prompt"] for r in recs["heldout"] + recs["extra_test"]}
    # the traces are in the teacher's layout: one spaced step per line
    assert all(r["response"].count(" = ") == r["response"].count("\n") == r["n_terms"] - 1
               for r in recs["train"])


def test_evaluator_on_base():
    model, tok = demo_model.load_base()
    sets = {"two": task.make_problems(6, 2, "held_out"), "four": task.make_problems(4, 4, "held_out")}
    ev = Evaluator(tok, sets, batch_size=4)
    accs = ev(model)
    assert set(accs) == {"two", "four"} and all(0.0 <= a <= 1.0 for a in accs.values())
    assert len(ev.last_details["four"]) == 4
    assert max_new_tokens_for(4) >= len(demo_model.encode(task.Problem((99,) * 4).teacher_response())) + 1


def test_the_large_sibling_builds_with_the_same_tokenizer(tmp_path):
    """`scripts/build_demo_base.py --size large`: the demo student's sibling for
    cross-model selection, about 4x its parameters, with the same tokenizer (the run is a
    2-step smoke build)."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from t3s.artifact import tokenizer_fingerprint
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "large"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "build_demo_base.py"),
                           "--size", "large", "--steps", "2", "--batch-size", "4",
                           "--eval-every", "0", "--eval-size", "2", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "build_info.json").read_text())
    base = demo_model.count_parameters(demo_model.build_model(0))
    assert info["size"] == "large" and 3.0 <= info["parameters"] / base <= 4.5
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 256
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(out)) == tokenizer_fingerprint(
        demo_model.build_tokenizer())
