"""Exact-mode profiling and online-vs-exact agreement on tiny Hugging Face models."""

import copy
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

transformers = pytest.importorskip("transformers")

import t3s_kernels  # noqa: E402
from t3s.hf.heads import last_hidden_state, lm_head  # noqa: E402
from t3s.delta import compare_deltas, exact_delta, online_delta, rankdata  # noqa: E402
from t3s.profiling import profile  # noqa: E402
from t3s.trajectory.recorder import TrajectoryRecorder  # noqa: E402
from t3s.trajectory.reader import TrajectoryReader  # noqa: E402
from t3s_kernels import linear_cross_entropy  # noqa: E402

DS = "ds-profile"
V = 97


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gemma2_softcap():
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=3.0)
    return transformers.Gemma2ForCausalLM(cfg).eval()


def _gpt2_tied():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _examples(n, rng, lo=6, hi=20, first_id=1000):
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        ids = rng.integers(0, V, length)
        labels = ids.copy()
        labels[: int(rng.integers(1, length - 1))] = -100  # the prompt
        out.append({"example_id": first_id + 3 * i, "input_ids": ids, "labels": labels})
    return out


def _direct(model, examples):
    """{(example_id, position): log p} from log_softmax(model(input_ids).logits), one by one."""
    out = {}
    with torch.no_grad():
        for ex in examples:
            ids = torch.as_tensor(ex["input_ids"])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
            for pos in range(1, ids.shape[1]):
                if ex["labels"][pos] != -100:
                    out[(ex["example_id"], pos)] = float(logp[pos - 1, ex["labels"][pos]])
    return out


def _as_dict(table, column="logprob"):
    return {(e, p): v for e, p, v in zip(table.column("example_id").to_pylist(),
                                         table.column("position").to_pylist(),
                                         table.column(column).to_pylist())}


def _rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))


@pytest.mark.parametrize("make_model", [_llama, _gemma2_softcap, _gpt2_tied])
def test_profile_equals_log_softmax_of_the_model_logits(make_model):
    model = make_model()
    examples = _examples(7, _rng())
    table = profile(model, examples, batch_size=3, backend="torch", progress=False)
    expected = _direct(model, examples)
    got = _as_dict(table)
    assert got.keys() == expected.keys()
    err = max(abs(got[k] - expected[k]) for k in expected)
    assert err < 1e-5, err
    assert set(table.column("step").to_pylist()) == {0}
    keys = list(got)
    assert keys == sorted(keys)


@pytest.mark.skipif("triton" not in t3s_kernels.available_backends(), reason="no Triton")
def test_profile_triton_backend_matches_torch():
    model = _llama()
    examples = _examples(3, _rng(), hi=12)
    a = profile(model, examples, batch_size=2, backend="triton", progress=False)
    b = profile(model, examples, batch_size=2, backend="torch", progress=False)
    assert a.column("position").to_pylist() == b.column("position").to_pylist()
    np.testing.assert_allclose(a.column("logprob").to_numpy(), b.column("logprob").to_numpy(),
                               atol=1e-5)


def test_profile_accepts_padded_and_packed_batches():
    model = _llama()
    examples = _examples(5, _rng())
    ref = _as_dict(profile(model, examples, batch_size=2, backend="torch", progress=False,
                           return_entropy=True), "logprob")
    # Padded batch (right padding, attention mask) and a packed, padding-free batch.
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    am = torch.zeros_like(ids)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n], labels[r, :n], am[r, :n] = torch.as_tensor(e["input_ids"]), \
            torch.as_tensor(e["labels"]), 1
    eids = torch.tensor([e["example_id"] for e in examples])
    padded = {"input_ids": ids, "labels": labels, "attention_mask": am, "example_ids": eids}
    packed = {"input_ids": torch.cat([torch.as_tensor(e["input_ids"]) for e in examples])[None],
              "labels": torch.cat([torch.as_tensor(e["labels"]) for e in examples])[None],
              "position_ids": torch.cat([torch.arange(len(e["input_ids"]))
                                         for e in examples])[None],
              "example_ids": eids}
    left = {k: v.clone() for k, v in padded.items()}  # left padding, read through the mask
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        for k in ("input_ids", "labels", "attention_mask"):
            left[k][r] = torch.roll(padded[k][r], width - n)
    for batch in (padded, packed, left):
        got = _as_dict(profile(model, [batch], batch_size=4, backend="torch", progress=False))
        assert got.keys() == ref.keys()
        assert max(abs(got[k] - ref[k]) for k in ref) < 1e-5


