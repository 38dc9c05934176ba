"""Selection rules (t3s.selection)."""

import math

import numpy as np
import pytest
import torch

from t3s.data import TokenTable
from t3s.selection import (
    RULES,
    anchor_mask,
    apply_rule,
    confidence_change,
    forced_mask,
    full_mask,
    inverse_anchor_mask,
    prob_threshold_mask,
    random_mask,
    rho1_mask,
    static_confidence_mask,
    summarize,
)


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def random_keys(rng, n_examples=12, max_len=40):
    eids, poss = [], []
    for e in rng.choice(10**9, n_examples, replace=False):
        n = int(rng.integers(1, max_len))
        start = int(rng.integers(1, 20))
        eids.append(np.full(n, e))
        poss.append(np.arange(start, start + n))
    return TokenTable(np.concatenate(eids), np.concatenate(poss))


def table(eid, pos, **cols):
    return TokenTable(np.asarray(eid), np.asarray(pos), cols)


def shuffled(t, rng):
    return t.take(rng.permutation(len(t)))


# -------------------------------------------------------------------------------------
# Δc and the anchor rule
# -------------------------------------------------------------------------------------

def test_confidence_change_matches_by_key(rng):
    keys = random_keys(rng)
    c0 = keys.with_columns(c=-rng.exponential(size=len(keys)))
    cb_vals = -rng.exponential(size=len(keys))
    cb = shuffled(keys.with_columns(c=cb_vals), rng)          # other row order
    d = confidence_change(c0, cb)
    assert d.same_keys(keys) and np.array_equal(d.example_id, keys.example_id)
    np.testing.assert_allclose(d["delta"], cb_vals - c0["c"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d["cb"], cb_vals, rtol=1e-6)
    with pytest.raises(ValueError, match="token keys differ"):
        confidence_change(c0, cb.take(np.arange(1, len(cb))))
    moved = TokenTable(cb.example_id, cb.position + 1000, c=cb["c"])
    with pytest.raises(ValueError, match="keys only in"):
        confidence_change(c0, moved)
    nan = c0["c"].copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        confidence_change(keys.with_columns(c=nan), cb)


def test_confidence_change_from_store_like_arrow_tables(rng):
    import pyarrow as pa
    n = 9
    eid, pos = np.repeat([3, 8, 1], 3), np.tile([4, 5, 6], 3)
    lp0, lpb = -rng.exponential(size=n), -rng.exponential(size=n)
    back = rng.permutation(n)
    t0 = pa.table({"step": pa.array(np.zeros(n, np.int64)), "example_id": eid,
                   "position": pa.array(pos, pa.int32()), "logprob": pa.array(lp0, pa.float32())})
    tb = pa.table({"step": pa.array(np.full(n, 30)), "example_id": eid[back],
                   "position": pa.array(pos[back], pa.int32()), "logprob": pa.array(lpb[back], pa.float32())})
    d = confidence_change(TokenTable.from_arrow(t0), TokenTable.from_arrow(tb))   # picks 'logprob'
    np.testing.assert_allclose(d["delta"], (lpb.astype(np.float32) - lp0.astype(np.float32)), atol=1e-6)


def test_anchor_rule_hand_computed():
    c0 = table([7] * 6, range(2, 8), c=[-1.0, -0.5, -2.0, -0.3, -0.3, -4.0])
    cb = table([7] * 6, range(2, 8), c=[-0.5, -0.7, -2.0, -0.3 + 1e-3, -0.4, -1.0])
    d = confidence_change(c0, cb)
    # Δc = [+0.5, -0.2, 0, +0.001, -0.1, +3.0]: anchors (Δc > 0) leave the loss
    assert anchor_mask(d)["loss_mask"].tolist() == [False, True, True, False, True, False]
    assert inverse_anchor_mask(d)["loss_mask"].tolist() == [True, False, False, True, False, True]
    assert anchor_mask(d, threshold=0.4)["loss_mask"].tolist() == [False, True, True, True, True, False]
    assert full_mask(d)["loss_mask"].all()


def test_anchor_and_inverse_partition(rng):
    keys = random_keys(rng)
    d = keys.with_columns(delta=rng.normal(size=len(keys)))
    a, b = anchor_mask(d)["loss_mask"], inverse_anchor_mask(d)["loss_mask"]
    assert np.array_equal(a, ~b)
    assert np.array_equal(a, d["delta"] <= 0)


# -------------------------------------------------------------------------------------
# budgets
# -------------------------------------------------------------------------------------

def test_random_mask_same_budget(rng):
    keys = random_keys(rng, 20)
    d = keys.with_columns(delta=rng.normal(0.3, 1, size=len(keys)))
    ar = anchor_mask(d)
    seed = int(rng.integers(1 << 30))
    r = random_mask(keys, like=ar, seed=seed)
    assert r["loss_mask"].sum() == ar["loss_mask"].sum()
    # independent of row order, reproducible, and seed-dependent
    perm = rng.permutation(len(keys))
    r_shuf = random_mask(keys.take(perm), like=shuffled(ar, rng), seed=seed)
    assert np.array_equal(keys.align(r_shuf)["loss_mask"], r["loss_mask"])
    r2 = random_mask(keys, like=ar, seed=seed + 1)
    assert not np.array_equal(r2["loss_mask"], r["loss_mask"])
    assert random_mask(keys, budget=17, seed=seed)["loss_mask"].sum() == 17
    n = len(keys)
    assert random_mask(keys, keep_fraction=0.3, seed=seed)["loss_mask"].sum() == math.floor(0.3 * n + 0.5)
    # per example: every example keeps as many as under the anchor mask
    pe = random_mask(keys, like=ar, per_example=True, seed=seed)
    for e in keys.example_ids:
        sel = keys.example_id == e
        assert pe["loss_mask"][sel].sum() == ar["loss_mask"][sel].sum()
    with pytest.raises(ValueError, match="exactly one"):
        random_mask(keys, budget=3, keep_fraction=0.5)
    with pytest.raises(ValueError, match="budget"):
        random_mask(keys, budget=n + 1)


@pytest.mark.parametrize("which", ["top", "bottom"])
def test_static_confidence_mask_masks_20_percent(rng, which):
    keys = random_keys(rng, 15)
    c0 = keys.with_columns(c0=-rng.exponential(size=len(keys)))
    m = static_confidence_mask(c0, which=which)["loss_mask"]
    n = len(keys)
    assert (~m).sum() == math.floor(0.2 * n + 0.5)
    masked, kept = c0["c0"][~m], c0["c0"][m]
    if which == "top":
        assert masked.min() >= kept.max()
    else:
        assert masked.max() <= kept.min()
    m5 = static_confidence_mask(c0, fraction=0.5, which=which)["loss_mask"]
    assert (~m5).sum() == math.floor(0.5 * n + 0.5)
    with pytest.raises(ValueError, match="which"):
        static_confidence_mask(c0, which="middle")


def test_static_hand_computed():
    c0 = table([1] * 5, range(5), c0=[-0.1, -3.0, -0.5, -2.0, -1.0])
    assert static_confidence_mask(c0, 0.4, "top")["loss_mask"].tolist() == [False, True, False, True, True]
    assert static_confidence_mask(c0, 0.4, "bottom")["loss_mask"].tolist() == [True, False, True, False, True]


def test_rho1_top_k_per_batch(rng):
    keys = random_keys(rng, 16)
    n = len(keys)
    lt = keys.with_columns(loss=rng.exponential(size=n), batch=rng.integers(0, 4, n))
    lr = shuffled(keys.with_columns(loss=rng.exponential(size=n)), rng)
    excess = lt["loss"] - keys.align(lr)["loss"]
    k = float(rng.uniform(0.2, 0.8))
    m = rho1_mask(lt.select("loss"), lr, k, batch=lt["batch"])["loss_mask"]
    m_named = rho1_mask(lt, lr, k, batch="batch", column="loss")["loss_mask"]
    assert np.array_equal(m, m_named)
    for b in np.unique(lt["batch"]):
        sel = lt["batch"] == b
        assert m[sel].sum() == math.floor(k * sel.sum() + 0.5)
        if m[sel].any() and (~m[sel]).any():
            assert excess[sel][m[sel]].min() >= excess[sel][~m[sel]].max()
    g = rho1_mask(lt.select("loss"), lr, k)["loss_mask"]
    assert g.sum() == math.floor(k * n + 0.5)
    assert excess[g].min() >= excess[~g].max()


def test_rho1_hand_computed():
    lt = table([0, 0, 0, 0], [1, 2, 3, 4], loss=[1.0, 2.0, 3.0, 4.0])
    lr = table([0, 0, 0, 0], [4, 3, 2, 1], loss=[0.5, 3.0, 0.0, 0.0])   # keyed in another order
    # excess = [1-0, 2-0, 3-3, 4-0.5] = [1, 2, 0, 3.5]
    assert rho1_mask(lt, lr, 0.5)["loss_mask"].tolist() == [False, True, False, True]
    assert rho1_mask(lt, lr, 0.5, batch=[0, 0, 1, 1])["loss_mask"].tolist() == [False, True, False, True]
    assert rho1_mask(lt, lr, 0.5, batch=[0, 1, 0, 1])["loss_mask"].tolist() == [True, False, False, True]


def test_prob_threshold_directions(rng):
    keys = random_keys(rng)
    c = keys.with_columns(c=np.log(rng.uniform(1e-4, 1, size=len(keys))))
    p = np.exp(c["c"])
    lo, hi = sorted(rng.uniform(0.05, 0.95, 2))
    higher = prob_threshold_mask(c, hi, "higher")["loss_mask"]
    lower = prob_threshold_mask(c, lo, "lower")["loss_mask"]
    middle = prob_threshold_mask(c, (lo, hi), "middle")["loss_mask"]
    assert np.array_equal(higher, p > hi) and np.array_equal(lower, p <= lo)
    assert np.array_equal(middle, (p > lo) & (p <= hi))
    # lower(lo), middle(lo, hi), higher(hi) split the tokens exactly
    assert np.array_equal(higher.astype(int) + lower + middle, np.ones(len(keys), dtype=int))
    assert np.array_equal(prob_threshold_mask(c, hi, "lower")["loss_mask"], ~higher)
    hand = table([3] * 3, [1, 2, 3], c=np.log([0.9, 0.5, 0.1]))
    assert prob_threshold_mask(hand, 0.6, "higher")["loss_mask"].tolist() == [True, False, False]
    assert prob_threshold_mask(hand, (0.2, 0.6), "middle")["loss_mask"].tolist() == [False, True, False]
    with pytest.raises(ValueError, match="direction"):
        prob_threshold_mask(c, 0.5, "sideways")
    with pytest.raises(ValueError, match=r"\(low, high\)"):
        prob_threshold_mask(c, 0.5, "middle")
    with pytest.raises(ValueError, match="probability"):
        prob_threshold_mask(c, -0.5, "higher")


# -------------------------------------------------------------------------------------
# forced set
# -------------------------------------------------------------------------------------

def test_forced_mask_tau():
    d = table([1] * 6, range(6), delta=[-0.5, -0.2, -0.21, -0.05, 0.0, 0.7])
    f = forced_mask(d)
    assert f.names == ["forced"]                         # not a loss mask
    assert f["forced"].tolist() == [True, False, True, False, False, False]
    assert forced_mask(d, tau=0.0)["forced"].tolist() == [True, True, True, True, False, False]
    assert forced_mask(d, tau=0.4)["forced"].tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match="finite"):
        forced_mask(d, tau=float("nan"))


