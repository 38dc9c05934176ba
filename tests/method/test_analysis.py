"""t3s.analysis: AUC, cosine, per-group gradients, the loss-transfer matrix, static
signals and the below-θ0 curve, on a tiny Llama (about 2 s in all on 2 cores)."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from t3s import TraceDataset
from t3s.analysis import (below_initial, check_groups, choose_examples, cosine, gradient_stats,
                          group_gradients, group_losses, make_batches, member_of,
                          parameter_subset, roc_auc, roc_curve, shock_curves, static_auc,
                          static_signals, transfer_matrix)
from t3s.analysis.gradients import group_loss_sums

from tiny import arithmetic_records, jsonl_lines, make_tokenizer, tiny_llama


# ----------------------------------------------------------------------------- AUC
def test_auc_perfect_reversed_and_chance():
    rng = np.random.default_rng()
    y = rng.random(50) < 0.4
    y[:2] = [True, False]
    s = rng.random(50) + 2.0 * y          # every member above every non-member
    assert roc_auc(s, y) == 1.0
    assert roc_auc(-s, y) == 0.0
    assert roc_auc(np.full(50, 3.0), y) == 0.5          # all tied: one half each


def test_auc_ties_count_half_and_matches_pair_count():
    rng = np.random.default_rng()
    s = rng.integers(0, 4, 40).astype(float)           # many ties
    y = rng.random(40) < 0.5
    y[:2] = [True, False]
    pos, neg = s[y], s[~y]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) \
        / (pos.size * neg.size)
    assert roc_auc(s, y) == pytest.approx(expected, abs=1e-12)
    fpr, tpr = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)   # ties: straight segments


def test_auc_bad_input():
    with pytest.raises(ValueError, match="members and non-members"):
        roc_auc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([1.0, float("nan")], [True, False])
    with pytest.raises(ValueError, match="same size"):
        roc_auc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="bool or 0/1"):
        roc_auc([1.0, 2.0], [2, 0])


# ----------------------------------------------------------------------------- cosine
def test_cosine_symmetric_bounded_and_exact():
    for _ in range(20):
        a, b = torch.randn(33), torch.randn(33)
        c = cosine(a, b)
        assert c == cosine(b, a)
        assert -1.0 <= c <= 1.0
        assert c == pytest.approx(float(F.cosine_similarity(a.double(), b.double(), dim=0)),
                                  abs=1e-12)
    a = torch.randn(17)
    same, opposite = cosine(a, 3 * a), cosine(a, -a)
    assert 1.0 - 1e-12 <= same <= 1.0 and -1.0 <= opposite <= -1.0 + 1e-12
    assert math.isnan(cosine(a, torch.zeros(17)))
    with pytest.raises(ValueError):
        cosine(a, torch.randn(16))
    g = torch.randn(3, 40)
    st = gradient_stats(g, ["a", "b", "c"])
    m = np.asarray(st["cosine_matrix"])
    assert np.allclose(m, m.T) and np.all(np.abs(m) <= 1)
    assert st["norm_ratio"] == pytest.approx(float(g[0].norm() / g[1].norm()), rel=1e-6)


# ----------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    data = TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(10, seed=1)), tok)
    model = tiny_llama(tok, seed=3)
    return tok, list(data), model


def _random_groups(examples, n_groups=2, seed=0):
    """n_groups disjoint random partitions of the trace tokens."""
    g = torch.Generator().manual_seed(seed)
    groups = {f"g{i}": {} for i in range(n_groups)}
    for ex in examples:
        lab = torch.as_tensor(ex["labels"])
        which = torch.randint(0, n_groups, lab.shape, generator=g)
        for i in range(n_groups):
            groups[f"g{i}"][int(ex["example_id"])] = (which == i) & (lab != -100)
    return groups


def test_group_losses_match_plain_cross_entropy(tiny):
    tok, examples, model = tiny
    groups = _random_groups(examples, 3)
    batches = make_batches(examples, groups, batch_size=4, pad_token_id=tok.pad_token_id)
    got = group_losses(model, batches)
    model.eval()
    with torch.no_grad():
        for gi, name in enumerate(groups):
            total, count = 0.0, 0
            for ex in examples:
                ids = torch.as_tensor(ex["input_ids"])[None]
                lab = torch.as_tensor(ex["labels"])
                logits = model(input_ids=ids).logits[0, :-1].double()
                ce = F.cross_entropy(logits, lab[1:].clamp_min(0), reduction="none")
                m = groups[name][int(ex["example_id"])][1:]
                total += float(ce[m].sum())
                count += int(m.sum())
            assert float(got[gi]) == pytest.approx(total / count, rel=1e-5)


def test_group_gradients_match_autograd_and_subset(tiny):
    tok, examples, model = tiny
    groups = _random_groups(examples, 2, seed=1)
    batches = make_batches(examples, groups, batch_size=3, pad_token_id=tok.pad_token_id)
    subset = parameter_subset(model, last_layers=1, head=True)
    names = [n for n, _ in subset]
    assert all("layers.0." not in n for n in names) and any("layers.1." in n for n in names)
    assert any("lm_head" in n or "embed_tokens" in n for n in names)
    grads = group_gradients(model, batches, subset)
    assert grads.shape == (2, sum(p.numel() for _, p in subset))
    assert all(p.requires_grad for p in model.parameters())          # restored
    # reference: plain logits, one group at a time, every parameter
    model.eval()
    params = [p for _, p in subset]
    for gi, name in enumerate(groups):
        total, count = 0.0, 0
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 b.labels[:, 1:].reshape(-1).clamp_min(0), reduction="none")
            m = b.masks[gi, :, 1:].reshape(-1)
            total = total + ce[m].sum()
            count += int(m.sum())
        ref = torch.cat([d.reshape(-1) for d in torch.autograd.grad(total / count, params)])
        torch.testing.assert_close(grads[gi], ref, rtol=1e-4, atol=1e-6)


def test_transfer_matrix_shape_sign_and_first_order(tiny):
    tok, examples, model = tiny
    examples = examples[:6]
    groups = _random_groups(examples, 3, seed=2)
    names = list(groups)
    batches = make_batches(examples, groups, batch_size=6, pad_token_id=tok.pad_token_id)
    subset = parameter_subset(model)
    before = [p.detach().clone() for _, p in subset]
    lr = 1e-3
    res = transfer_matrix(model, batches, names, subset, lr=lr, steps=1)
    m = np.asarray(res["matrix"])
    assert m.shape == (3, 3) and res["names"] == names
    assert np.all(np.diag(m) < 0)                          # a step on A lowers A's loss
    # sign convention: M[a, b] = L_b(after a step on a) - L_b(before) ≈ -lr <g_a, g_b>
    g = group_gradients(model, batches, subset).double()
    predicted = -lr * (g @ g.T).numpy()
    assert np.allclose(m, predicted, rtol=0.05, atol=1e-7)
    for p, q in zip([p for _, p in subset], before):
        assert torch.equal(p, q)                             # parameters restored
    k = transfer_matrix(model, batches, names, subset, lr=lr, steps=2)
    assert np.all(np.diag(np.asarray(k["matrix"])) < np.diag(m))   # more steps, lower still


def test_transfer_hand_built_groups():
    """Group A: tokens whose target is 'x'; group B: the same contexts' 'y' targets.

    One step on A raises p('x') at the shared context and so lowers A's loss and raises
    B's (the two targets compete for the same softmax)."""
    tok = make_tokenizer()
    model = tiny_llama(tok, seed=0)
    x, y = tok.convert_tokens_to_ids(["x", "y"])
    ids = torch.tensor([tok.bos_token_id, tok.convert_tokens_to_ids("a")] * 6)
    ex_a = {"example_id": 0, "input_ids": torch.cat([ids, torch.tensor([x])]),
            "labels": torch.cat([torch.full((12,), -100), torch.tensor([x])])}
    ex_b = {"example_id": 1, "input_ids": torch.cat([ids, torch.tensor([y])]),
            "labels": torch.cat([torch.full((12,), -100), torch.tensor([y])])}
    groups = {"A": {0: ex_a["labels"] != -100, 1: torch.zeros(13, dtype=torch.bool)},
              "B": {0: torch.zeros(13, dtype=torch.bool), 1: ex_b["labels"] != -100}}
    batches = make_batches([ex_a, ex_b], groups, batch_size=2)
    res = transfer_matrix(model, batches, ["A", "B"], parameter_subset(model), lr=0.05)
    m = res["matrix"]
    assert m[0][0] < 0 and m[0][1] > 0 and m[1][1] < 0 and m[1][0] > 0


