"""Bottleneck search, checkpoint retention, training accuracy and verifiers."""

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from t3s.bottleneck import BottleneckTracker, find_bottleneck, select_subset, training_accuracy
from t3s.data import TraceDataset
from t3s.verify import exact_match, extract_boxed, extract_final_answer, get_verifier, math_verify_match
from tiny import make_tokenizer

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list("0123456789+=;# ")


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


# -------------------------------------------------------------------------------------
# find_bottleneck
# -------------------------------------------------------------------------------------

def test_find_bottleneck_argmin_and_ties():
    assert find_bottleneck({0: 0.9, 10: 0.4, 20: 0.1, 30: 0.3}) == 20
    # ties go to the earliest step, whatever the dict order
    assert find_bottleneck({40: 0.2, 10: 0.5, 30: 0.2, 20: 0.2, 50: 0.6}) == 20
    assert find_bottleneck({5: 0.0}) == 5


def test_find_bottleneck_random(rng):
    steps = rng.choice(1000, 30, replace=False)
    accs = rng.integers(0, 6, 30) / 5             # many ties
    hist = {int(s): float(a) for s, a in zip(steps, accs)}
    lo = min(hist.values())
    assert find_bottleneck(hist, exclude_initial=False) == min(s for s, a in hist.items() if a == lo)


def test_find_bottleneck_excludes_theta0_by_default():
    hist = {0: 0.1, 10: 0.4, 20: 0.3, 30: 0.5}     # θ0 is the lowest
    assert find_bottleneck(hist) == 20             # step 0 is θ0: Δc ≡ 0, never the bottleneck
    assert find_bottleneck(hist, exclude_initial=True) == 20
    assert find_bottleneck(hist, exclude_initial=False) == 0
    assert find_bottleneck({10: 0.4, 20: 0.4}) == 10   # no θ0 entry: nothing left out
    with pytest.raises(ValueError, match="only step 0"):
        find_bottleneck({0: 0.5})
    assert find_bottleneck({0: 0.5}, exclude_initial=False) == 0
    with pytest.raises(ValueError, match="NaN"):   # θ0's entry is still validated
        find_bottleneck({0: float("nan"), 1: 0.5})


def test_find_bottleneck_errors():
    with pytest.raises(ValueError, match="empty"):
        find_bottleneck({})
    with pytest.raises(ValueError, match="step 3: accuracy is NaN"):
        find_bottleneck({1: 0.5, 3: float("nan")})
    with pytest.raises(ValueError, match="not a number"):
        find_bottleneck({1: "high"})


# -------------------------------------------------------------------------------------
# tracker
# -------------------------------------------------------------------------------------

def test_online_detection():
    t = BottleneckTracker(recover_margin=0.1, patience=2)
    seq = [(0, 0.9), (5, 0.5), (10, 0.2), (15, 0.25), (20, 0.31), (25, 0.2), (30, 0.35), (35, 0.4)]
    done_at = None
    for step, acc in seq:
        t.update(step, acc)
        if t.done and done_at is None:
            done_at = step
    # 15 is not recovered (< 0.3); 20 is, then 25 breaks the run; 30, 35 are two in a row
    assert done_at == 35 and t.declared_at == 35
    assert t.bottleneck == 10                      # 25 ties with 10; the earliest wins
    t.update(40, 0.0)                              # after done: still recorded, done stays
    assert t.done and t.bottleneck == 40


def test_detection_resets_on_new_minimum():
    t = BottleneckTracker(recover_margin=0.05, patience=2, exclude_initial=False)
    for step, acc in [(0, 0.5), (1, 0.6), (2, 0.1), (3, 0.2)]:
        t.update(step, acc)
    assert not t.done                              # 1 recovered, but 2 is a new minimum
    t.update(4, 0.16)
    assert t.done and t.bottleneck == 2