def test_forced_mask_random(rng):
    keys = random_keys(rng)
    d = keys.with_columns(delta=rng.normal(size=len(keys)))
    tau = float(rng.uniform(0, 1))
    f = forced_mask(d, tau)["forced"]
    assert np.array_equal(f, d["delta"] < -tau)
    # a larger tau forces a subset
    assert not (forced_mask(d, tau + 0.3)["forced"] & ~f).any()


# -------------------------------------------------------------------------------------
# rules by name and summary
# -------------------------------------------------------------------------------------

def test_apply_rule_matches_functions(rng):
    keys = random_keys(rng)
    t = keys.with_columns(delta=rng.normal(size=len(keys)), c0=-rng.exponential(size=len(keys)))
    assert np.array_equal(apply_rule("anchor", t, threshold=0.1)["loss_mask"],
                          anchor_mask(t, threshold=0.1, column="delta")["loss_mask"])
    assert np.array_equal(apply_rule("static", t, fraction=0.3)["loss_mask"],
                          static_confidence_mask(t, 0.3, column="c0")["loss_mask"])
    assert np.array_equal(apply_rule("forced", t, tau=0.3)["forced"], t["delta"] < -0.3)
    r = apply_rule("random", t, like="anchor", seed=3)["loss_mask"]
    assert r.sum() == (t["delta"] <= 0).sum()
    assert {"anchor", "inverse_anchor", "random", "static", "prob_threshold", "rho1", "forced",
            "sft"} <= set(RULES)
    with pytest.raises(ValueError, match="unknown rule"):
        apply_rule("nope", t)
    with pytest.raises(ValueError, match="bad parameters"):
        apply_rule("anchor", t, tau=0.2)
    with pytest.raises(ValueError, match="loss_theta"):
        apply_rule("rho1", t, keep_fraction=0.5)