def test_last_hidden_state_feeds_the_lm_head():
    model = _llama()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        h = last_hidden_state(model, ids)
        torch.testing.assert_close(model.lm_head(h), model(input_ids=ids).logits)


def test_profile_resumes_after_a_crash(tmp_path):
    model = _llama()
    examples = _examples(9, _rng())
    rows_seen = []
    def count(mod, args, kwargs, out):
        rows_seen.append(kwargs["input_ids"].shape[0])

    handle = model.get_decoder().register_forward_hook(count, with_kwargs=True)

    def crashing(data, after):
        for i, ex in enumerate(data):
            if i == after:
                raise KeyboardInterrupt("killed")
            yield ex

    # sort_window=1: batches are written as the examples arrive.
    kw = dict(batch_size=2, sort_window=1, store_dir=tmp_path, dataset_fingerprint=DS,
              backend="torch", progress=False, verify=False)
    with pytest.raises(KeyboardInterrupt):
        profile(model, crashing(examples, 5), **kw)
    done = TrajectoryReader(tmp_path, dataset_fingerprint=DS).example_ids()
    assert done.tolist() == sorted(e["example_id"] for e in examples[:4])
    rows_seen.clear()
    table = profile(model, examples, **kw)
    assert sum(rows_seen) == 5  # only the examples not yet in the store
    expected = _direct(model, examples)
    got = _as_dict(table)
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in expected) < 1e-5
    # A third run has nothing left to do; a different step is a separate profile.
    rows_seen.clear()
    assert profile(model, examples, **kw).num_rows == table.num_rows
    assert sum(rows_seen) == 0
    profile(model, examples[:2], step=7, **kw)
    assert sum(rows_seen) == 2
    # resume=False recomputes and appends; the newest rows win.
    rows_seen.clear()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    again = profile(model, examples, **{**kw, "resume": False})
    assert sum(rows_seen) == len(examples) and again.num_rows == table.num_rows
    expected = _direct(model, examples)
    assert max(abs(v - expected[k]) for k, v in _as_dict(again).items()) < 1e-5
    handle.remove()
    store = TrajectoryReader(tmp_path, dataset_fingerprint=DS)
    np.testing.assert_array_equal(store.steps(), [0, 7])
    with pytest.raises(ValueError, match="dataset"):
        profile(model, examples, **{**kw, "dataset_fingerprint": "other-data"})


def test_last_hidden_state_computes_no_logits():
    model = _llama()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        h = last_hidden_state(model, torch.randint(0, V, (2, 9)))
    assert h.shape == (2, 9, 32) and seen == [(2, 9, 0)]
    assert "forward" not in model.lm_head.__dict__  # the head is restored


def test_profile_measures_the_logit_map():
    examples = _examples(2, _rng(), lo=12)
    # A scale the config does not mention is measured by the probe (as in t3s.patch).
    model = _llama()
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0)
    assert lm_head(model).logit_scale == pytest.approx(2.0)
    table = profile(model, examples, backend="torch", progress=False)
    expected = _direct(model, examples)
    assert max(abs(v - expected[k]) for k, v in _as_dict(table).items()) < 1e-5
    # Without the probe (verify=False) the config's map is used: Granite-style division.
    model = _llama()
    model.config.logits_scaling = 4.0
    model.lm_head.register_forward_hook(lambda mod, args, out: out / 4.0)
    assert lm_head(model, verify=False).logit_scale == 0.25
    for verify in (True, False):
        table = profile(model, examples, backend="torch", progress=False, verify=verify)
        expected = _direct(model, examples)
        assert max(abs(v - expected[k]) for k, v in _as_dict(table).items()) < 1e-5


