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

* Trajectory-signal rules (`entropy_change_mask`, `logit_grad_change_mask`,
  `kl_mask`) read the per-token signals of `t3s.analysis.trajectory_signals`
  (columns ``delta_entropy``, ``delta_logit_grad``, ``kl``; `SIGNAL_COLUMNS`).

Tie-breaking in the budgeted rules is by key order (example_id, then
position), so results do not depend on the row order of the input.

Plain tensors. Every rule (and `confidence_change`) also takes a torch tensor
or a numpy array of any shape S instead of a table (e.g. ``token_stats`` fields
[B, T], or a flat [T] vector) and returns the same type and shape: a bool [S]
mask (a tensor on the input's device) from the mask rules and `forced_mask`,
a float Δc [S] from `confidence_change`. An array is read as a table whose
"example" is the index along the first dimension (a 0-D or 1-D array is one
example) and whose key order is the row-major (flat) order, so
``per_example=True`` works per row and ties break by flat index. Several array
inputs of one call must have the same shape. NaN values are refused, as in
tables: select the finite entries first (``x[torch.isfinite(x)]``).

Size: over 550 lines because every rule of `RULES` lives next to the private helpers
they share (table / tensor inputs, key-order tie-breaking, budgets); a second module
would have to import those private helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import TokenTable

__all__ = [
    "confidence_change",
    "anchor_mask",
    "inverse_anchor_mask",
    "random_mask",
    "static_confidence_mask",
    "rho1_mask",
    "prob_threshold_mask",
    "entropy_change_mask",
    "logit_grad_change_mask",
    "kl_mask",
    "SIGNAL_COLUMNS",
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


#: What a rule's input may be: a keyed table, or a plain tensor / array of any shape.
Tokens = Union[TokenTable, torch.Tensor, np.ndarray]
_ARRAY_COLUMN = "value"  # the column an array becomes (any name works: it is the only one)


class _Shape:
    """How a plain tensor / array input was read, to give results back in its form."""

    def __init__(self, x, what: str):
        self.tensor = isinstance(x, torch.Tensor)
        self.device = x.device if self.tensor else None
        self.shape = tuple(x.shape)
        self.what = what

    def give_back(self, values: np.ndarray, dtype=None):
        """values [prod(shape)] (key order = flat order) as a tensor / array of the input's shape."""
        out = np.ascontiguousarray(values).reshape(self.shape)
        if dtype is not None:
            out = out.astype(dtype, copy=False)
        return torch.from_numpy(out).to(self.device) if self.tensor else out


def _as_table(x, what: str, *, like: Optional[_Shape] = None) -> Tuple[TokenTable, Optional[_Shape]]:
    """(table, None) for a TokenTable; (table, shape) for a tensor / ndarray of any shape.

    The array's keys: example_id = index along the first dimension (0 for 0-D / 1-D
    arrays), position = flat index, so key order is the flat order. ``like``: the
    shape an earlier array input of the same call had (they must match).
    """
    if isinstance(x, TokenTable):
        if like is not None:
            raise TypeError(f"{what} is a TokenTable but {like.what} is a "
                            f"{'tensor' if like.tensor else 'numpy array'}; pass the same kind")
        return x, None
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{what} must be a TokenTable, a torch tensor or a numpy array, got "
                        f"{type(x).__name__}")
    shape = _Shape(x, what)
    if like is not None and (shape.tensor != like.tensor or shape.shape != like.shape):
        raise ValueError(f"{what} ({type(x).__name__} {shape.shape}) must have the type and shape "
                         f"of {like.what} ({'tensor' if like.tensor else 'ndarray'} {like.shape})")
    if shape.tensor:
        if x.is_complex():
            raise TypeError(f"{what} must be real, got {x.dtype}")
        v = x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        if np.iscomplexobj(x):
            raise TypeError(f"{what} must be real, got {x.dtype}")
        v = np.asarray(x, dtype=np.float64).reshape(-1)
    n = v.size
    rows = shape.shape[0] if len(shape.shape) >= 2 else 1
    eid = np.repeat(np.arange(rows, dtype=np.int64), n // rows if rows else 0)
    return TokenTable(eid, np.arange(n, dtype=np.int64), {_ARRAY_COLUMN: v}, _validated=True), shape


def _column_of(column: Optional[str], shape: Optional[_Shape]) -> Optional[str]:
    """The column to read: ``column`` for tables; an array has one value column."""
    if shape is None:
        return column
    if column is not None:
        raise ValueError(f"column={column!r} names a TokenTable column; {shape.what} is an array "
                         "with one value per entry")
    return _ARRAY_COLUMN


def _mask_out(table: TokenTable, shape: Optional[_Shape], column: str):
    """A rule's output table, or its column in the input's tensor / array form."""
    return table if shape is None else shape.give_back(np.asarray(table[column]), bool)


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

def confidence_change(c0: Tokens, cb: Tokens, *, column: Optional[str] = None,
                      column_b: Optional[str] = None) -> Tokens:
    """Δc_t = c_t(θ_b) − c_t(θ_0) per token.

    c0, cb: tables of confidences (log-probs of the target token) at θ_0 and θ_b,
    one value column each (or pass ``column``/``column_b``). They must hold the
    same keys (any row order), else ValueError naming the differing keys.
    Returns a table with c0's keys and row order and float32 columns ``delta``,
    ``c0`` and ``cb``. For tensors / arrays [S] (same type and shape), returns
    Δc [S] of their (promoted) float dtype, float32 for integer inputs.
    """
    t0, s0 = _as_table(c0, "c0")
    if s0 is not None:
        tb, _ = _as_table(cb, "cb", like=s0)
        a = _values(t0, _column_of(column, s0), (), "c0")
        b = _values(tb, _column_of(column_b, s0), (), "cb")
        if s0.tensor:
            dtype = torch.promote_types(c0.dtype, cb.dtype)
            dtype = dtype if dtype.is_floating_point else torch.float32
            return (cb.detach().to(dtype) - c0.detach().to(cb.device, dtype))
        dtype = np.result_type(c0.dtype, cb.dtype)
        return s0.give_back(b - a, dtype if np.issubdtype(dtype, np.floating) else np.float32)
    a = _values(c0, column, _CONF_NAMES, "c0")
    b_table = c0.align(cb)                                  # raises when keys differ
    b = _values(b_table, column_b, _CONF_NAMES + ("cb",), "cb")
    return TokenTable(c0.example_id, c0.position,
                      {"delta": (b - a).astype(np.float32), "c0": a.astype(np.float32),
                       "cb": b.astype(np.float32)}, _validated=True)


# --------------------------------------------------------------------------------------
# Loss-mask rules
# --------------------------------------------------------------------------------------

def anchor_mask(delta: Tokens, *, threshold: float = 0.0, column: Optional[str] = None) -> Tokens:
    """The T3S AR rule: ``loss_mask = 0`` on anchors (Δc > threshold), 1 elsewhere.

    delta: table with a ``delta`` column [T]. ``threshold=0`` is the paper's rule;
    a token with Δc exactly 0 is kept. Returns ``loss_mask`` [T] bool. A
    tensor / array Δc [S] gives a bool mask [S] of the same type (True keeps).
    """
    delta, shape = _as_table(delta, "delta")
    d = _values(delta, _column_of(column, shape), _DELTA_NAMES, "delta")
    return _mask_out(_mask_table(delta, ~(d > threshold)), shape, "loss_mask")


def inverse_anchor_mask(delta: Tokens, *, threshold: float = 0.0,
                        column: Optional[str] = None) -> Tokens:
    """Inverse T3S (a baseline): train on the anchors only, ``loss_mask = (Δc > threshold)``."""
    delta, shape = _as_table(delta, "delta")
    d = _values(delta, _column_of(column, shape), _DELTA_NAMES, "delta")
    return _mask_out(_mask_table(delta, d > threshold), shape, "loss_mask")


def full_mask(keys: Tokens) -> Tokens:
    """Plain SFT: every token kept."""
    keys, shape = _as_table(keys, "keys")
    return _mask_out(_mask_table(keys, np.ones(len(keys), dtype=bool)), shape, "loss_mask")


def random_mask(keys: Tokens, *, keep_fraction: Optional[float] = None, budget: Optional[int] = None,
                like: Optional[Tokens] = None, per_example: bool = False, seed: int = 0) -> Tokens:
    """Random masking with a fixed budget (the same-budget baseline).

    keys: any table; only its keys are used. Give exactly one of
      * ``keep_fraction``: keep round(keep_fraction · T) tokens;
      * ``budget``: keep exactly this many tokens;
      * ``like``: a loss-mask table over the same keys; keep as many tokens as it
        keeps (nonzero ``loss_mask``).
    ``per_example=True`` applies the budget within each example (with ``like``:
    each example keeps as many tokens as it does there; with ``keep_fraction``:
    round(keep_fraction · n_e) per example). The draw uses ``seed`` and is
    independent of row order. Returns ``loss_mask`` [T] bool. For a tensor /
    array [S] (``like`` then a mask of the same type and shape), a bool mask
    [S]; ``per_example`` is per row (index along the first dimension).
    """
    given = sum(x is not None for x in (keep_fraction, budget, like))
    if given != 1:
        raise ValueError("give exactly one of keep_fraction, budget or like")
    keys, shape = _as_table(keys, "keys")
    if like is not None:
        like, _ = _as_table(like, "like", like=shape)
        if shape is not None:
            like = _mask_table(like, np.asarray(like[_ARRAY_COLUMN]) != 0)
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
    return _mask_out(_mask_table(keys, keep), shape, "loss_mask")


def _top_rows(values: np.ndarray, order: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices (into the table) of the k largest / smallest values, ties by key order."""
    v = values[order]
    ranked = np.argsort(-v if largest else v, kind="stable")
    return order[ranked[:k]]


def static_confidence_mask(c0: Tokens, fraction: float = 0.2, which: str = "top", *,
                           column: Optional[str] = None) -> Tokens:
    """Static baseline: mask the tokens with the highest (``which="top"``) or lowest
    (``"bottom"``) initial confidence c_t(θ_0).

    Exactly round(fraction · T) tokens get ``loss_mask = 0`` *(choice: a global
    rank over all tokens, not per example; ~20% by default)*. Returns
    ``loss_mask`` [T] bool.
    """
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    c0, shape = _as_table(c0, "c0")
    c = _values(c0, _column_of(column, shape), _CONF_NAMES, "c0")
    n_mask = _count(fraction, len(c0), "fraction")
    keep = np.ones(len(c0), dtype=bool)
    keep[_top_rows(c, _key_order(c0), n_mask, largest=(which == "top"))] = False
    return _mask_out(_mask_table(c0, keep), shape, "loss_mask")


def rho1_mask(loss_theta: Tokens, loss_ref: Tokens, keep_fraction: float, *,
              batch: Union[None, str, Sequence[int], np.ndarray, torch.Tensor] = None,
              column: Optional[str] = None, column_ref: Optional[str] = None) -> Tokens:
    """Rho-1 (arXiv 2404.07965): keep the tokens with the largest excess loss
    L_θ − L_ref, the top ``keep_fraction`` of each batch.

    loss_theta, loss_ref: per-token losses (−log p; column ``loss`` or the only
    column) of the training model and the reference model, same keys.
    batch: None ranks all tokens together; a column name of ``loss_theta`` or an
    array [T] (rows of ``loss_theta``) gives a batch id per token, and each batch
    keeps round(keep_fraction · n_batch) tokens. Returns ``loss_mask`` [T] bool
    (keys and row order of ``loss_theta``). Tensors / arrays [S] of one type
    and shape give a bool mask [S]; ``batch`` is then None or ids of shape [S].
    """
    loss_theta, shape = _as_table(loss_theta, "loss_theta")
    loss_ref, _ = _as_table(loss_ref, "loss_ref", like=shape)
    if shape is not None and batch is not None:
        if isinstance(batch, str) or tuple(np.shape(batch)) != shape.shape:
            raise ValueError(f"batch must be None or ids shaped like loss_theta {shape.shape}")
        batch = np.asarray(batch.cpu() if isinstance(batch, torch.Tensor) else batch).reshape(-1)
    lt = _values(loss_theta, _column_of(column, shape), _LOSS_NAMES, "loss_theta")
    lr = _values(loss_theta.align(loss_ref), _column_of(column_ref, shape), _LOSS_NAMES, "loss_ref")
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
    return _mask_out(_mask_table(loss_theta, keep), shape, "loss_mask")


def prob_threshold_mask(c: Tokens, threshold: Union[float, Tuple[float, float]],
                        direction: str = "higher", *, column: Optional[str] = None) -> Tokens:
    """ProFit-style selection by token probability p = exp(c).

    * ``"higher"``: keep tokens with p > threshold;
    * ``"lower"``: keep tokens with p <= threshold;
    * ``"middle"``: ``threshold = (low, high)``, keep tokens with low < p <= high
      *(choice: the band between two thresholds; with these inequalities
      lower(low), middle(low, high) and higher(high) split the tokens exactly)*.

    c: confidences (log-probs), e.g. c_t(θ_0). Returns ``loss_mask`` [T] bool.
    """
    c, shape = _as_table(c, "c")
    p = np.exp(_values(c, _column_of(column, shape), _CONF_NAMES, "c"))
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
    return _mask_out(_mask_table(c, keep), shape, "loss_mask")


# --------------------------------------------------------------------------------------
# Rules from trajectory signals (`t3s.analysis.trajectory_signals`, θ0 -> θb)
# --------------------------------------------------------------------------------------

#: rule name -> the trajectory-signal column it reads
SIGNAL_COLUMNS = {"entropy": "delta_entropy", "logit_grad": "delta_logit_grad", "kl": "kl"}


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return float(value)


def entropy_change_mask(delta_entropy: Tokens, *, threshold: float = 0.0,
                        column: Optional[str] = None) -> Tokens:
    """Drop the tokens whose predictive entropy fell from θ0 to θb: ``loss_mask = 0``
    where ΔH = H(p_θb) − H(p_θ0) < −threshold, 1 elsewhere.

    The entropy analogue of the anchor rule (confidence up ≈ entropy down): the
    pilot became surer of these positions. delta_entropy: table with a
    ``delta_entropy`` column [T]; a token with ΔH exactly −threshold is kept.
    Returns ``loss_mask`` [T] bool; a tensor / array [S] gives a bool mask [S].
    """
    threshold = _finite(threshold, "threshold")
    delta_entropy, shape = _as_table(delta_entropy, "delta_entropy")
    d = _values(delta_entropy, _column_of(column, shape), ("delta_entropy",), "delta_entropy")
    return _mask_out(_mask_table(delta_entropy, ~(d < -threshold)), shape, "loss_mask")


def logit_grad_change_mask(delta_logit_grad: Tokens, *, threshold: float = 0.0,
                           column: Optional[str] = None) -> Tokens:
    """Drop the tokens whose logit-gradient norm fell from θ0 to θb: ``loss_mask = 0``
    where Δ‖g‖ = ‖p_θb − e_y‖ − ‖p_θ0 − e_y‖ < −threshold (the tokens the pilot was
    fitting), 1 elsewhere.

    delta_logit_grad: table with a ``delta_logit_grad`` column [T]; a token with
    Δ‖g‖ exactly −threshold is kept. Returns ``loss_mask`` [T] bool; a tensor /
    array [S] gives a bool mask [S].
    """
    threshold = _finite(threshold, "threshold")
    delta_logit_grad, shape = _as_table(delta_logit_grad, "delta_logit_grad")
    d = _values(delta_logit_grad, _column_of(column, shape), ("delta_logit_grad",),
                "delta_logit_grad")
    return _mask_out(_mask_table(delta_logit_grad, ~(d < -threshold)), shape, "loss_mask")


def kl_mask(kl: Tokens, fraction: Optional[float] = None, *, budget: Optional[int] = None,
            column: Optional[str] = None) -> Tokens:
    """Drop the tokens whose predictive distribution moved most from θ0 to θb: the
    largest KL(p_θb ‖ p_θ0).

    kl: table with a ``kl`` column [T]. Give exactly one of
      * ``fraction``: drop round(fraction · T) tokens;
      * ``budget``: keep exactly this many tokens (drop T − budget), as
        `random_mask`'s ``budget`` does, so the two can be given the same budget.
    A global rank over all tokens, ties by key order (as `static_confidence_mask`).
    Returns ``loss_mask`` [T] bool; a tensor / array [S] gives a bool mask [S].
    """
    if (fraction is None) == (budget is None):
        raise ValueError("give exactly one of fraction or budget")
    kl, shape = _as_table(kl, "kl")
    v = _values(kl, _column_of(column, shape), ("kl",), "kl")
    if budget is not None:
        if not 0 <= budget <= len(kl):
            raise ValueError(f"budget must be in [0, {len(kl)}], got {budget}")
        n_drop = len(kl) - int(budget)
    else:
        n_drop = _count(fraction, len(kl), "fraction")
    keep = np.ones(len(kl), dtype=bool)
    keep[_top_rows(v, _key_order(kl), n_drop, largest=True)] = False
    return _mask_out(_mask_table(kl, keep), shape, "loss_mask")


# --------------------------------------------------------------------------------------
# Diffusion-LM forced set
# --------------------------------------------------------------------------------------

def forced_mask(delta: Tokens, tau: float = 0.2, *, column: Optional[str] = None) -> Tokens:
    """The diffusion-LM forced set S = {t : Δc_t < −τ}.

    NOT a loss mask: returns a bool column ``forced`` [T], True on the tokens that
    must be masked (corrupted) and reconstructed in addition to the usual random
    corruption. τ is on the log-prob scale; τ = 0.2 marks about 5% of tokens in
    the paper's setting. A tensor / array Δc [S] gives a bool [S] of the same
    type (True = forced).
    """
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    delta, shape = _as_table(delta, "delta")
    d = _values(delta, _column_of(column, shape), _DELTA_NAMES, "delta")
    out = TokenTable(delta.example_id, delta.position, {"forced": d < -tau}, _validated=True)
    return _mask_out(out, shape, "forced")


# --------------------------------------------------------------------------------------
# Rules by name (for re-applying a rule to a stored artifact)
# --------------------------------------------------------------------------------------

def _need_columns(rule: str, t: TokenTable, *names: str) -> None:
    """ValueError naming the first of ``names`` that the table lacks."""
    for name in names:
        if name not in t:
            raise ValueError(f"rule {rule!r} needs a {name!r} column; columns: {t.names}")


def _rule_rho1(t: TokenTable, *, keep_fraction: float, batch=None, **kw) -> TokenTable:
    _need_columns("rho1", t, "loss_theta", "loss_ref")
    return rho1_mask(t.select("loss_theta"), t.select("loss_ref"), keep_fraction, batch=batch, **kw)


def _rule_static(t: TokenTable, *, fraction: float = 0.2, which: str = "top",
                 column: str = "c0") -> TokenTable:
    return static_confidence_mask(t, fraction, which, column=column)


def _rule_signal(rule: str, mask_fn) -> Callable[..., TokenTable]:
    """A `RULES` entry reading the column ``SIGNAL_COLUMNS[rule]`` with ``mask_fn``."""
    def apply(t: TokenTable, **params) -> TokenTable:
        _need_columns(rule, t, SIGNAL_COLUMNS[rule])
        return mask_fn(t, column=SIGNAL_COLUMNS[rule], **params)
    return apply


def _rule_kl(t: TokenTable, *, fraction: Optional[float] = None,
             budget: Optional[int] = None) -> TokenTable:
    if fraction is None and budget is None:
        fraction = 0.2   # the static rule's default share *(choice)*
    return _rule_signal("kl", kl_mask)(t, fraction=fraction, budget=budget)


def _rule_prob(t: TokenTable, *, threshold, direction: str = "higher", column: str = "c0") -> TokenTable:
    return prob_threshold_mask(t, threshold, direction, column=column)


#: rule name -> function(table, **params) -> mask table. The table holds the stored
#: columns (``delta``, and ``c0``/``cb``, ``loss_theta``/``loss_ref`` or the
#: `SIGNAL_COLUMNS` when present); a rule missing its column raises ValueError.
RULES: Dict[str, Callable[..., TokenTable]] = {
    "anchor": lambda t, threshold=0.0: anchor_mask(t, threshold=threshold, column="delta"),
    "inverse_anchor": lambda t, threshold=0.0: inverse_anchor_mask(t, threshold=threshold, column="delta"),
    "sft": lambda t: full_mask(t),
    "random": lambda t, **kw: random_mask(t, **kw),
    "static": _rule_static,
    "prob_threshold": _rule_prob,
    "rho1": _rule_rho1,
    "entropy": _rule_signal("entropy", entropy_change_mask),
    "logit_grad": _rule_signal("logit_grad", logit_grad_change_mask),
    "kl": _rule_kl,
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