def test_bad_groups_and_settings(tiny):
    tok, examples, model = tiny
    groups = _random_groups(examples, 2)
    with pytest.raises(ValueError, match="2 to 4"):
        check_groups({"only": groups["g0"]}, examples)
    with pytest.raises(ValueError, match="no trace token"):
        check_groups({**groups, "empty": {k: torch.zeros_like(v) for k, v in groups["g0"].items()}},
                     examples)
    with pytest.raises(TypeError, match="bool"):
        check_groups({"a": {k: v.float() for k, v in groups["g0"].items()}, "b": groups["g1"]},
                     examples)
    short = {k: v[:-1] for k, v in groups["g0"].items()}
    with pytest.raises(ValueError, match="labels"):
        check_groups({"a": short, "b": groups["g1"]}, examples)
    batches = make_batches(examples, groups, batch_size=4)
    subset = parameter_subset(model)
    with pytest.raises(ValueError, match="lr"):
        transfer_matrix(model, batches, ["g0", "g1"], subset, lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        transfer_matrix(model, batches, ["g0", "g1"], subset, lr=0.1, steps=0)
    with pytest.raises(ValueError, match="last_layers"):
        parameter_subset(model, last_layers=-1)
    layers = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"last_layers={layers + 1} but the model has {layers} "):
        parameter_subset(model, last_layers=layers + 1)
    every_layer = {n for n, _ in parameter_subset(model, last_layers=layers)}
    assert every_layer | {"model.embed_tokens.weight"} >= {n for n, _ in parameter_subset(model)}
    assert len(choose_examples(examples, 4, seed=1)) == 4
    assert choose_examples(examples, 4, seed=1) == choose_examples(examples, 4, seed=1)