def test_summarize(rng):
    keys = random_keys(rng, 10)
    d = keys.with_columns(delta=rng.normal(0.2, 1, size=len(keys)))
    m = anchor_mask(d)
    s = summarize(d, shuffled(m, rng))
    n_anchor = int((d["delta"] > 0).sum())
    assert s.n_tokens == len(keys) and s.n_examples == 10
    assert s.n_masked == n_anchor
    assert s.fraction_masked == pytest.approx(n_anchor / len(keys))
    assert s.fraction_positive == pytest.approx(n_anchor / len(keys))
    assert s.quantiles[0.5] == pytest.approx(np.median(d["delta"]))
    assert s.histogram[1].sum() == len(keys)
    assert s.mean_delta_masked > 0 >= s.mean_delta_kept
    text = repr(s)
    assert f"{n_anchor} (" in text and "quantiles" in text
    f = summarize(d, forced_mask(d, 0.2))
    assert f.mask_kind == "forced" and f.n_masked == int((d["delta"] < -0.2).sum())
    assert "forced" in repr(f)
    assert summarize(d).n_masked is None


# -------------------------------------------------------------------------------------
# plain tensors / arrays
# -------------------------------------------------------------------------------------

def _flat_table(x, rows, **cols):
    """The TokenTable an array [S] stands for: example = row, position = flat index."""
    n = int(np.prod(x.shape))
    eid = np.repeat(np.arange(rows), n // rows) if rows else np.zeros(0, np.int64)
    return TokenTable(eid, np.arange(n), **{k: np.reshape(v, -1) for k, v in cols.items()})


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_rules_on_arrays_match_the_table_form(rng, kind):
    shape = (int(rng.integers(2, 5)), int(rng.integers(3, 9)))
    if rng.random() < 0.3:
        shape = (int(np.prod(shape)),)  # a flat vector: one example
    rows = shape[0] if len(shape) == 2 else 1
    delta = rng.normal(0, 0.3, shape)
    delta.flat[rng.integers(0, delta.size)] = 0.0            # exactly 0 is kept
    c0 = -rng.exponential(1.0, shape)
    cb = c0 + delta
    conv = (lambda a: torch.from_numpy(a).float()) if kind == "tensor" else (lambda a: a)
    d_t, c0_t, cb_t = conv(delta), conv(c0), conv(cb)
    table = _flat_table(delta, rows, delta=delta, c0=c0, cb=cb)

    def same(got, want_table, column):
        assert isinstance(got, torch.Tensor if kind == "tensor" else np.ndarray)
        assert tuple(got.shape) == shape
        assert got.dtype == (torch.bool if kind == "tensor" else np.bool_)
        got = got.numpy() if kind == "tensor" else got
        np.testing.assert_array_equal(got.reshape(-1), np.asarray(want_table[column]))

    same(anchor_mask(d_t), anchor_mask(table.select("delta")), "loss_mask")
    same(anchor_mask(d_t, threshold=0.1), anchor_mask(table.select("delta"), threshold=0.1),
         "loss_mask")
    same(inverse_anchor_mask(d_t), inverse_anchor_mask(table.select("delta")), "loss_mask")
    same(forced_mask(d_t, 0.2), forced_mask(table.select("delta"), 0.2), "forced")
    same(full_mask(d_t), full_mask(table), "loss_mask")
    same(static_confidence_mask(c0_t, 0.3), static_confidence_mask(table.select("c0"), 0.3),
         "loss_mask")
    same(prob_threshold_mask(c0_t, 0.4), prob_threshold_mask(table.select("c0"), 0.4),
         "loss_mask")
    same(rho1_mask(-cb_t, -c0_t, 0.5),
         rho1_mask(_flat_table(delta, rows, loss=-cb), _flat_table(delta, rows, loss=-c0), 0.5),
         "loss_mask")
    for per_example in (False, True):
        same(random_mask(d_t, keep_fraction=0.4, per_example=per_example, seed=3),
             random_mask(table, keep_fraction=0.4, per_example=per_example, seed=3), "loss_mask")
    like = anchor_mask(d_t)
    drawn = random_mask(d_t, like=like, seed=1)
    assert int(drawn.sum()) == int(like.sum())

    got = confidence_change(c0_t, cb_t)
    assert type(got) is type(d_t) and tuple(got.shape) == shape
    want = confidence_change(table.select("c0"), table.select("cb"))["delta"]
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=0, atol=1e-6)


def test_arrays_keep_device_and_dtype():
    d = torch.randn(4, 6, dtype=torch.float64)
    assert confidence_change(torch.zeros_like(d), d).dtype == torch.float64
    assert confidence_change(np.zeros(3, np.int64), np.ones(3, np.int64)).dtype == np.float32
    assert confidence_change(d.float(), d.float()).dtype == torch.float32
    assert anchor_mask(d.bfloat16()).device == d.device


def test_array_inputs_bad():
    d = torch.randn(3, 4)
    d[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        anchor_mask(d)
    with pytest.raises(ValueError, match="NaN"):
        forced_mask(d.numpy())
    with pytest.raises(TypeError, match="TokenTable, a torch tensor or a numpy array"):
        anchor_mask([0.1, -0.2])
    with pytest.raises(ValueError, match="type and shape"):
        confidence_change(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="type and shape"):
        confidence_change(torch.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="column="):
        anchor_mask(torch.zeros(3), column="delta")
