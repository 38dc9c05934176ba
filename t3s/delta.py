"""Δc = c_t(θ_b) - c_t(θ_0) per token, online and exact, and how well the two agree.

- `exact_delta`: from two `t3s.profile` tables (forward-only passes at θ_0 and θ_b).
- `online_delta`: checkpoint-free, from the training trajectory: c_t(θ_b) is the
  recorded visit nearest step b (`t3s.trajectory.nearest_visit`).
- `compare_deltas` / `Agreement`: mask agreement, kappa, Jaccard of the anchors,
  correlations, between an online and an exact Δc.

All tables are pyarrow tables keyed by ``(example_id, position)`` (the shared
token key of `t3s.data`).
"""

from __future__ import annotations

import dataclasses
import warnings
import math
from typing import Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .trajectory.queries import first_visit, join_tokens, nearest_visit
from .trajectory.reader import TrajectoryReader

__all__ = ["exact_delta", "online_delta", "compare_deltas", "Agreement", "rankdata"]


def _as_table(src, dataset_fingerprint: Optional[str]) -> pa.Table:
    if isinstance(src, pa.Table):
        return src
    if isinstance(src, TrajectoryReader):
        return src.read()
    if dataset_fingerprint is None:
        raise ValueError("reading a store directory needs dataset_fingerprint= (the data the "
                         "Delta c is meant for); or pass a TrajectoryReader or a table")
    return TrajectoryReader(src, dataset_fingerprint=dataset_fingerprint).read()


def exact_delta(initial: pa.Table, bottleneck: pa.Table) -> pa.Table:
    """Delta c per token from two per-token tables (e.g. `profile` at theta_0, theta_b).

    Returns (example_id, position, delta, c_b, c_0) for the tokens in both,
    sorted by key.
    """
    a = initial.select(["example_id", "position", "logprob"]).rename_columns(
        ["example_id", "position", "c_0"])
    b = bottleneck.select(["example_id", "position", "logprob"]).rename_columns(
        ["example_id", "position", "c_b"])
    joined = join_tokens(b, a)
    delta = pc.subtract(joined["c_b"], joined["c_0"])
    return pa.table({"example_id": joined["example_id"], "position": joined["position"],
                     "delta": delta, "c_b": joined["c_b"], "c_0": joined["c_0"]})