# ----------------------------------------------------------------------------- static
def test_static_signals_match_full_logits(tiny):
    tok, examples, model = tiny
    sig = static_signals(model, examples[:4], batch_size=3, chunk=7, pad_token_id=tok.pad_token_id)
    model.eval()
    W = model.get_output_embeddings().weight.detach().double()
    rows = []
    with torch.no_grad():
        for ex in examples[:4]:
            ids = torch.as_tensor(ex["input_ids"])[None]
            out = model(input_ids=ids, output_hidden_states=True)
            h = out.hidden_states[-1][0, :-1].double()
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            lab = torch.as_tensor(ex["labels"])
            for i in torch.nonzero(lab[1:] != -100)[:, 0].tolist():
                yv = int(lab[i + 1])
                p = logp[i].exp()
                e = torch.zeros_like(p)
                e[yv] = 1
                grad_w = torch.outer(p - e, h[i])                 # ∂ℓ/∂W
                rows.append((int(ex["example_id"]), i + 1, float(logp[i, yv]),
                             float(-(p * logp[i]).sum()), float(grad_w.norm())))
    rows.sort()
    ref = np.asarray(rows)
    assert np.array_equal(sig["example_id"], ref[:, 0]) and np.array_equal(sig["position"], ref[:, 1])
    for col, name in ((2, "confidence"), (3, "entropy"), (4, "grad_norm")):
        assert np.allclose(sig[name], ref[:, col], rtol=1e-4, atol=1e-5), name
    assert W.shape[0] >= 1
    member = sig["confidence"] > np.median(sig["confidence"])
    aucs = static_auc(sig, member)
    assert aucs["confidence"]["auc"] == 1.0
    groups = {int(ex["example_id"]): torch.as_tensor(ex["labels"]) != -100 for ex in examples[:4]}
    assert member_of(sig, groups).all()