def test_verify_catches_a_head_profile_does_not_know():
    examples = _examples(2, _rng(), lo=12)
    # Not softcap(scale * z): refused by the probe.
    model = _llama()
    model.lm_head.register_forward_hook(lambda mod, args, out: out + torch.linspace(0, 1, V))
    with pytest.raises(NotImplementedError, match="post-processes its logits"):
        profile(model, examples, backend="torch", progress=False)
    # A transform the 8-token probe does not see is caught by the check on the data.
    model = _llama()
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0 if out.shape[-2] > 8
                                        else out)
    with pytest.raises(ValueError, match="differ from the model's own logits"):
        profile(model, examples, backend="torch", progress=False)


def _markov_examples(rng, n, P, first_id=0):
    out = []
    for i in range(n):
        length = int(rng.integers(16, 25))
        x = [int(rng.integers(16))]
        for _ in range(length - 1):
            x.append(int(rng.choice(16, p=P[x[-1]])))
        ids = np.array(x)
        labels = ids.copy()
        labels[:4] = -100
        out.append({"example_id": first_id + i, "input_ids": ids, "labels": labels})
    return out


def test_online_vs_exact_agreement_on_a_tiny_run(tmp_path, capsys):
    """A 24-step SFT of a tiny 'pretrained' model, recorded online, vs exact profiles.

    The model first learns a Markov chain P, then is fine-tuned on 8 traces from
    a mixture of P and another chain, so that some tokens gain and others lose
    confidence (about 3/4 anchors). Each example is visited every other step.
    """
    rng, steps, b, bs = _rng(), 24, 15, 4
    model = _llama()
    P = rng.dirichlet(np.full(16, 0.3), size=16)
    Q = rng.dirichlet(np.full(16, 0.3), size=16)
    pre = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        xs = torch.as_tensor(np.stack([e["input_ids"][:16] for e in
                                       _markov_examples(rng, 8, P)]))
        loss = model(input_ids=xs, labels=xs).loss
        pre.zero_grad()
        loss.backward()
        pre.step()
    examples = _markov_examples(rng, 8, 0.5 * P + 0.5 * Q, first_id=500)

    theta0 = copy.deepcopy(model.state_dict())
    thetab = None
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    with TrajectoryRecorder(tmp_path / "online", dataset_fingerprint=DS) as rec:
        for step in range(steps):
            if step == b:
                thetab = copy.deepcopy(model.state_dict())
            k = step % (len(examples) // bs)
            batch = examples[k * bs:(k + 1) * bs]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.zeros(bs, width, dtype=torch.long)
            labels = torch.full((bs, width), -100)
            am = torch.zeros(bs, width, dtype=torch.long)
            for r, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[r, :n], labels[r, :n], am[r, :n] = torch.as_tensor(e["input_ids"]), \
                    torch.as_tensor(e["labels"]), 1
            hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state
            loss, stats = linear_cross_entropy(hidden[:, :-1], model.lm_head.weight,
                                               labels[:, 1:], return_stats=True,
                                               backend="torch")
            rec.record(step, stats, labels, [e["example_id"] for e in batch],
                       attention_mask=am)
            opt.zero_grad()
            loss.backward()
            opt.step()

    kw = dict(batch_size=4, backend="torch", progress=False, store_dir=tmp_path / "exact",
              dataset_fingerprint=DS)
    model.load_state_dict(theta0)
    c0 = profile(model, examples, step=0, **kw)
    model.load_state_dict(thetab)
    cb = profile(model, examples, step=b, **kw)
    exact = exact_delta(c0, cb)
    online = online_delta(tmp_path / "online", b, dataset_fingerprint=DS)

    # Where the online trajectory visited a token exactly at step 0 or step b, it
    # must equal the exact value: recorder keys, store and profile keys agree.
    on, c0d, cbd = _as_dict(online, "c_b"), _as_dict(c0), _as_dict(cb)
    at_b = [k for k, s in _as_dict(online, "step_b").items() if s == b]
    at_0 = [k for k, s in _as_dict(online, "step_0").items() if s == 0]
    assert len(at_b) > 20 and len(at_0) > 20
    assert max(abs(on[k] - cbd[k]) for k in at_b) < 1e-4
    c0_online = _as_dict(online, "c_0")
    assert max(abs(c0_online[k] - c0d[k]) for k in at_0) < 1e-4
    assert online.num_rows == exact.num_rows == sum(int(np.sum(e["labels"][1:] != -100))
                                                   for e in examples)

    agree = compare_deltas(online, exact, bottleneck_step=b)
    agree_exact0 = compare_deltas(online_delta(tmp_path / "online", b, initial=c0,
                                               dataset_fingerprint=DS), exact,
                                  bottleneck_step=b)
    with capsys.disabled():
        print(f"\n[online vs exact] {agree.summary()}")
        print(f"[online c_b, exact c_0] {agree_exact0.summary()}")
    # The setting is informative: a real mix of anchors and non-anchors.
    assert 0.3 < agree.anchors_exact / agree.n_common < 0.95
    assert agree.n_common == exact.num_rows and agree.mean_visit_distance <= 1
    # Measured over 45 seeds: mask agreement >= 0.91, kappa >= 0.79, Pearson >= 0.99.
    assert agree.mask_agreement > 0.85 and agree.cohen_kappa > 0.6
    assert agree.pearson > 0.95 and agree.spearman > 0.95
    assert agree_exact0.mask_agreement > 0.85 and agree_exact0.pearson > 0.95
    # Negative control: the same metrics on shuffled exact values are near chance.
    perm = np.random.default_rng(0).permutation(exact.num_rows)
    shuffled = exact.set_column(2, "delta", pa.array(exact["delta"].to_numpy()[perm]))
    control = compare_deltas(online, shuffled)
    assert control.cohen_kappa < 0.5 and control.pearson < 0.5


def test_compare_deltas_counts():
    key = dict(example_id=pa.array([1, 1, 2, 3], pa.int64()),
               position=pa.array([1, 2, 1, 1], pa.int32()))
    online = pa.table({**key, "delta": pa.array([0.5, -0.1, 0.2, 1.0], pa.float32()),
                       "step_b": pa.array([4, 5, 3, 4], pa.int32())})
    exact = pa.table({"example_id": pa.array([1, 1, 2, 9], pa.int64()),
                      "position": pa.array([1, 2, 1, 1], pa.int32()),
                      "delta": pa.array([0.4, 0.1, 0.3, 0.0], pa.float32())})
    a = compare_deltas(online, exact, bottleneck_step=4)
    assert (a.n_online, a.n_exact, a.n_common) == (4, 4, 3)
    assert (a.anchors_online, a.anchors_exact, a.anchors_both) == (2, 3, 2)
    assert a.mask_agreement == pytest.approx(2 / 3)
    assert a.anchor_jaccard == pytest.approx(2 / 3)
    assert a.mean_visit_distance == pytest.approx(2 / 3)
    assert a.spearman == pytest.approx(1.0)  # same order: ranks [3, 1, 2] in both
    d_on, d_ex = np.array([0.5, -0.1, 0.2]), np.array([0.4, 0.1, 0.3])
    assert a.pearson == pytest.approx(np.corrcoef(d_on, d_ex)[0, 1], abs=1e-6)
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        online_delta("some/store/dir", 4)
    np.testing.assert_array_equal(rankdata(np.array([3.0, 1.0, 2.0, 2.0, 5.0])),
                                  [4.0, 1.0, 2.5, 2.5, 5.0])
    # Opposite orders; the threshold moves the mask.
    flipped = exact.set_column(2, "delta", pa.array([-0.4, 0.1, -0.3, 0.0], pa.float32()))
    b = compare_deltas(online, flipped, threshold=0.3)
    assert b.spearman == pytest.approx(-1.0) and (b.anchors_online, b.anchors_exact) == (1, 0)


def test_online_delta_says_when_the_bottleneck_is_after_the_last_record():
    visits = pa.table({"step": pa.array([0, 1, 2], pa.int32()),
                       "example_id": pa.array([1, 1, 1], pa.int64()),
                       "position": pa.array([3, 3, 3], pa.int32()),
                       "logprob": pa.array([-3.0, -2.0, -1.0], pa.float32())})
    with pytest.warns(RuntimeWarning, match="after the last recorded step 2"):
        late = online_delta(visits, 3)
    assert late.column("step_b").to_pylist() == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert online_delta(visits, 2).column("delta").to_pylist() == [2.0]