def online_delta(trajectory, bottleneck_step: int, *, initial: Optional[pa.Table] = None,
                 max_distance: Optional[int] = None,
                 dataset_fingerprint: Optional[str] = None) -> pa.Table:
    """Checkpoint-free Delta c from a training trajectory.

    c_t(theta_b) is the recorded visit nearest `bottleneck_step` (ties: the
    earlier step; see `t3s.trajectory.nearest_visit`); c_t(theta_0) is `initial`
    (e.g. a `profile` table at theta_0) when given, else the token's first
    recorded visit.

    Args:
        trajectory: a `TrajectoryReader`, a store directory (then
            `dataset_fingerprint` is required and checked) or a table of visits.
        max_distance: leave out tokens whose nearest visit is farther.

    Returns:
        (example_id, position, delta, c_b, c_0, step_b, step_0) sorted by key;
        step_0 is -1 when c_0 comes from `initial`.
    """
    table = _as_table(trajectory, dataset_fingerprint)
    if table.num_rows:
        last = int(pc.max(table["step"]).as_py())
        if bottleneck_step > last:
            # Records are taken in the loss pass, before each update: the parameters after
            # the last update are never recorded, so θ_b there is only approximated.
            warnings.warn(f"the bottleneck step {bottleneck_step} is after the last recorded "
                          f"step {last}: online c_t(θ_b) uses visits up to step {last}; "
                          "`exact_delta` (t3s run --delta exact) profiles θ_b itself",
                          RuntimeWarning, stacklevel=2)
    near = nearest_visit(table, bottleneck_step, max_distance=max_distance)
    near = near.select(["example_id", "position", "logprob", "step"]).rename_columns(
        ["example_id", "position", "c_b", "step_b"])
    if initial is None:
        init = first_visit(table).select(["example_id", "position", "logprob", "step"])
    else:
        init = initial.select(["example_id", "position", "logprob"])
        init = init.append_column("step", pa.array(np.full(init.num_rows, -1, np.int32)))
    init = init.rename_columns(["example_id", "position", "c_0", "step_0"])
    joined = join_tokens(near, init)
    delta = pc.subtract(joined["c_b"], joined["c_0"])
    return pa.table({"example_id": joined["example_id"], "position": joined["position"],
                     "delta": delta, "c_b": joined["c_b"], "c_0": joined["c_0"],
                     "step_b": joined["step_b"], "step_0": joined["step_0"]})


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Online vs exact Delta c on the tokens both cover.

    mask_agreement: fraction of common tokens given the same mask decision
    (Delta c > threshold, i.e. anchor or not). cohen_kappa: the same,
    corrected for chance. anchor_jaccard: |A_online & A_exact| / |A_online | A_exact|.
    pearson / spearman: correlations of the Delta c values. mean_abs_diff:
    mean |Delta_online - Delta_exact|. mean_visit_distance: mean |step_b - b|
    of the online visits, when known (else NaN).
    """

    threshold: float
    n_online: int
    n_exact: int
    n_common: int
    anchors_online: int
    anchors_exact: int
    anchors_both: int
    mask_agreement: float
    cohen_kappa: float
    anchor_jaccard: float
    pearson: float
    spearman: float
    mean_abs_diff: float
    mean_visit_distance: float

    def summary(self) -> str:
        """One line for logs: token counts, mask agreement, kappa, anchors, correlations."""
        return (f"online vs exact on {self.n_common} tokens (online {self.n_online}, exact "
                f"{self.n_exact}): mask agreement {self.mask_agreement:.4f} "
                f"(kappa {self.cohen_kappa:.3f}), anchors {self.anchors_online} online / "
                f"{self.anchors_exact} exact / {self.anchors_both} both "
                f"(Jaccard {self.anchor_jaccard:.3f}), Pearson {self.pearson:.4f}, "
                f"Spearman {self.spearman:.4f}, mean |diff| {self.mean_abs_diff:.4g}, "
                f"mean visit distance {self.mean_visit_distance:.3g}")

    def as_dict(self) -> Dict[str, float]:
        """The fields as a dict (JSON-able: every value is a number)."""
        return dataclasses.asdict(self)


def compare_deltas(online: pa.Table, exact: pa.Table, *, threshold: float = 0.0,
                   bottleneck_step: Optional[int] = None) -> Agreement:
    """Agreement of two Delta c tables (columns example_id, position, delta).

    The anchor mask is Delta c > threshold (T3S's AR rule at threshold 0). With
    `bottleneck_step` and a ``step_b`` column in `online`, also reports the mean
    distance of the online visits from the bottleneck.
    """
    joined = join_tokens(online.select(["example_id", "position", "delta"]
                                       + (["step_b"] if "step_b" in online.column_names
                                          else [])),
                         exact.select(["example_id", "position", "delta"]),
                         left_suffix="_online", right_suffix="_exact")
    d_on = joined["delta_online"].to_numpy().astype(np.float64)
    d_ex = joined["delta_exact"].to_numpy().astype(np.float64)
    ok = np.isfinite(d_on) & np.isfinite(d_ex)
    d_on, d_ex = d_on[ok], d_ex[ok]
    n = d_on.size
    a_on, a_ex = d_on > threshold, d_ex > threshold
    both, either = int(np.sum(a_on & a_ex)), int(np.sum(a_on | a_ex))
    agree = float(np.mean(a_on == a_ex)) if n else math.nan
    p_on, p_ex = (float(a_on.mean()), float(a_ex.mean())) if n else (math.nan, math.nan)
    p_chance = p_on * p_ex + (1 - p_on) * (1 - p_ex)
    kappa = ((agree - p_chance) / (1 - p_chance)) if n and p_chance < 1 else math.nan
    dist = math.nan
    if bottleneck_step is not None and "step_b" in joined.column_names and n:
        sb = joined["step_b"].to_numpy().astype(np.int64)[ok]
        dist = float(np.mean(np.abs(sb - bottleneck_step)))
    return Agreement(
        threshold=float(threshold), n_online=online.num_rows, n_exact=exact.num_rows,
        n_common=n, anchors_online=int(a_on.sum()), anchors_exact=int(a_ex.sum()),
        anchors_both=both, mask_agreement=agree, cohen_kappa=kappa,
        anchor_jaccard=both / either if either else math.nan,
        pearson=_pearson(d_on, d_ex), spearman=_pearson(rankdata(d_on), rankdata(d_ex)),
        mean_abs_diff=float(np.mean(np.abs(d_on - d_ex))) if n else math.nan,
        mean_visit_distance=dist)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y)) / denom if denom > 0 else math.nan


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` [n]: float64 [n], 1-based, ties given their average rank (as
    ``scipy.stats.rankdata``; the Spearman correlation of `compare_deltas`)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]] if xs.size else np.zeros(0, bool)
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    counts = np.diff(np.r_[starts, xs.size])
    avg = starts + (counts - 1) / 2.0 + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg[group]
    return ranks
