"""ROC AUC of a per-token score against a token set, by hand (Mann–Whitney with midranks).

`roc_auc` is the probability that a random member of the set scores higher
than a random non-member, ties counting one half; `roc_curve` gives the
points of the curve (one per distinct score, so ties move both rates at once).
A score with AUC 1 ranks every member first, 0.5 is chance, 0 ranks them last.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..delta import rankdata

__all__ = ["roc_auc", "roc_curve"]


def _check(scores, positive) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive).reshape(-1)
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("positive must be bool or 0/1")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and positive {y.shape} must have the same size")
    if np.isnan(s).any():
        raise ValueError(f"scores hold {int(np.isnan(s).sum())} NaN values")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"the AUC needs members and non-members of the set; got {n_pos} of "
                         f"{y.size} tokens in it")
    return s, y


def roc_auc(scores, positive) -> float:
    """AUC of ``scores`` [N] (higher = more likely in the set) against ``positive`` [N]
    (bool or 0/1). Ties between a member and a non-member count 1/2. ValueError on
    NaN scores, mismatched sizes, or a set that is empty or everything."""
    s, y = _check(scores, positive)
    ranks = rankdata(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(scores, positive) -> Tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate), float64 [K + 1] each, from (0, 0) to
    (1, 1), one point per distinct score taken as the threshold (highest first)."""
    s, y = _check(scores, positive)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return fpr, tpr
