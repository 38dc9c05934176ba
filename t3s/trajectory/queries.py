"""Queries on per-token tables of the trajectory-store schema (`t3s.trajectory.shards`).

Each table has columns ``step`` int32, ``example_id`` int64, ``position`` int32,
``logprob`` float32 (plus extra columns); a token is a key ``(example_id,
position)``, and a *visit* is one row of it (the token trained at ``step``).
All queries are vectorised (numpy lexsort / pyarrow join). When the same token
has two rows at the same step (a resumed run re-recording a step), the row
written last wins.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

KEY_COLUMNS = ("example_id", "position")

__all__ = ["KEY_COLUMNS", "visits", "nearest_visit", "first_visit", "join_tokens"]


def _key_arrays(table: pa.Table):
    eid = table.column("example_id").to_numpy()
    pos = table.column("position").to_numpy()
    step = table.column("step").to_numpy().astype(np.int64)
    return eid, pos, step


def _group_firsts(eid: np.ndarray, pos: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices (into the table) of the first row of each token group in `order`."""
    if order.size == 0:
        return order
    e, p = eid[order], pos[order]
    new = np.empty(order.size, dtype=bool)
    new[0] = True
    new[1:] = (e[1:] != e[:-1]) | (p[1:] != p[:-1])
    return order[new]


def visits(table: pa.Table) -> pa.Table:
    """All rows sorted by (example_id, position, step); same-step rows keep file order."""
    eid, pos, step = _key_arrays(table)
    order = np.lexsort((np.arange(table.num_rows), step, pos, eid))
    return table.take(order)


def nearest_visit(table: pa.Table, step: int, *, max_distance: Optional[int] = None) -> pa.Table:
    """Per token, the row whose step is nearest `step`.

    Ties in distance go to the earlier step; duplicate rows at the same step go
    to the one written last. With `max_distance`, tokens whose nearest visit is
    farther than that are left out. Returns one row per token, sorted by
    (example_id, position), with the table's columns (``step`` is the chosen
    visit's step).
    """
    eid, pos, st = _key_arrays(table)
    dist = np.abs(st - int(step))
    seq = np.arange(table.num_rows)
    order = np.lexsort((-seq, st, dist, pos, eid))
    pick = _group_firsts(eid, pos, order)
    if max_distance is not None:
        pick = pick[dist[pick] <= max_distance]
    return table.take(pick)


def first_visit(table: pa.Table) -> pa.Table:
    """Per token, its earliest row (step 0 when recorded), sorted by key."""
    eid, pos, st = _key_arrays(table)
    seq = np.arange(table.num_rows)
    order = np.lexsort((-seq, st, pos, eid))
    return table.take(_group_firsts(eid, pos, order))


def join_tokens(left: pa.Table, right: pa.Table, *, left_suffix: str = "",
                right_suffix: str = "_right", join_type: str = "inner") -> pa.Table:
    """Join two per-token tables on (example_id, position), sorted by key.

    Non-key columns present in both get `left_suffix` / `right_suffix`.
    """
    table = left.join(right, keys=list(KEY_COLUMNS), join_type=join_type,
                      left_suffix=left_suffix or None, right_suffix=right_suffix or None,
                      coalesce_keys=True)
    return table.sort_by([("example_id", "ascending"), ("position", "ascending")])
