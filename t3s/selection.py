"""Token selection rules: T3S and the baselines a user compares it with.

Every function takes and returns `TokenTable`s (keys ``(example_id, position)``
plus value columns; see `t3s.data`). Legend: T = number of tokens.

* Inputs: confidences c_t = log p(y_t | y_<t, x) (column ``c`` by default, any
  single column otherwise), confidence changes Δc_t (column ``delta``), per-token
  losses (column ``loss``; loss = −c).
* Loss-mask rules return a table with the input's keys (same row order) and a
  bool column ``loss_mask`` [T]: True (1) keeps a token in the loss, False (0)
  drops it. The token stays in the input either way.
* `forced_mask` is different: it returns a bool column ``forced`` [T] that marks
  the tokens a diffusion LM must *mask (corrupt) and reconstruct*; it is not a
  loss mask.

Tie-breaking in the budgeted rules is by key order (example_id, then
position), so results do not depend on the row order of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .data import TokenTable

__all__ = [
    "confidence_change",
    "anchor_mask",
    "inverse_anchor_mask",
    "random_mask",
    "static_confidence_mask",
    "rho1_mask",
    "prob_threshold_mask",
    "forced_mask",
    "full_mask",
    "apply_rule",
    "RULES",
    "SelectionSummary",
    "summarize",
]

_CONF_NAMES = ("c", "c0", "confidence", "logprob")
_DELTA_NAMES = ("delta",)
_LOSS_NAMES = ("loss",)


def _values(table: TokenTable, column: Optional[str], prefer: Sequence[str], what: str) -> np.ndarray:
    if not isinstance(table, TokenTable):
        raise TypeError(f"{what} must be a TokenTable, got {type(table).__name__}")
    name, v = table.column(column, prefer=prefer)
    v = np.asarray(v, dtype=np.float64)
    if np.isnan(v).any():
        raise ValueError(f"{what} column {name!r} has {int(np.isnan(v).sum())} NaN values")
    return v


def _key_order(table: TokenTable) -> np.ndarray:
    return np.lexsort((table.position, table.example_id))


def _count(fraction: float, n: int, what: str) -> int:
    """round(fraction * n), halves rounded up *(choice)*."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {fraction}")
    return min(n, int(math.floor(fraction * n + 0.5)))


def _mask_table(table: TokenTable, keep: np.ndarray) -> TokenTable:
    return TokenTable(table.example_id, table.position, {"loss_mask": keep.astype(bool)}, _validated=True)


# --------------------------------------------------------------------------------------
# Confidence change
# --------------------------------------------------------------------------------------

def confidence_change(c0: TokenTable, cb: TokenTable, *, column: Optional[str] = None,
                      column_b: Optional[str] = None) -> TokenTable:
    """Δc_t = c_t(θ_b) − c_t(θ_0) per token.

    c0, cb: tables of confidences (log-probs of the target token) at θ_0 and θ_b,
    one value column each (or pass ``column``/``column_b``). They must hold the
    same keys (any row order), else ValueError naming the differing keys.
    Returns a table with c0's keys and row order and float32 columns ``delta``,
    ``c0`` and ``cb``.
    """
    a = _values(c0, column, _CONF_NAMES, "c0")
    b_table = c0.align(cb)                                  # raises when keys differ
    b = _values(b_table, column_b, _CONF_NAMES + ("cb",), "cb")
    return TokenTable(c0.example_id, c0.position,
                      {"delta": (b - a).astype(np.float32), "c0": a.astype(np.float32),
                       "cb": b.astype(np.float32)}, _validated=True)


# --------------------------------------------------------------------------------------
# Loss-mask rules
# --------------------------------------------------------------------------------------

def anchor_mask(delta: TokenTable, *, threshold: float = 0.0, column: Optional[str] = None) -> TokenTable:
    """The T3S AR rule: ``loss_mask = 0`` on anchors (Δc > threshold), 1 elsewhere.

    delta: table with a ``delta`` column [T]. ``threshold=0`` is the paper's rule;
    a token with Δc exactly 0 is kept. Returns ``loss_mask`` [T] bool.
    """
    d = _values(delta, column, _DELTA_NAMES, "delta")
    return _mask_table(delta, ~(d > threshold))


def inverse_anchor_mask(delta: TokenTable, *, threshold: float = 0.0,
                        column: Optional[str] = None) -> TokenTable:
    """Inverse T3S (a baseline): train on the anchors only, ``loss_mask = (Δc > threshold)``."""
    d = _values(delta, column, _DELTA_NAMES, "delta")
    return _mask_table(delta, d > threshold)


def full_mask(keys: TokenTable) -> TokenTable:
    """Plain SFT: every token kept."""
    return _mask_table(keys, np.ones(len(keys), dtype=bool))


