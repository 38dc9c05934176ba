"""Traces -> tokens -> keys -> batches (t3s.data)."""

import json

import numpy as np
import pytest
import torch

from t3s.data import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    TokenTable,
    TraceDataset,
    dataset_keys,
    example_id_from,
    example_keys,
    pack_indices,
    packed_keys,
    packed_token_table,
    read_traces,
    token_keys,
    tokenize_trace,
)
from t3s.data.traces import MAX_REPORTED_ERRORS
from tiny import make_tokenizer


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat_template=True)


def random_records(rng, n):
    digits = "0123456789"
    recs = []
    for i in range(n):
        a, b = rng.integers(0, 100, 2)
        steps = "".join(rng.choice(list(digits + "+=;"), int(rng.integers(1, 12))))
        recs.append({"prompt": f"{a}+{b}", "response": f"{steps}#{a + b}", "answer": str(a + b)})
    return recs


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


# -------------------------------------------------------------------------------------
# reading and tokenizing
# -------------------------------------------------------------------------------------

def test_chat_template_prompt_response(tok, rng):
    recs = random_records(rng, 5)
    ds = TraceDataset.from_jsonl([json.dumps(r) for r in recs], tok)
    assert [ex["example_id"] for ex in ds] == list(range(5))
    for r, ex in zip(recs, ds):
        ids, labels = ex["input_ids"], ex["labels"]
        p = ex["prompt_length"]
        assert decode(tok, ids[:p]) == f"<|user|>{r['prompt']}<|end|><|assistant|>"
        assert decode(tok, ids[p:]) == r["response"] + "<|end|>"
        assert (labels[:p] == IGNORE_INDEX).all()
        assert torch.equal(labels[p:], ids[p:])
        assert ex["answer"] == r["answer"]


def test_messages_last_assistant_is_response(tok):
    rec = {"messages": [{"role": "system", "content": "be"}, {"role": "user", "content": "1+2"},
                        {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2+2"},
                        {"role": "assistant", "content": "2+2=4#4"}],
           "answer": "4", "id": 17}
    ex = TraceDataset.from_jsonl([rec], tok)[0]
    assert ex["example_id"] == 17
    p = ex["prompt_length"]
    assert decode(tok, ex["input_ids"][p:]) == "2+2=4#4<|end|>"
    assert decode(tok, ex["input_ids"][:p]).endswith("<|user|>and 2+2<|end|><|assistant|>")
    assert "<|assistant|>3<|end|>" in decode(tok, ex["input_ids"][:p])


def test_plain_concatenation_without_template():
    tok = make_tokenizer(chat_template=False)
    rec = read_traces([{"prompt": "1+2=", "response": "3", "answer": "3"}])[0]
    ex = tokenize_trace(rec, tok)
    expected = tok("1+2=", add_special_tokens=False)["input_ids"] + tok("3", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"].tolist() == expected
    assert ex["labels"].tolist() == [IGNORE_INDEX] * 4 + expected[4:]
    ex2 = tokenize_trace(rec, tok, add_eos=False)
    assert ex2["input_ids"].tolist() == expected[:-1]


def test_example_ids_line_index_and_id_field(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"prompt": "a", "response": "b", "answer": "1"}), "",
             json.dumps({"prompt": "c", "response": "d", "answer": "2"}),
             json.dumps({"prompt": "e", "response": "f", "answer": "3", "id": "item-9"}),
             json.dumps({"prompt": "g", "response": "h", "answer": "4", "id": "42"})]
    path.write_text("\n".join(lines) + "\n")
    ds = TraceDataset.from_jsonl(path, tok)
    ids = ds.example_ids
    assert ids[:2] == [0, 2]                       # line index, blank lines counted
    assert ids[2] == example_id_from("item-9") == example_id_from("item-9")
    assert 0 <= ids[2] < 2**63 and ids[2] not in (0, 2, 42)
    assert ids[3] == 42
    assert ds.by_id(42)["answer"] == "4"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "response": "b"}, "missing 'answer'"),
    ({"prompt": "a", "response": "b", "answer": "  "}, "missing 'answer'"),
    ({"prompt": "a", "response": "   ", "answer": "1"}, "empty response"),
    ({"prompt": "a", "response": "", "answer": "1"}, "empty response"),
    ({"question": "a", "answer": "1"}, "neither 'prompt'/'response' nor 'messages'"),
    ({"messages": [{"role": "user", "content": "a"}], "answer": "1"}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}], "answer": "1"}, "after the last assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
      "answer": "1"}, "empty response"),
    ({"prompt": "a", "answer": "1"}, "missing 'response'"),
])
def test_bad_records_name_the_line(record, message):
    good = {"prompt": "x", "response": "y", "answer": "0"}
    with pytest.raises(ValueError, match="line 3") as err:
        read_traces([json.dumps(good), json.dumps(good), json.dumps(record)])
    assert message in str(err.value)


