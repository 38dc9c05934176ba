"""The selection artifact (t3s.artifact)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from t3s.artifact import (
    SelectionArtifact,
    dataset_fingerprint,
    load_artifact,
    tokenizer_fingerprint,
)
from t3s.data import PackedCollator, TokenTable, TraceDataset
from t3s.selection import anchor_mask, confidence_change, forced_mask
import tiny
from t3s import artifact as t3s_artifact

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789+=;# ")


def make_tokenizer(chars=CHARS, eos="</s>"):
    tok = tiny.make_tokenizer(chat_template=True, chars=chars, special=SPECIAL)
    tok.eos_token = eos
    return tok


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def records(rng, n=6):
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 100, 2))
        filler = "".join(rng.choice(list("abc;"), int(rng.integers(0, 8))))
        out.append({"prompt": f"{a}+{b}", "response": f"{filler}{a}+{b}={a + b}#{a + b}",
                    "answer": str(a + b)})
    return out


def make_artifact(rng, tok, recs, rule="anchor", **params):
    ds = TraceDataset.from_jsonl(recs, tok)
    keys = ds.keys()
    c0 = keys.with_columns(c=-rng.exponential(size=len(keys)))
    cb = keys.with_columns(c=-rng.exponential(size=len(keys))).take(rng.permutation(len(keys)))
    delta = confidence_change(c0, cb)
    art = SelectionArtifact.create(delta, examples=ds, tokenizer=tok, rule=rule, params=params,
                                   selector="tiny-char-lm", theta0="ckpt-0", thetab="ckpt-30")
    return ds, delta, art


def test_roundtrip(tmp_path, rng):
    tok = make_tokenizer()
    ds, delta, art = make_artifact(rng, tok, records(rng))
    path = tmp_path / "sel.parquet"
    art.save(path)
    back = load_artifact(path, tokenizer=tok, examples=ds)
    assert back.rule == "anchor" and back.mask_column == "loss_mask"
    m = back.metadata
    assert (m["selector"], m["theta0"], m["thetab"]) == ("tiny-char-lm", "ckpt-0", "ckpt-30")
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert m["dataset"]["fingerprint"] == dataset_fingerprint(ds)
    assert m["created"].endswith("+00:00")
    d = delta.align(back.table)
    np.testing.assert_allclose(d["delta"], delta["delta"])
    assert np.array_equal(d["loss_mask"], delta["delta"] <= 0)
    # metadata is JSON in the Parquet schema
    raw = pq.read_schema(path).metadata[b"t3s"]
    assert json.loads(raw)["rule"] == "anchor"
    assert pq.read_schema(path).field("position").type == "int32"


def test_a_training_process_reads_only_the_keys_and_the_mask(tmp_path, rng):
    """`load(columns=())` projects the Parquet read: the same masks without Δc."""
    tok = make_tokenizer()
    ds, _, art = make_artifact(rng, tok, records(rng))
    path = tmp_path / "sel.parquet"
    art.save(path)
    full, slim = load_artifact(path), SelectionArtifact.load(path, columns=())
    assert "delta" in full.table and "delta" not in slim.table
    assert slim.table.names == ["loss_mask"]
    assert slim.metadata == full.metadata
    slim.check(tokenizer=tok, examples=ds)
    a, b = full.loss_masks(ds), slim.loss_masks(ds)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "delta" in SelectionArtifact.load(path, columns=("delta",)).table


def test_refuses_other_tokenizer(tmp_path, rng):
    tok = make_tokenizer()
    ds, _, art = make_artifact(rng, tok, records(rng))
    art.save(tmp_path / "a.parquet")
    same = make_tokenizer()
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tok)
    load_artifact(tmp_path / "a.parquet", tokenizer=same)
    swapped = make_tokenizer(chars=CHARS[::-1])            # same tokens, other ids
    with pytest.raises(ValueError, match="different tokenizer: vocab differs"):
        load_artifact(tmp_path / "a.parquet", tokenizer=swapped)
    bigger = make_tokenizer(chars=CHARS + ["!"])
    with pytest.raises(ValueError, match=r"vocab differs \(\d+ vs \d+ tokens\)"):
        art.check(tokenizer=bigger)
    other_eos = make_tokenizer(eos="<|end|>")
    with pytest.raises(ValueError, match="special tokens differ"):
        art.check(tokenizer=other_eos)


def test_refuses_other_data(tmp_path, rng):
    tok = make_tokenizer()
    recs = records(rng)
    ds, _, art = make_artifact(rng, tok, recs)
    art.save(tmp_path / "a.parquet")
    changed = [dict(r) for r in recs]
    victim = int(rng.integers(len(recs)))
    changed[victim]["response"] = changed[victim]["response"] + "aa"
    ds2 = TraceDataset.from_jsonl(changed, tok)
    with pytest.raises(ValueError, match=f"token counts differ for 1 examples \\(example {victim}:"):
        load_artifact(tmp_path / "a.parquet", tokenizer=tok, examples=ds2)
    with pytest.raises(ValueError, match="does not match this data"):
        art.loss_masks(ds2)
    fewer = TraceDataset.from_jsonl(recs[:-1], tok)
    with pytest.raises(ValueError, match="not in the data"):
        art.check(examples=fewer)
    # same lengths, other tokens
    same_len = [dict(r) for r in recs]
    resp = same_len[victim]["response"]
    same_len[victim]["response"] = ("b" if resp[0] != "b" else "c") + resp[1:]
    with pytest.raises(ValueError, match="token ids differ"):
        art.check(examples=TraceDataset.from_jsonl(same_len, tok))


def test_reapply_thresholds_without_recomputing(tmp_path, rng):
    tok = make_tokenizer()
    ds, delta, art = make_artifact(rng, tok, records(rng))
    art.save(tmp_path / "a.parquet")
    art = load_artifact(tmp_path / "a.parquet")
    thr = float(rng.uniform(-0.5, 0.5))
    re = art.reapply(threshold=thr)
    assert re.params == {"threshold": thr}
    expected = anchor_mask(delta, threshold=thr)
    assert np.array_equal(delta.align(re.mask)["loss_mask"], expected["loss_mask"])
    f = art.reapply("forced", tau=0.3)
    assert f.mask_column == "forced" and f.metadata["tau"] == 0.3
    assert np.array_equal(delta.align(f.mask)["forced"], forced_mask(delta, 0.3)["forced"])
    with pytest.raises(ValueError, match="not a loss mask"):
        f.loss_masks(ds)
    r = art.reapply("random", like="anchor", seed=1)
    assert r.mask.columns["loss_mask"].sum() == (delta["delta"] <= 0).sum()
    r.save(tmp_path / "r.parquet")
    assert load_artifact(tmp_path / "r.parquet").params == {"like": "anchor", "seed": 1}
    s = art.reapply("static", fraction=0.25, which="bottom")
    assert (~s.mask["loss_mask"]).sum() == int(np.floor(0.25 * len(delta) + 0.5))
    assert "masked" in repr(art.summary())


def test_loss_masks_aligned_with_labels(rng):
    tok = make_tokenizer()
    ds, delta, art = make_artifact(rng, tok, records(rng))
    masks = art.loss_masks(ds)
    per = delta.with_columns(anchor=delta["delta"] > 0)
    for ex in ds:
        m = masks[ex["example_id"]]
        assert m.shape == ex["labels"].shape
        assert not m[: ex["prompt_length"]].any()
        sel = per.example_id == ex["example_id"]
        assert m[per.position[sel]].tolist() == (~per["anchor"][sel]).tolist()
    batch = PackedCollator(loss_masks=masks)(list(ds))
    assert batch["loss_mask"].shape == batch["labels"].shape
    assert batch["loss_mask"].sum() == (delta["delta"] <= 0).sum()
    fm = art.masks(ds, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in fm.values())


def test_create_requires_exact_keys(rng):
    tok = make_tokenizer()
    ds = TraceDataset.from_jsonl(records(rng), tok)
    keys = ds.keys()
    d = keys.with_columns(delta=rng.normal(size=len(keys)))
    with pytest.raises(ValueError, match="does not cover exactly the response tokens"):
        SelectionArtifact.create(d.take(np.arange(1, len(d))), examples=ds, tokenizer=tok)
    with pytest.raises(ValueError, match="'delta' column"):
        SelectionArtifact.create(keys.with_columns(x=np.zeros(len(keys))), examples=ds, tokenizer=tok)
    # a user-made mask is stored as given
    user = TokenTable(keys.example_id, keys.position, loss_mask=rng.random(len(keys)) > 0.5)
    art = SelectionArtifact.create(d, examples=ds, tokenizer=tok, rule="custom", mask=user)
    assert np.array_equal(user.align(art.mask)["loss_mask"], user["loss_mask"])


def test_not_an_artifact(tmp_path):
    t = TokenTable([1], [2], delta=[0.5]).to_arrow()
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a t3s selection artifact"):
        load_artifact(tmp_path / "x.parquet")


def test_tokenizer_fingerprint_sees_the_pipeline_not_runtime_settings(tmp_path, rng):
    """Same vocabulary and special tokens, other pre-tokenizer: a different tokenizer.
    Truncation / padding settings left on the backend by a call are not part of it."""
    from tokenizers import pre_tokenizers

    tok = make_tokenizer()
    _, _, art = make_artifact(rng, tok, records(rng))
    before = tokenizer_fingerprint(tok)
    tok(["1+2=3 abc"], truncation=True, max_length=4, padding="max_length")
    assert tokenizer_fingerprint(tok) == before
    split_differently = make_tokenizer()
    split_differently.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer_fingerprint(split_differently) != before
    with pytest.raises(ValueError, match="different tokenizer: the tokenizer pipeline differs"):
        art.check(tokenizer=split_differently)
    # an artifact written before the pipeline was hashed is still checked on what it has
    legacy = dict(art.metadata["tokenizer"])
    for key in ("config_sha", "probe_ids"):
        legacy.pop(key)
    legacy["fingerprint"] = t3s_artifact.legacy_tokenizer_fingerprint(legacy)
    art.metadata["tokenizer"] = legacy
    art.check(tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match="different tokenizer"):
        art.check(tokenizer=make_tokenizer(chars=CHARS[::-1]))


def test_dataset_fingerprint_sees_one_changed_token(rng):
    tok = make_tokenizer()
    ds = TraceDataset.from_jsonl(records(rng), tok)
    examples = [dict(ex) for ex in ds]
    base = dataset_fingerprint(examples)
    changed = [dict(ex) for ex in examples]
    ids = changed[2]["input_ids"].clone()
    ids[-2] = (ids[-2] + 1) % len(tok)  # same length, same counts, one other token
    changed[2]["input_ids"] = ids
    assert dataset_fingerprint(changed) != base
    moved = [dict(ex) for ex in examples]
    labels = moved[1]["labels"].clone()
    first = int((labels != -100).nonzero()[0])
    labels[first - 1], labels[first] = labels[first], -100  # the trained span shifts by one
    moved[1]["labels"] = labels
    assert dataset_fingerprint(moved) != base
    assert dataset_fingerprint([dict(ex) for ex in ds]) == base