def random_mask(keys: TokenTable, *, keep_fraction: Optional[float] = None, budget: Optional[int] = None,
                like: Optional[TokenTable] = None, per_example: bool = False, seed: int = 0) -> TokenTable:
    """Random masking with a fixed budget (the same-budget baseline).

    keys: any table; only its keys are used. Give exactly one of
      * ``keep_fraction``: keep round(keep_fraction · T) tokens;
      * ``budget``: keep exactly this many tokens;
      * ``like``: a loss-mask table over the same keys; keep as many tokens as it
        keeps (nonzero ``loss_mask``).
    ``per_example=True`` applies the budget within each example (with ``like``:
    each example keeps as many tokens as it does there; with ``keep_fraction``:
    round(keep_fraction · n_e) per example). The draw uses ``seed`` and is
    independent of row order. Returns ``loss_mask`` [T] bool.
    """
    given = sum(x is not None for x in (keep_fraction, budget, like))
    if given != 1:
        raise ValueError("give exactly one of keep_fraction, budget or like")
    rng = np.random.default_rng(seed)
    order = _key_order(keys)
    sorted_eid = keys.example_id[order]
    keep_sorted = np.zeros(len(keys), dtype=bool)
    if not per_example:
        if like is not None:
            n_keep = int(np.count_nonzero(keys.align(like)["loss_mask"]))
        elif budget is not None:
            if not 0 <= budget <= len(keys):
                raise ValueError(f"budget must be in [0, {len(keys)}], got {budget}")
            n_keep = int(budget)
        else:
            n_keep = _count(keep_fraction, len(keys), "keep_fraction")
        keep_sorted[rng.permutation(len(keys))[:n_keep]] = True
    else:
        if budget is not None:
            raise ValueError("per_example=True takes keep_fraction or like, not budget")
        like_sorted = None
        if like is not None:
            like_sorted = np.asarray(keys.align(like)["loss_mask"])[order] != 0
        bounds = np.flatnonzero(np.diff(sorted_eid)) + 1
        starts = np.concatenate([[0], bounds]).astype(int)
        ends = np.concatenate([bounds, [len(keys)]]).astype(int)
        for s, e in zip(starts, ends):
            n = e - s
            k = int(like_sorted[s:e].sum()) if like_sorted is not None else _count(keep_fraction, n,
                                                                                   "keep_fraction")
            keep_sorted[s + rng.permutation(n)[:k]] = True
    keep = np.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return _mask_table(keys, keep)