def test_invalid_json_and_duplicate_ids():
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        read_traces(['{"prompt": "a", "response": "b", "answer": "1"}', "{oops"])
    rec = {"prompt": "a", "response": "b", "answer": "1", "id": 5}
    with pytest.raises(ValueError, match="line 2: example id 5 already used on line 1"):
        read_traces([rec, rec])


def test_every_bad_line_is_reported_in_one_error(tmp_path):
    good = json.dumps({"prompt": "x", "response": "y", "answer": "0"})
    lines = [good, '{"prompt": "1+1=", "response": "2', good, '{"prompt": "a", "response": "b"}',
             good, "{oops"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        read_traces(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: 3 bad lines: ")
    # the decoder's message keeps its column (json.loads' e.msg alone drops it)
    assert "line 2: invalid JSON (Unterminated string starting at: column 32)" in msg
    assert "line 4: missing 'answer'" in msg and "line 6: invalid JSON" in msg
    assert "more bad line" not in msg


def test_bad_lines_are_bounded_and_counted():
    good = json.dumps({"prompt": "x", "response": "y", "answer": "0"})
    n_bad = MAX_REPORTED_ERRORS + 7
    with pytest.raises(ValueError) as err:
        read_traces([good] + ["{"] * n_bad)
    msg = str(err.value)
    assert f"{n_bad} bad lines" in msg and msg.endswith("; and 7 more bad lines")
    assert msg.count("invalid JSON") == MAX_REPORTED_ERRORS
    assert f"line {MAX_REPORTED_ERRORS + 1}:" in msg and f"line {MAX_REPORTED_ERRORS + 2}:" not in msg


def test_truncation_is_explicit(tok):
    rec = read_traces([{"prompt": "12", "response": "abcdefgh", "answer": "1"}])[0]
    full = tokenize_trace(rec, tok)
    n, p = full["input_ids"].numel(), full["prompt_length"]
    assert tokenize_trace(rec, tok, max_length=n)["truncated"] is False
    with pytest.raises(ValueError, match=r"line 1: .* exceed max_length"):
        tokenize_trace(rec, tok, max_length=n - 1)
    assert tokenize_trace(rec, tok, max_length=n - 1, truncation="drop") is None
    cut = tokenize_trace(rec, tok, max_length=n - 3, truncation="truncate")
    assert cut["truncated"] is True and cut["input_ids"].numel() == n - 3
    assert torch.equal(cut["input_ids"], full["input_ids"][:n - 3])
    with pytest.raises(ValueError, match="no room"):
        tokenize_trace(rec, tok, max_length=p, truncation="truncate")
    with pytest.warns(UserWarning, match="dropped 1"):
        ds = TraceDataset.from_records([rec], tok, max_length=n - 1, truncation="drop")
    assert len(ds) == 0 and ds.dropped == [0]
    with pytest.raises(ValueError, match="truncation must be"):
        tokenize_trace(rec, tok, truncation="cut")


# -------------------------------------------------------------------------------------
# keys and TokenTable
# -------------------------------------------------------------------------------------

def test_example_keys_are_response_positions(tok, rng):
    ds = TraceDataset.from_jsonl(random_records(rng, 4), tok)
    for ex in ds:
        k = example_keys(ex)
        p, n = ex["prompt_length"], ex["input_ids"].numel()
        assert (k.example_id == ex["example_id"]).all()
        assert k.position.tolist() == list(range(p, n))
        assert k.position.dtype == np.int32 and k.example_id.dtype == np.int64
    assert len(dataset_keys(ds)) == ds.num_response_tokens()


def test_token_table_align_join_and_errors(rng):
    eid = rng.integers(-2**62, 2**62, 6)            # large ids work
    keys = TokenTable(np.repeat(eid, 5), np.tile(np.arange(3, 8), 6))
    vals = rng.normal(size=len(keys))
    t = keys.with_columns(v=vals)
    perm = rng.permutation(len(keys))
    shuffled = t.take(perm)
    back = keys.align(shuffled)
    np.testing.assert_array_equal(back["v"], vals)
    assert keys.same_keys(shuffled)
    joined = t.join(shuffled.select("v").with_columns(w=shuffled["v"] * 2).select("w"))
    np.testing.assert_allclose(joined["w"], 2 * vals)
    with pytest.raises(ValueError, match="token keys differ: .*1 keys only in the first"):
        keys.align(shuffled.take(np.arange(1, len(keys))))
    part = shuffled.take(np.arange(0, len(keys), 2)).select("v").with_columns(w=1.0 * np.arange(15))
    inner = t.join(part.select("w"), how="inner")
    assert len(inner) == 15
    for i in range(len(inner)):
        hit = (part.example_id == inner.example_id[i]) & (part.position == inner.position[i])
        assert inner["w"][i] == part["w"][hit][0] and inner["v"][i] == part["v"][hit][0]
    with pytest.raises(ValueError, match="duplicate"):
        TokenTable([1, 1], [4, 4])
    with pytest.raises(ValueError, match="both tables have columns"):
        t.join(shuffled)
    with pytest.raises(ValueError, match="rows"):
        TokenTable([1, 2], [3, 4], v=[1.0])


def test_token_table_inner_join_matches_values(rng):
    n = 40
    a = TokenTable(np.arange(n) // 8, np.arange(n) % 8, x=rng.normal(size=n))
    sub = rng.choice(n, 17, replace=False)
    b = a.take(sub).select("x")
    b = TokenTable(b.example_id, b.position, y=b["x"] + 1)
    j = a.join(b, how="inner")
    assert len(j) == 17
    np.testing.assert_allclose(j["y"], j["x"] + 1)


def test_to_loss_masks_aligned_with_labels(tok, rng):
    ds = TraceDataset.from_jsonl(random_records(rng, 5), tok)
    keys = ds.keys()
    vals = rng.random(len(keys)) > 0.5
    table = keys.with_columns(loss_mask=vals).take(rng.permutation(len(keys)))
    masks = table.to_loss_masks(ds)
    per = keys.with_columns(loss_mask=vals)
    for ex in ds:
        m = masks[ex["example_id"]]
        assert m.shape == ex["labels"].shape and m.dtype == torch.bool
        assert not m[: ex["prompt_length"]].any()
        sel = per.example_id == ex["example_id"]
        assert m[per.position[sel]].numpy().tolist() == vals[sel].tolist()
    with pytest.raises(ValueError, match="response tokens have no 'loss_mask'"):
        table.take(np.arange(1, len(table))).to_loss_masks(ds)
    filled = table.take(np.arange(1, len(table))).to_loss_masks(ds, fill=1.0, dtype=torch.float32)
    assert set(filled) == set(ds.example_ids)
    other = TokenTable(table.example_id + 1000, table.position, loss_mask=table["loss_mask"])
    with pytest.raises(ValueError):
        other.to_loss_masks(ds)


def test_from_per_example_and_arrow_roundtrip(tok, rng):
    ds = TraceDataset.from_jsonl(random_records(rng, 3), tok)
    vals = {ex["example_id"]: rng.normal(size=int((ex["labels"] != -100).sum())) for ex in ds}
    t = TokenTable.from_per_example(vals, ds, "c")
    back = TokenTable.from_arrow(t.to_arrow())
    np.testing.assert_array_equal(back["c"], t["c"])
    assert back.same_keys(t)
    for eid, (pos, v) in t.per_example("c").items():
        np.testing.assert_array_equal(v, vals[eid])
    bad = dict(vals)
    k = next(iter(bad))
    bad[k] = bad[k][:-1]
    with pytest.raises(ValueError, match="values for"):
        TokenTable.from_per_example(bad, ds, "c")


# -------------------------------------------------------------------------------------
# batches
# -------------------------------------------------------------------------------------

def test_padded_collator(tok, rng):
    ds = TraceDataset.from_jsonl(random_records(rng, 4), tok)
    masks = {ex["example_id"]: torch.from_numpy(rng.random(ex["labels"].numel()) > 0.3) for ex in ds}
    batch = PaddedCollator(tok.pad_token_id, loss_masks=masks)(list(ds))
    L = max(ex["input_ids"].numel() for ex in ds)
    assert batch["input_ids"].shape == (4, L) == batch["loss_mask"].shape
    for i, ex in enumerate(ds):
        n = ex["input_ids"].numel()
        assert torch.equal(batch["input_ids"][i, :n], ex["input_ids"])
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].sum() == n
        assert torch.equal(batch["loss_mask"][i, :n], masks[ex["example_id"]])
        assert not batch["loss_mask"][i, n:].any()
    assert batch["example_id"].tolist() == ds.example_ids


def test_padded_collator_options():
    # Plain feature dicts (no TraceDataset): per-feature masks, defaulted labels, left padding.
    features = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [True, False, True, True], "example_id": 0},
        {"input_ids": torch.tensor([9, 10]), "labels": [-100, 10], "loss_mask": [0.5, 1.0],
         "example_id": 1},
        {"input_ids": [11, 12, 13], "example_id": 2},
    ]
    batch = PaddedCollator(0)(features)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0],
                                                         [11, 12, 13, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[5, 6, 7, 8], [-100, 10, -100, -100],
                                                      [11, 12, 13, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0],
                                                              [1, 1, 1, 0]]))
    # float as soon as one mask is; an example without a mask keeps every token
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["loss_mask"], torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.5, 1.0, 0, 0],
                                                         [1.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(batch["example_id"], torch.tensor([0, 1, 2]))
    assert "position_ids" not in batch

    left = PaddedCollator(0, padding_side="left", pad_to_multiple_of=8)(features)
    assert left["input_ids"].shape == (3, 8)
    assert torch.equal(left["input_ids"][1], torch.tensor([0] * 6 + [9, 10]))
    assert torch.equal(left["labels"][1], torch.tensor([-100] * 7 + [10]))
    assert torch.equal(left["loss_mask"][1], torch.tensor([0.0] * 6 + [0.5, 1.0]))
    # left padding keeps the token keys, through the attention mask
    keys = token_keys(left["labels"], left["example_id"], attention_mask=left["attention_mask"])
    assert list(zip(keys[2].tolist(), keys[3].tolist())) == (
        [(0, p) for p in (1, 2, 3)] + [(1, 1)] + [(2, p) for p in (1, 2)])

    no_masks = PaddedCollator(7, label_pad_id=-1)([{"input_ids": [1, 2]},
                                                   {"input_ids": [3, 4, 5],
                                                    "attention_mask": [1, 1, 0]}])
    assert "loss_mask" not in no_masks and "example_id" not in no_masks
    assert torch.equal(no_masks["input_ids"], torch.tensor([[1, 2, 7], [3, 4, 5]]))
    assert torch.equal(no_masks["labels"], torch.tensor([[1, 2, -1], [3, 4, -1]]))
    assert torch.equal(no_masks["attention_mask"], torch.tensor([[1, 1, 0], [1, 1, 0]]))
    folded = PaddedCollator(0, fold_mask_into_labels=True)(features)
    assert torch.equal(folded["labels"][0], torch.tensor([5, -100, 7, 8]))
    assert torch.equal(folded["loss_mask"], batch["loss_mask"])
    packed_rows = PaddedCollator(0, extra_keys=["score"])(
        [{"input_ids": [1, 2, 3], "position_ids": [0, 1, 0], "score": 0.5},
         {"input_ids": [4], "score": 1.5}])
    assert torch.equal(packed_rows["position_ids"], torch.tensor([[0, 1, 0], [0, 0, 0]]))
    assert torch.equal(packed_rows["score"], torch.tensor([0.5, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_mask for example at index 0 .* labels have length 3"):
        PaddedCollator(0)([{"input_ids": [1, 2, 3], "loss_mask": [1, 0]}])
    with pytest.raises(ValueError, match="labels has 2 entries but input_ids has 3"):
        PaddedCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 0]}])
    with pytest.raises(ValueError, match="some examples have an example_id"):
        PaddedCollator(0)([{"input_ids": [1]}, {"input_ids": [2], "example_id": 3}])
    with pytest.raises(ValueError, match="no example_id to look up"):
        PaddedCollator(0, loss_masks={})([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="padding_side"):
        PaddedCollator(0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PaddedCollator(0, pad_to_multiple_of=0)


def test_mask_length_must_match_labels(tok, rng):
    ds = TraceDataset.from_jsonl(random_records(rng, 3), tok)
    masks = {ex["example_id"]: torch.ones(ex["labels"].numel(), dtype=torch.bool) for ex in ds}
    eid = ds.example_ids[1]
    masks[eid] = torch.ones(ds.by_id(eid)["labels"].numel() + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"loss_mask for example {eid} .* labels have length"):
        PaddedCollator(tok.pad_token_id, loss_masks=masks)(list(ds))
    with pytest.raises(ValueError, match="aligned with labels"):
        PackedCollator(loss_masks=masks)(list(ds))
    del masks[eid]
    with pytest.raises(ValueError, match=f"no loss_mask for example {eid}"):
        PackedCollator(loss_masks=masks)(list(ds))


def test_packed_batch_maps_back_to_keys(tok, rng):
    recs = random_records(rng, 7)
    for i, r in enumerate(recs):
        r["id"] = int(rng.integers(0, 10**12)) * 7 + i
    ds = TraceDataset.from_jsonl(recs, tok)
    order = rng.permutation(len(ds))
    exs = [ds[int(i)] for i in order]
    masks = {ex["example_id"]: torch.from_numpy(rng.random(ex["labels"].numel())).float() for ex in ds}
    batch = PackedCollator(loss_masks=masks, return_flash_attn_kwargs=True)(exs)
    N = sum(ex["input_ids"].numel() for ex in exs)
    assert batch["input_ids"].shape == (1, N)
    eid, pos = packed_keys(batch)
    assert eid.shape == (N,) and pos.dtype == torch.int32
    for j in range(N):
        ex = ds.by_id(int(eid[j]))
        p = int(pos[j])
        assert batch["input_ids"][0, j] == ex["input_ids"][p]
        if p > 0:
            assert batch["labels"][0, j] == ex["labels"][p]
            assert batch["loss_mask"][0, j] == masks[int(eid[j])][p]
        else:
            assert batch["labels"][0, j] == IGNORE_INDEX
    table = packed_token_table(batch)
    assert table.same_keys(dataset_keys(exs))
    cu = batch["cu_seq_lens_q"]
    assert cu.tolist() == [0] + np.cumsum([ex["input_ids"].numel() for ex in exs]).tolist()
    # a first token that carried a label must not be predicted across the boundary
    ex0 = dict(exs[0])
    ex0["labels"] = ex0["input_ids"].clone()
    b2 = PackedCollator()([exs[1], ex0])
    assert b2["labels"][0, exs[1]["input_ids"].numel()] == IGNORE_INDEX


def test_pack_indices():
    assert pack_indices([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert pack_indices([1, 1, 1], 2) == [[0, 1], [2]]
    with pytest.raises(ValueError):
        pack_indices([1], 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_keeps_sequences_apart(tok, rng, attn):
    """A packed batch, fed as is to a Hugging Face model in train mode, gives every
    sequence the logits it gets alone (the collator turns the cache off so the
    model builds a block-diagonal mask from position_ids)."""
    from tiny import tiny_llama
    ds = TraceDataset.from_jsonl(random_records(rng, 3), tok)
    exs = list(ds)
    batch = PackedCollator()(exs)
    assert batch["use_cache"] is False and "attention_mask" not in batch
    model = tiny_llama(tok, seed=int(rng.integers(1 << 30)), attn_implementation=attn)
    inputs = {k: v for k, v in batch.items() if k not in ("example_id", "labels")}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        leaky = model(**{**inputs, "use_cache": True}).logits[0]
        start = 0
        for ex in exs:
            n = ex["input_ids"].numel()
            alone = model(input_ids=ex["input_ids"][None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
            if start > 0:  # the check can fail: with a cache, later sequences see earlier ones
                assert (leaky[start:start + n] - alone).abs().max() > 1e-3
            start += n