# ----------------------------------------------------------------------------- shock
def test_below_initial_by_hand():
    # 3 tokens; c0 = [-1, -1, -1]
    init = pa.table({"example_id": [0, 0, 1], "position": [1, 2, 1],
                     "logprob": np.array([-1.0, -1.0, -1.0], np.float32)})
    traj = pa.table({"step": np.array([0, 0, 1, 2, 2, 2], np.int32),
                     "example_id": [0, 0, 1, 0, 0, 7],
                     "position": np.array([1, 2, 1, 1, 1, 1], np.int32),
                     "logprob": np.array([-2.0, -0.5, -3.0, -3.0, -0.1, -9.0], np.float32)})
    out = below_initial(traj, init)
    assert out["step"].tolist() == [0, 1, 2]
    assert out["visited"].tolist() == [2, 3, 3]
    # step 0: token (0,1) below; step 1: + (1,1) below; step 2: (0,1) last row -0.1 (not below)
    assert out["fraction_below"].tolist() == pytest.approx([0.5, 2 / 3, 1 / 3])
    assert out["fraction_below_all"].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])


def test_shock_curves():
    acc = {"train_acc": {"0": 0.5, "5": 0.1, "10": 0.0, "15": 0.3}, "heldout_acc": {"0": 1.0}}
    log = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"epoch": 1}]
    c = shock_curves(acc, log)
    assert c["bottleneck_step"] == 10 and c["train_acc_at_bottleneck"] == 0.0
    assert c["loss"] == {1: 2.0, 2: 1.5}


# -------------------------------------------------------------------------------------
# What anchors are
# -------------------------------------------------------------------------------------

def test_anchor_profile_by_class_position_and_confidence():
    """A hand-counted trace: 'a1+b2 ' with Δc (+, -, +, NaN, +, -) and known θ0 confidences."""
    import math

    from tiny import make_tokenizer

    from t3s.analysis import anchor_profile, token_class
    from t3s.data import TokenTable

    tok = make_tokenizer()
    ids = [tok.convert_tokens_to_ids(ch) for ch in "a1+b2 "]
    ex = {"example_id": 7, "input_ids": [tok.bos_token_id] + ids, "labels": [-100] + ids}
    p0 = [0.1, 0.3, 0.6, 0.8, 0.95, 0.55]
    table = TokenTable([7] * 6, list(range(1, 7)),
                       delta=[0.5, -0.1, 0.2, float("nan"), 0.3, -0.4],
                       c0=[math.log(p) for p in p0])
    rows = {(r["by"], r["group"]): (r["tokens"], r["anchors"])
            for r in anchor_profile(table, [ex], tok)}
    assert rows[("token class", "words")] == (1, 1)          # a (b's Δc is NaN)
    assert rows[("token class", "digits")] == (2, 1)         # 1, 2
    assert rows[("token class", "formatting and punctuation")] == (1, 1)   # +
    assert rows[("token class", "whitespace")] == (1, 0)
    # relative positions 0, 1/6, ..., 5/6 in quarters: a 1 | + | (b) 2 | ' '
    assert [rows[("position in trace", g)] for g in ("0-25%", "25-50%", "50-75%", "75-100%")] \
        == [(2, 1), (1, 1), (1, 1), (1, 0)]
    assert [rows[("θ0 confidence", g)] for g in
            ("p in [0, 0.25)", "p in [0.25, 0.5)", "p in [0.5, 0.75)", "p in [0.75, 0.9)",
             "p in [0.9, 1]")] == [(1, 1), (1, 0), (2, 1), (0, 0), (1, 1)]
    empty = [r for r in anchor_profile(table, [ex], tok) if r["tokens"] == 0]
    assert all(r["anchor_fraction"] is None for r in empty)
    # without c0: no confidence rows; bad input is refused
    no_c0 = TokenTable([7] * 6, list(range(1, 7)), delta=table["delta"])
    assert {r["by"] for r in anchor_profile(no_c0, [ex], tok)} == {"token class",
                                                                    "position in trace"}
    with pytest.raises(ValueError, match="example_id 7"):
        anchor_profile(table, [dict(ex, example_id=8)], tok)
    with pytest.raises(ValueError, match="'delta'"):
        anchor_profile(TokenTable([7], [1], c0=[0.0]), [ex], tok)
    with pytest.raises(ValueError, match="confidence_edges"):
        anchor_profile(table, [ex], tok, confidence_edges=(0.5, 0.2))
    assert [token_class(t) for t in ("\u0120the", "\u2581", "12", "\\boxed{", "a1")] == \
        ["words", "whitespace", "digits", "formatting and punctuation",
         "formatting and punctuation"]