def _top_rows(values: np.ndarray, order: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices (into the table) of the k largest / smallest values, ties by key order."""
    v = values[order]
    ranked = np.argsort(-v if largest else v, kind="stable")
    return order[ranked[:k]]


def static_confidence_mask(c0: TokenTable, fraction: float = 0.2, which: str = "top", *,
                           column: Optional[str] = None) -> TokenTable:
    """Static baseline: mask the tokens with the highest (``which="top"``) or lowest
    (``"bottom"``) initial confidence c_t(θ_0).

    Exactly round(fraction · T) tokens get ``loss_mask = 0`` *(choice: a global
    rank over all tokens, not per example; ~20% by default)*. Returns
    ``loss_mask`` [T] bool.
    """
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    c = _values(c0, column, _CONF_NAMES, "c0")
    n_mask = _count(fraction, len(c0), "fraction")
    keep = np.ones(len(c0), dtype=bool)
    keep[_top_rows(c, _key_order(c0), n_mask, largest=(which == "top"))] = False
    return _mask_table(c0, keep)


def rho1_mask(loss_theta: TokenTable, loss_ref: TokenTable, keep_fraction: float, *,
              batch: Union[None, str, Sequence[int], np.ndarray] = None,
              column: Optional[str] = None, column_ref: Optional[str] = None) -> TokenTable:
    """Rho-1 (arXiv 2404.07965): keep the tokens with the largest excess loss
    L_θ − L_ref, the top ``keep_fraction`` of each batch.

    loss_theta, loss_ref: per-token losses (−log p; column ``loss`` or the only
    column) of the training model and the reference model, same keys.
    batch: None ranks all tokens together; a column name of ``loss_theta`` or an
    array [T] (rows of ``loss_theta``) gives a batch id per token, and each batch
    keeps round(keep_fraction · n_batch) tokens. Returns ``loss_mask`` [T] bool
    (keys and row order of ``loss_theta``).
    """
    lt = _values(loss_theta, column, _LOSS_NAMES, "loss_theta")
    lr = _values(loss_theta.align(loss_ref), column_ref, _LOSS_NAMES, "loss_ref")
    excess = lt - lr
    if batch is None:
        groups = np.zeros(len(loss_theta), dtype=np.int64)
    elif isinstance(batch, str):
        groups = np.asarray(loss_theta[batch])
    else:
        groups = np.asarray(batch)
        if groups.shape != (len(loss_theta),):
            raise ValueError(f"batch has shape {groups.shape}, expected ({len(loss_theta)},)")
    keep = np.zeros(len(loss_theta), dtype=bool)
    order = _key_order(loss_theta)
    for g in np.unique(groups):
        rows = order[groups[order] == g]
        k = _count(keep_fraction, rows.size, "keep_fraction")
        keep[_top_rows(excess, rows, k, largest=True)] = True
    return _mask_table(loss_theta, keep)


def prob_threshold_mask(c: TokenTable, threshold: Union[float, Tuple[float, float]],
                        direction: str = "higher", *, column: Optional[str] = None) -> TokenTable:
    """ProFit-style selection by token probability p = exp(c).

    * ``"higher"``: keep tokens with p > threshold;
    * ``"lower"``: keep tokens with p <= threshold;
    * ``"middle"``: ``threshold = (low, high)``, keep tokens with low < p <= high
      *(choice: the band between two thresholds; with these inequalities
      lower(low), middle(low, high) and higher(high) split the tokens exactly)*.

    c: confidences (log-probs), e.g. c_t(θ_0). Returns ``loss_mask`` [T] bool.
    """
    p = np.exp(_values(c, column, _CONF_NAMES, "c"))
    if direction == "middle":
        try:
            low, high = threshold  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError("direction='middle' takes threshold=(low, high)") from None
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got ({low}, {high})")
        keep = (p > low) & (p <= high)
    elif direction in ("higher", "lower"):
        if not isinstance(threshold, (int, float, np.floating)):
            raise ValueError(f"direction={direction!r} takes one float threshold")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        keep = p > threshold if direction == "higher" else p <= threshold
    else:
        raise ValueError(f"direction must be 'higher', 'lower' or 'middle', got {direction!r}")
    return _mask_table(c, keep)


# --------------------------------------------------------------------------------------
# Diffusion-LM forced set
# --------------------------------------------------------------------------------------

def forced_mask(delta: TokenTable, tau: float = 0.2, *, column: Optional[str] = None) -> TokenTable:
    """The diffusion-LM forced set S = {t : Δc_t < −τ}.

    NOT a loss mask: returns a bool column ``forced`` [T], True on the tokens that
    must be masked (corrupted) and reconstructed in addition to the usual random
    corruption. τ is on the log-prob scale; τ = 0.2 marks about 5% of tokens in
    the paper's setting.
    """
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    d = _values(delta, column, _DELTA_NAMES, "delta")
    return TokenTable(delta.example_id, delta.position, {"forced": d < -tau}, _validated=True)


# --------------------------------------------------------------------------------------
# Rules by name (for re-applying a rule to a stored artifact)
# --------------------------------------------------------------------------------------

def _rule_rho1(t: TokenTable, *, keep_fraction: float, batch=None, **kw) -> TokenTable:
    for name in ("loss_theta", "loss_ref"):
        if name not in t:
            raise ValueError(f"rule 'rho1' needs a {name!r} column; columns: {t.names}")
    return rho1_mask(t.select("loss_theta"), t.select("loss_ref"), keep_fraction, batch=batch, **kw)


def _rule_static(t: TokenTable, *, fraction: float = 0.2, which: str = "top",
                 column: str = "c0") -> TokenTable:
    return static_confidence_mask(t, fraction, which, column=column)


def _rule_prob(t: TokenTable, *, threshold, direction: str = "higher", column: str = "c0") -> TokenTable:
    return prob_threshold_mask(t, threshold, direction, column=column)


#: rule name -> function(table, **params) -> mask table. The table holds the stored
#: columns (``delta``, and ``c0``/``cb`` when present).
RULES: Dict[str, Callable[..., TokenTable]] = {
    "anchor": lambda t, threshold=0.0: anchor_mask(t, threshold=threshold, column="delta"),
    "inverse_anchor": lambda t, threshold=0.0: inverse_anchor_mask(t, threshold=threshold, column="delta"),
    "sft": lambda t: full_mask(t),
    "random": lambda t, **kw: random_mask(t, **kw),
    "static": _rule_static,
    "prob_threshold": _rule_prob,
    "rho1": _rule_rho1,
    "forced": lambda t, tau=0.2: forced_mask(t, tau, column="delta"),
}


def apply_rule(rule: str, table: TokenTable, **params) -> TokenTable:
    """Apply the rule named ``rule`` (a key of `RULES`) with ``params`` to ``table``.

    Returns the rule's output table (``loss_mask``, or ``forced`` for ``"forced"``).
    ``"random"`` with ``like="anchor"`` (or another rule name) draws the same
    budget as that rule would keep with default parameters.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")
    if rule == "random" and isinstance(params.get("like"), str):
        params = dict(params)
        params["like"] = apply_rule(params["like"], table)
    try:
        return RULES[rule](table, **params)
    except TypeError as e:
        raise ValueError(f"bad parameters for rule {rule!r}: {e}") from None


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------

_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


@dataclass
class SelectionSummary:
    """What a selection does, in numbers.

    ``n_masked``/``fraction_masked`` count dropped tokens (``loss_mask == 0``) or,
    for a ``forced`` table, forced tokens. ``quantiles``: q -> Δc quantile.
    ``histogram``: (bin edges [bins+1], counts [bins]) of Δc.
    """

    n_tokens: int
    n_examples: int
    n_masked: Optional[int]
    fraction_masked: Optional[float]
    mask_kind: Optional[str]
    fraction_positive: float
    mean: float
    std: float
    quantiles: Dict[float, float]
    histogram: Tuple[np.ndarray, np.ndarray]
    mean_delta_masked: Optional[float] = None
    mean_delta_kept: Optional[float] = None
    per_example_fraction_masked: Dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        lines = [f"SelectionSummary: {self.n_tokens} tokens in {self.n_examples} examples"]
        if self.n_masked is not None:
            what = "forced" if self.mask_kind == "forced" else "masked (loss_mask=0)"
            lines.append(f"  {what}: {self.n_masked} ({100 * self.fraction_masked:.1f}%)")
            pe = self.per_example_fraction_masked
            if pe:
                lines.append(f"  per example: min {100 * pe['min']:.1f}%  median {100 * pe['median']:.1f}%"
                             f"  max {100 * pe['max']:.1f}%")
            if self.mean_delta_masked is not None and self.mean_delta_kept is not None:
                lines.append(f"  mean Δc: {self.mean_delta_masked:+.4f} on {what.split()[0]}, "
                             f"{self.mean_delta_kept:+.4f} on the rest")
        lines.append(f"  Δc > 0: {100 * self.fraction_positive:.1f}%   mean {self.mean:+.4f}"
                     f"   std {self.std:.4f}")
        lines.append("  quantiles: " + "  ".join(f"q{int(q * 100):02d}={v:+.3f}"
                                                for q, v in self.quantiles.items()))
        edges, counts = self.histogram
        if counts.size and counts.max() > 0:
            width = 40
            for i, cnt in enumerate(counts):
                bar = "#" * int(round(width * cnt / counts.max()))
                lines.append(f"  [{edges[i]:+8.3f}, {edges[i + 1]:+8.3f}) {cnt:>9d} {bar}")
        return "\n".join(lines)

    __str__ = __repr__


def summarize(delta: TokenTable, mask: Optional[TokenTable] = None, *, column: Optional[str] = None,
              bins: int = 20) -> SelectionSummary:
    """Statistics of Δc and of a mask over the same keys.

    delta: table with a ``delta`` column; mask: a table with ``loss_mask`` (dropped
    tokens count as masked) or ``forced`` (forced tokens count as masked), matched
    to ``delta`` by key.
    """
    d = _values(delta, column, _DELTA_NAMES, "delta")
    n = d.size
    if n:
        qs = {q: float(v) for q, v in zip(_QUANTILES, np.quantile(d, _QUANTILES))}
        counts, edges = np.histogram(d, bins=bins)
        mean, std, pos = float(d.mean()), float(d.std()), float((d > 0).mean())
    else:
        qs, counts, edges = {}, np.zeros(0, np.int64), np.zeros(0)
        mean = std = pos = float("nan")
    s = SelectionSummary(n_tokens=n, n_examples=int(delta.example_ids.size), n_masked=None,
                         fraction_masked=None, mask_kind=None, fraction_positive=pos, mean=mean, std=std,
                         quantiles=qs, histogram=(edges, counts))
    if mask is not None:
        m = delta.align(mask)
        if "loss_mask" in m:
            masked, kind = np.asarray(m["loss_mask"]) == 0, "loss_mask"
        elif "forced" in m:
            masked, kind = np.asarray(m["forced"]).astype(bool), "forced"
        else:
            raise ValueError(f"mask table needs a 'loss_mask' or 'forced' column; columns: {m.names}")
        s.mask_kind = kind
        s.n_masked = int(masked.sum())
        s.fraction_masked = s.n_masked / n if n else float("nan")
        if masked.any():
            s.mean_delta_masked = float(d[masked].mean())
        if (~masked).any():
            s.mean_delta_kept = float(d[~masked].mean())
        if n:
            _, inv = np.unique(delta.example_id, return_inverse=True)
            frac = np.bincount(inv, weights=masked.astype(np.float64)) / np.bincount(inv)
            s.per_example_fraction_masked = {"min": float(frac.min()), "median": float(np.median(frac)),
                                             "max": float(frac.max())}
    return s
