"""What a selection does, in numbers: `SelectionSummary` and `summarize` (statistics of
Δc [T] and of a ``loss_mask`` / ``forced`` table over the same keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from ..data import TokenTable
from .inputs import DELTA_NAMES, column_values

__all__ = ["SelectionSummary", "summarize"]


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
    d = column_values(delta, column, DELTA_NAMES, "delta")
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