# -------------------------------------------------------------------------------------
# Trajectory signals besides Δc
# -------------------------------------------------------------------------------------

def test_trajectory_signals_match_full_logits():
    """Each signal against its definition on the models' own full logits (float64)."""
    from t3s.analysis import trajectory_signals

    tok = make_tokenizer()
    ds = TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(5, seed=2)), tok)
    model_0, model_b = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    sig = trajectory_signals(model_0, model_b, list(ds), batch_size=2, chunk=7,
                             pad_token_id=tok.pad_token_id)
    want = {k: [] for k in ("delta_conf", "delta_entropy", "delta_logit_grad", "kl")}
    keys = []
    with torch.no_grad():
        for ex in ds:
            ids = torch.as_tensor(ex["input_ids"])[None]
            lp0 = torch.log_softmax(model_0.eval()(ids).logits[0, :-1].double(), -1)
            lpb = torch.log_softmax(model_b.eval()(ids).logits[0, :-1].double(), -1)
            labels = torch.as_tensor(ex["labels"])[1:]
            for i in torch.nonzero(labels != -100)[:, 0].tolist():
                y = int(labels[i])
                p0, pb = lp0[i].exp(), lpb[i].exp()
                e = F.one_hot(torch.tensor(y), lp0.shape[-1]).double()
                want["delta_conf"].append(float(lpb[i, y] - lp0[i, y]))
                want["delta_entropy"].append(float(-(pb * lpb[i]).sum() + (p0 * lp0[i]).sum()))
                want["delta_logit_grad"].append(float((pb - e).norm() - (p0 - e).norm()))
                want["kl"].append(float((pb * (lpb[i] - lp0[i])).sum()))
                keys.append((int(ex["example_id"]), i + 1))
    assert list(zip(sig["example_id"].tolist(), sig["position"].tolist())) == sorted(keys)
    order = sorted(range(len(keys)), key=lambda j: keys[j])
    for name, values in want.items():
        np.testing.assert_allclose(sig[name], np.asarray(values)[order], rtol=1e-4, atol=2e-5,
                                   err_msg=name)
    same = trajectory_signals(model_0, model_0, list(ds), pad_token_id=tok.pad_token_id)
    for name in want:
        np.testing.assert_allclose(same[name], 0.0, atol=1e-6, err_msg=name)


def test_signal_agreement_hand_counted():
    from t3s.analysis import signal_agreement

    member = np.array([True, True, False, False, False])
    sig = {"up": np.array([0.9, 0.3, 0.5, 0.1, 0.2]), "down": -np.array([0.9, 0.8, 0.1, 0.2, 0.3])}
    res = signal_agreement(sig, member, names=("up", "down"))
    # up: pairs (member > non-member): 0.9 beats all 3, 0.3 beats 0.1 and 0.2 -> 5 of 6
    assert res["up"]["auc"] == pytest.approx(5 / 6) and res["up"]["direction"] == "high"
    # top 2 by 'up' are 0.9 and 0.5: one member of the two -> Jaccard 1 / 3
    assert res["up"]["overlap"] == pytest.approx(1 / 3)
    assert res["down"]["auc"] == 0.0 and res["down"]["direction"] == "low"
    assert res["down"]["separability"] == 1.0 and res["down"]["overlap"] == 1.0