def test_retention():
    t = BottleneckTracker(margin=0.05, exclude_initial=False)
    t.update(0, 0.8)
    assert t.should_keep_checkpoint(0)
    t.update(1, 0.5)
    assert t.pop_deletable() == [0] and not t.should_keep_checkpoint(0)
    t.update(2, 0.53)                              # within the margin: kept
    assert t.should_keep_checkpoint(2) and t.pop_deletable() == []
    t.update(3, 0.3)
    assert t.pop_deletable() == [1, 2]
    assert t.pop_deletable() == []
    assert t.kept() == [3] and t.deletable() == [0, 1, 2]
    assert t.should_keep_checkpoint(99, 0.34) and not t.should_keep_checkpoint(99, 0.36)
    assert 99 not in t.history
    with pytest.raises(ValueError, match="not recorded"):
        t.should_keep_checkpoint(7)
    with pytest.raises(ValueError, match="not after"):
        t.update(3, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        t.update(9, float("nan"))


def test_retention_excluding_theta0():
    t = BottleneckTracker(margin=0.05)             # exclude_initial=True: find_bottleneck's default
    assert not t.update(0, 0.1)                    # θ0: recorded, but no candidate
    assert t.history == {0: 0.1} and t.bottleneck is None and not t.should_keep_checkpoint(0)
    assert t.update(1, 0.5) and t.bottleneck == 1  # 0.5 > θ0's 0.1, still the minimum
    t.update(2, 0.53)
    assert t.kept() == [1, 2] and t.deletable() == [0]
    t.update(3, 0.9)
    t.update(4, 0.9)
    assert t.done and t.declared_at == 4           # recovered twice after the minimum at 1
    t.reset()
    assert t.history == {} and t.bottleneck is None and not t.done and t.exclude_initial


def test_checkpoints_to_delete():
    t = BottleneckTracker(margin=0.05, exclude_initial=False)
    for step, acc in [(0, 0.8), (2, 0.5), (4, 0.53), (6, 0.7)]:
        t.update(step, acc)
    saved = [2, 3, 4, 6, 8]                        # 3 and 8 were never evaluated
    assert t.checkpoints_to_delete(saved) == [3, 6]             # 8 is the latest: kept
    assert t.checkpoints_to_delete(saved, keep_latest=False) == [3, 6, 8]
    assert t.checkpoints_to_delete([]) == []
    for s in saved[:-1]:                           # the same rule as should_keep_checkpoint
        assert (s in t.checkpoints_to_delete(saved)) == \
            (s not in t.history or not t.should_keep_checkpoint(s))


@pytest.mark.parametrize("exclude_initial", [False, True])
def test_tracker_matches_offline(rng, exclude_initial):
    margin = float(rng.uniform(0, 0.2))
    t = BottleneckTracker(margin=margin, recover_margin=0.1, patience=3,
                          exclude_initial=exclude_initial)
    hist, deleted = {}, set()
    for step in range(0, 400, 10):
        acc = float(rng.integers(0, 11) / 10)
        t.update(step, acc)
        hist[step] = acc
        deleted.update(t.pop_deletable())
        candidates = {s: a for s, a in hist.items() if not (exclude_initial and s == 0)}
        if not candidates:                          # only θ0 so far, and it is excluded
            assert t.bottleneck is None and deleted == {0}
            continue
        assert t.bottleneck == find_bottleneck(hist, exclude_initial=exclude_initial)
        assert t.bottleneck not in deleted         # the argmin is never deleted
        lo = min(candidates.values())
        assert deleted == {s for s, a in hist.items() if a > lo + margin or s not in candidates}


# -------------------------------------------------------------------------------------
# verifiers
# -------------------------------------------------------------------------------------

def test_verifiers():
    assert extract_boxed(r"x \boxed{\frac{1}{2}} then \boxed{3}") == "3"
    assert extract_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed("none") is None
    assert extract_final_answer("23+45=68;68+12=80;#80") == "80"
    assert extract_final_answer("work\n#### 1,000\n") == "1,000"
    assert extract_final_answer("so the answer is 42.") == "42."
    assert exact_match("The answer is 1,000.", "1000")
    assert exact_match(r"\boxed{ 7 }", "7") and not exact_match(r"\boxed{8}", "7")
    assert math_verify_match(r"so \boxed{0.5}", r"\frac12")
    assert math_verify_match("23+45=68;68+12=80;#80", "80")
    assert not math_verify_match(r"\boxed{81}", "80")
    # a generation cut off before its answer states none: not correct by evaluation
    assert not math_verify_match("31 + 14 = ", "45")
    assert not math_verify_match("12+7=19;\n31 + 14 =", "45")
    assert math_verify_match("31 + 14 = 45", "45") and math_verify_match("The answer is 45.", "45")
    assert get_verifier("exact") is exact_match
    f = lambda p, g: True  # noqa: E731
    assert get_verifier(f) is f
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("fuzzy")


# -------------------------------------------------------------------------------------
# training accuracy
# -------------------------------------------------------------------------------------

def dataset(tok, rng, n):
    recs = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        recs.append({"prompt": f"{i};{a}+{b}", "response": f"{a}+{b}={a + b};#{a + b}", "answer": str(a + b)})
    return TraceDataset.from_jsonl(recs, tok)


class FakeModel:
    """generate() appends known tokens per prompt; records the calls."""

    def __init__(self, tok, outputs):
        self.tok, self.outputs, self.calls, self.training = tok, outputs, [], True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append(kw)
        assert not self.training
        rows = []
        for ids, am in zip(input_ids, attention_mask):
            assert am[-1] == 1                     # left-padded
            prompt = tuple(ids[am.bool()].tolist())
            new = self.tok(self.outputs[prompt], add_special_tokens=False)["input_ids"]
            new = new + [self.tok.eos_token_id] * (kw["max_new_tokens"] - len(new))
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_training_accuracy_fake_model(rng):
    tok = make_tokenizer(chat_template=True, chars=CHARS, special=SPECIAL)
    ds = dataset(tok, rng, 13)
    right = {ex["example_id"]: bool(rng.random() < 0.5) for ex in ds}
    outputs = {}
    for ex in ds:
        ans = int(ex["answer"]) + (0 if right[ex["example_id"]] else 1)
        outputs[tuple(ex["input_ids"][: ex["prompt_length"]].tolist())] = f"{ans}#{ans}"
    model = FakeModel(tok, outputs)
    acc, details = training_accuracy(model, tok, ds, verifier="exact", subset_size=None,
                                     max_new_tokens=8, batch_size=4, progress=False, return_details=True)
    assert acc == pytest.approx(sum(right.values()) / len(ds))
    assert {d["example_id"]: d["correct"] for d in details} == right
    assert model.training                          # restored
    assert all(c["do_sample"] is False for c in model.calls) and len(model.calls) == 4
    # a fixed subset: the same examples every call, of the requested size
    acc5, d5 = training_accuracy(model, tok, ds, verifier="exact", subset_size=5, max_new_tokens=8,
                                 progress=False, return_details=True, seed=3)
    again = training_accuracy(model, tok, list(reversed(list(ds))), verifier="exact", subset_size=5,
                              max_new_tokens=8, progress=False, return_details=True, seed=3)[1]
    assert [d["example_id"] for d in d5] == [d["example_id"] for d in again] and len(d5) == 5
    assert acc5 == pytest.approx(np.mean([right[d["example_id"]] for d in d5]))
    assert math.isclose(training_accuracy(model, tok, ds, verifier=lambda p, g: False, subset_size=None,
                                          max_new_tokens=8, progress=False), 0.0)


def test_training_accuracy_tiny_gpt2(rng):
    tok = make_tokenizer(chat_template=True, chars=CHARS, special=SPECIAL)
    ds = dataset(tok, rng, 6)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    acc = training_accuracy(model, tok, ds, verifier=lambda p, g: True, subset_size=4, max_new_tokens=3,
                            batch_size=3, progress=True)
    assert acc == 1.0
    _, details = training_accuracy(model, tok, ds, verifier=lambda p, g: p == p, subset_size=None,
                                   max_new_tokens=3, batch_size=4, progress=False, return_details=True)
    assert len(details) == 6 and all(isinstance(d["prediction"], str) for d in details)
    assert model.training
    # greedy generation is deterministic
    again = training_accuracy(model, tok, ds, verifier="exact", subset_size=None, max_new_tokens=3,
                              batch_size=2, progress=False, return_details=True)[1]
    assert [d["prediction"] for d in again] == [d["prediction"] for d in details]


def test_select_subset():
    exs = [{"example_id": i} for i in (9, 3, 7, 1, 5)]
    assert [e["example_id"] for e in select_subset(exs, None)] == [1, 3, 5, 7, 9]
    s = select_subset(exs, 3, seed=0)
    assert len(s) == 3 and s == select_subset(list(reversed(exs)), 3, seed=0)
    with pytest.raises(ValueError):
        select_subset(exs, 0)


# -------------------------------------------------------------------------------------
# The bottleneck without a verifier
# -------------------------------------------------------------------------------------

def test_verifier_free_bottleneck_finds_the_crash_on_a_constructed_curve():
    """Answers drift away from θ0's during the shock and come back: the least agreement is
    the crash, found with no gold answer (the gold answers below are never used)."""
    from t3s import answer_agreement, find_bottleneck, verifier_free_bottleneck
    gold = ["4", "6", "9", "12", "15"]
    answers = {0: ["4", "6", "9", "12", "10"],     # θ0: 4 of 5 right
               4: ["4", "7", "9", "12", "10"],
               8: ["3", "7", "8", "11", "10"],     # the crash
               12: ["4", "7", "9", "12", "15"],
               16: ["4", "6", "9", "12", "15"]}
    accuracy = {s: sum(a == g for a, g in zip(row, gold)) / 5 for s, row in answers.items()}
    assert find_bottleneck(accuracy) == 8
    agreement = answer_agreement(answers)
    assert agreement == {0: 1.0, 4: 0.8, 8: 0.2, 12: 0.6, 16: 0.8}
    assert verifier_free_bottleneck(answers) == 8
    # ties go to the earliest step; another reference step can be chosen
    assert verifier_free_bottleneck({0: ["1", "2"], 3: ["1", "9"], 6: ["8", "2"]}) == 3
    assert answer_agreement(answers, reference_step=16)[16] == 1.0
    with pytest.raises(ValueError, match="the prompts must be the same"):
        answer_agreement({0: ["1", "2"], 3: ["1"]})
    with pytest.raises(ValueError, match="no answers"):
        answer_agreement({})
    with pytest.raises(ValueError, match="reference step 5"):
        answer_agreement({0: ["1"]}, reference_step=5)
    with pytest.raises(ValueError, match="only step 0"):
        verifier_free_bottleneck({0: ["1"]})
