"""Shock curves: loss and accuracy per step, and how many trace tokens are still below θ0.

`shock_curves` gathers a training run's loss per logged step and its training
and held-out accuracy per evaluated step, with the bottleneck (the evaluation
after θ0 with the lowest training accuracy). `below_initial` reads a
recorded trajectory (`t3s.TrajectoryReader` table: step, example_id,
position, logprob) against c(θ0) per token and gives, at each recorded step s,
the fraction of trace tokens whose latest recorded confidence (their last visit
at or before s) is still below their confidence at θ0.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["shock_curves", "below_initial"]


def _series(d: Optional[Mapping[Any, Any]]) -> Dict[int, float]:
    return {int(k): float(v) for k, v in (d or {}).items() if v is not None}


def shock_curves(accuracy: Mapping[str, Any], log_history: Sequence[Mapping[str, Any]] = (),
                 ) -> Dict[str, Any]:
    """{"loss": {step: loss}, "train_acc", "heldout_acc": {step: acc}, "bottleneck_step",
    "train_acc_at_bottleneck"} from an accuracy history (``t3s_accuracy.json``:
    ``train_acc`` / ``heldout_acc`` step -> accuracy) and a Trainer log history."""
    from ..bottleneck import INITIAL_STEP, find_bottleneck
    train = _series(accuracy.get("train_acc"))
    heldout = _series(accuracy.get("heldout_acc"))
    loss = {int(e["step"]): float(e["loss"]) for e in log_history
            if isinstance(e, Mapping) and "loss" in e and "step" in e}
    b = find_bottleneck(train) if set(train) - {INITIAL_STEP} else None
    return {"loss": loss, "train_acc": train, "heldout_acc": heldout, "bottleneck_step": b,
            "train_acc_at_bottleneck": None if b is None else train[b]}


def below_initial(trajectory, initial) -> Dict[str, np.ndarray]:
    """At each recorded step: the share of trace tokens still less confident than at θ0.

    trajectory: a table (pyarrow) of visits with step, example_id, position,
    logprob. initial: a table with example_id, position, logprob = c(θ0) (e.g. a
    `t3s.profile` table); visits of tokens not in it are ignored.

    Returns {"step" int64 [S], "fraction_below" float64 [S] (among the tokens visited
    at or before the step), "fraction_below_all" float64 [S] (among all tokens of
    ``initial``; unvisited ones count as not below), "visited" int64 [S]}."""
    t_eid = trajectory.column("example_id").to_numpy().astype(np.int64)
    t_pos = trajectory.column("position").to_numpy().astype(np.int64)
    t_step = trajectory.column("step").to_numpy().astype(np.int64)
    t_lp = trajectory.column("logprob").to_numpy().astype(np.float64)
    i_eid = initial.column("example_id").to_numpy().astype(np.int64)
    i_pos = initial.column("position").to_numpy().astype(np.int64)
    c0 = initial.column("logprob").to_numpy().astype(np.float64)
    if i_eid.size == 0:
        raise ValueError("the θ0 table is empty")
    span = int(max(i_pos.max(), t_pos.max() if t_pos.size else 0)) + 1
    key0 = i_eid * span + i_pos
    order0 = np.argsort(key0, kind="mergesort")
    key0_sorted = key0[order0]
    tkey = t_eid * span + t_pos
    where = np.searchsorted(key0_sorted, tkey)
    where = np.minimum(where, key0_sorted.size - 1)
    known = key0_sorted[where] == tkey
    idx = order0[where[known]]
    t_step, t_lp = t_step[known], t_lp[known]
    # visits in step order; within a step, the row written last wins
    order = np.lexsort((np.arange(t_step.size), t_step))
    idx, t_step, t_lp = idx[order], t_step[order], t_lp[order]
    steps = np.unique(t_step)
    bounds = np.searchsorted(t_step, np.r_[steps, np.iinfo(np.int64).max])
    visited = np.zeros(c0.size, dtype=bool)
    below = np.zeros(c0.size, dtype=bool)
    out_frac, out_all, out_vis = [], [], []
    for i in range(steps.size):
        lo, hi = bounds[i], bounds[i + 1]
        rev = np.arange(hi - 1, lo - 1, -1)
        tok, first = np.unique(idx[rev], return_index=True)
        lp = t_lp[rev][first]
        visited[tok] = True
        below[tok] = lp < c0[tok]
        n_vis, n_below = int(visited.sum()), int(below.sum())
        out_vis.append(n_vis)
        out_frac.append(n_below / n_vis if n_vis else np.nan)
        out_all.append(n_below / c0.size)
    return {"step": steps.astype(np.int64), "fraction_below": np.asarray(out_frac, np.float64),
            "fraction_below_all": np.asarray(out_all, np.float64),
            "visited": np.asarray(out_vis, np.int64)}
