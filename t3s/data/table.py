"""`TokenTable`: per-token values keyed by ``(example_id, position)``.

Legend: ``T`` rows of a table, ``L`` tokens in one example, ``E`` examples.

The key convention (see `t3s.data`): ``position`` is the index in the
example's ``input_ids`` of the *target* token, so the keyed tokens of an
example are exactly the positions where ``labels != IGNORE_INDEX``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .._util import to_numpy

#: The Hugging Face ``labels`` value of tokens outside the loss (prompt, padding).
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "TokenTable", "response_positions"]


def _column(x: Any, name: str) -> np.ndarray:
    """A key or value column as a 1-D numpy array (tensors converted, bf16/fp16 upcast)."""
    arr = to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"column {name!r} must be 1-D, got shape {arr.shape}")
    return arr


class TokenTable:
    """Per-token values keyed by ``(example_id, position)``.

    example_id: [T] int64; position: [T] int32 (index of the target token in the
    example's ``input_ids``); columns: name -> [T] array (float or bool). Keys are
    unique; the row order is whatever the producer chose (`sorted` gives key
    order). Arrays are numpy; torch tensors and lists are accepted and converted.

    Operations that combine tables match rows by key, never by row order:
    `align` reorders another table to this table's keys and raises if the key
    sets differ; `join` merges the columns of two tables.
    """

    __slots__ = ("example_id", "position", "columns")

    def __init__(self, example_id, position, columns: Optional[Mapping[str, Any]] = None,
                 *, _validated: bool = False, **more_columns):
        eid = _column(example_id, "example_id")
        pos = _column(position, "position")
        if eid.shape != pos.shape:
            raise ValueError(f"example_id has {eid.shape[0]} rows but position has {pos.shape[0]}")
        if eid.size and not np.issubdtype(eid.dtype, np.integer):
            raise ValueError(f"example_id must be integer, got {eid.dtype}")
        if pos.size and not np.issubdtype(pos.dtype, np.integer):
            raise ValueError(f"position must be integer, got {pos.dtype}")
        if pos.size and (int(pos.max()) >= 2**31 or int(pos.min()) < 0):
            raise ValueError("positions must be in [0, 2**31)")
        self.example_id = eid.astype(np.int64, copy=False)
        self.position = pos.astype(np.int32, copy=False)
        cols: Dict[str, np.ndarray] = {}
        for name, values in {**dict(columns or {}), **more_columns}.items():
            if name in ("example_id", "position"):
                raise ValueError(f"{name!r} is a key, not a value column")
            arr = _column(values, name)
            if arr.shape[0] != self.example_id.shape[0]:
                raise ValueError(f"column {name!r} has {arr.shape[0]} rows, keys have "
                                 f"{self.example_id.shape[0]}")
            cols[name] = arr
        self.columns = cols
        if not _validated:
            codes = _key_codes(self)[0]
            if np.unique(codes).size != codes.size:
                raise ValueError("duplicate (example_id, position) keys in TokenTable")

    # -- basic access ------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.example_id.shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"TokenTable has no column {name!r}; columns: {list(self.columns)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def names(self) -> List[str]:
        """Names of the value columns."""
        return list(self.columns)

    @property
    def example_ids(self) -> np.ndarray:
        """Sorted unique example ids: [E] int64."""
        return np.unique(self.example_id)

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}:{v.dtype}" for k, v in self.columns.items())
        return (f"TokenTable({len(self)} tokens, {self.example_ids.size} examples, "
                f"columns=[{cols}])")

    def column(self, name: Optional[str] = None, *, prefer: Sequence[str] = ()) -> Tuple[str, np.ndarray]:
        """Pick one value column: ``name`` if given, else the first of ``prefer``
        present, else the only column. Returns (name, values)."""
        if name is not None:
            return name, self[name]
        for p in prefer:
            if p in self.columns:
                return p, self.columns[p]
        if len(self.columns) == 1:
            (k, v), = self.columns.items()
            return k, v
        raise ValueError(f"cannot choose a value column among {list(self.columns)}; "
                         f"pass column=... (one of {list(prefer) or list(self.columns)})")

    # -- construction ------------------------------------------------------------------
    def keys_only(self) -> "TokenTable":
        """A new table with the same keys and no value columns."""
        return TokenTable(self.example_id, self.position, _validated=True)

    def with_columns(self, columns: Optional[Mapping[str, Any]] = None, **more) -> "TokenTable":
        """A new table with the same keys and these columns added or replaced."""
        return TokenTable(self.example_id, self.position, {**self.columns, **dict(columns or {}), **more},
                          _validated=True)

    def select(self, *names: str) -> "TokenTable":
        """A new table with the same keys and only the named columns."""
        return TokenTable(self.example_id, self.position, {n: self[n] for n in names}, _validated=True)

    def take(self, rows) -> "TokenTable":
        """Rows by integer index or boolean mask."""
        rows = np.asarray(rows)
        unique = rows.dtype == np.bool_ or np.unique(rows).size == rows.size
        return TokenTable(self.example_id[rows], self.position[rows],
                          {k: v[rows] for k, v in self.columns.items()}, _validated=unique)

    def sorted(self) -> "TokenTable":
        """The same rows in key order (example_id, then position)."""
        order = np.lexsort((self.position, self.example_id))
        return TokenTable(self.example_id[order], self.position[order],
                          {k: v[order] for k, v in self.columns.items()}, _validated=True)

    @classmethod
    def concat(cls, tables: Sequence["TokenTable"]) -> "TokenTable":
        """Rows of several tables with the same columns (keys must stay unique)."""
        tables = list(tables)
        if not tables:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32))
        names = tables[0].names
        for t in tables[1:]:
            if t.names != names:
                raise ValueError(f"cannot concat tables with columns {names} and {t.names}")
        return cls(np.concatenate([t.example_id for t in tables]),
                   np.concatenate([t.position for t in tables]),
                   {n: np.concatenate([t[n] for t in tables]) for n in names})

    @classmethod
    def from_examples(cls, examples: Iterable[Mapping[str, Any]], *,
                      ignore_index: int = IGNORE_INDEX) -> "TokenTable":
        """The keys of every response token (``labels != ignore_index``) of ``examples``,
        in example order then position order; no value columns."""
        eids, poss = [], []
        for ex in examples:
            pos = response_positions(ex, ignore_index)
            eids.append(np.full(pos.shape[0], int(ex["example_id"]), np.int64))
            poss.append(pos)
        if not eids:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32))
        return cls(np.concatenate(eids), np.concatenate(poss))

    @classmethod
    def from_per_example(cls, values: Mapping[int, Any], examples: Iterable[Mapping[str, Any]],
                         name: str, *, ignore_index: int = IGNORE_INDEX) -> "TokenTable":
        """Build a table from per-example 1-D arrays aligned with each example's
        response positions (``values[eid][i]`` belongs to the i-th response token).
        Every example must have an entry of the right length."""
        eids, poss, vals = [], [], []
        for ex in examples:
            eid = int(ex["example_id"])
            pos = response_positions(ex, ignore_index)
            if eid not in values:
                raise ValueError(f"no values for example {eid}")
            v = _column(values[eid], name)
            if v.shape[0] != pos.shape[0]:
                raise ValueError(f"example {eid}: {v.shape[0]} values for {pos.shape[0]} response tokens")
            eids.append(np.full(pos.shape[0], eid, np.int64))
            poss.append(pos)
            vals.append(v)
        if not eids:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), {name: np.zeros(0, np.float32)})
        return cls(np.concatenate(eids), np.concatenate(poss), {name: np.concatenate(vals)})

    # -- matching by key ---------------------------------------------------------------
    def same_keys(self, other: "TokenTable") -> bool:
        """True when both tables hold exactly the same set of keys (any order)."""
        if len(self) != len(other):
            return False
        a, b = _key_codes(self, other)
        return bool(np.array_equal(np.sort(a), np.sort(b)))

    def align(self, other: "TokenTable") -> "TokenTable":
        """``other`` reordered so that row i has this table's key i.

        Raises ValueError, saying which keys are missing or extra, unless both
        tables hold exactly the same keys.
        """
        a, b = _key_codes(self, other)
        oa, ob = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
        if a.shape != b.shape or not np.array_equal(a[oa], b[ob]):
            raise ValueError("token keys differ: " + _describe_key_diff(self, other, a, b))
        rows = np.empty_like(ob)
        rows[oa] = ob
        return TokenTable(self.example_id, self.position, {k: v[rows] for k, v in other.columns.items()},
                          _validated=True)

    def join(self, other: "TokenTable", *, how: str = "strict") -> "TokenTable":
        """Columns of both tables on shared keys, in this table's row order.

        how="strict": the key sets must be equal (else ValueError);
        how="inner": keep only keys present in both. Column names must not collide.
        """
        clash = set(self.columns) & set(other.columns)
        if clash:
            raise ValueError(f"both tables have columns {sorted(clash)}; rename one with select/with_columns")
        if how == "strict":
            return self.with_columns(self.align(other).columns)
        if how != "inner":
            raise ValueError(f"how must be 'strict' or 'inner', got {how!r}")
        a, b = _key_codes(self, other)
        _, ia, ib = np.intersect1d(a, b, assume_unique=True, return_indices=True)
        ia_order = np.argsort(ia, kind="stable")
        ia, ib = ia[ia_order], ib[ia_order]
        cols = {k: v[ia] for k, v in self.columns.items()}
        cols.update({k: v[ib] for k, v in other.columns.items()})
        return TokenTable(self.example_id[ia], self.position[ia], cols, _validated=True)

    # -- per example -------------------------------------------------------------------
    def per_example(self, name: str) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """example_id -> (positions [n] int32 sorted, values [n]) for one column."""
        t = self.sorted()
        vals = t[name]
        out: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        if len(t) == 0:
            return out
        bounds = np.flatnonzero(np.diff(t.example_id)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(t)]])
        for s, e in zip(starts, ends):
            out[int(t.example_id[s])] = (t.position[s:e], vals[s:e])
        return out

    def to_loss_masks(self, examples: Iterable[Mapping[str, Any]], column: str = "loss_mask", *,
                      dtype: torch.dtype = torch.bool, fill: Optional[float] = None,
                      ignore_index: int = IGNORE_INDEX) -> Dict[int, torch.Tensor]:
        """Per-example tensors ``[L]`` aligned with each example's ``labels``.

        Entry ``i`` is the table's value for key ``(example_id, i)``; positions with
        ``labels == ignore_index`` get 0. A response token missing from the table
        raises ValueError, unless ``fill`` gives its value. Keys in the table that
        are not response tokens of ``examples`` (another dataset) raise ValueError.
        """
        per_ex = self.per_example(column)
        out: Dict[int, torch.Tensor] = {}
        for ex in examples:
            eid = int(ex["example_id"])
            labels = _labels_np(ex)
            resp = np.flatnonzero(labels != ignore_index)
            dense = np.zeros(labels.shape[0], dtype=np.float64)
            pos, vals = per_ex.pop(eid, (np.zeros(0, np.int32), np.zeros(0)))
            inside = pos < labels.shape[0]
            bad = np.concatenate([pos[~inside], pos[inside][labels[pos[inside]] == ignore_index]])
            if bad.size:
                raise ValueError(f"example {eid}: table has values at positions {bad[:5].tolist()} "
                                 f"that are not response tokens (labels of length {labels.shape[0]})")
            have = np.zeros(labels.shape[0], dtype=bool)
            have[pos] = True
            missing = resp[~have[resp]]
            if missing.size:
                if fill is None:
                    raise ValueError(f"example {eid}: {missing.size} response tokens have no {column!r} "
                                     f"value (first positions {missing[:5].tolist()})")
                dense[missing] = fill
            dense[pos] = vals.astype(np.float64)
            out[eid] = torch.from_numpy(dense).to(dtype)
        if per_ex:
            extra = sorted(per_ex)[:5]
            raise ValueError(f"table has tokens of {len(per_ex)} examples not in the data "
                             f"(example ids {extra}...)")
        return out

    # -- arrow -------------------------------------------------------------------------
    def to_arrow(self):
        """A ``pyarrow.Table`` with columns example_id, position and the value columns."""
        import pyarrow as pa
        arrays = {"example_id": pa.array(self.example_id, pa.int64()),
                  "position": pa.array(self.position, pa.int32())}
        for k, v in self.columns.items():
            arrays[k] = pa.array(v)
        return pa.table(arrays)

    @classmethod
    def from_arrow(cls, table) -> "TokenTable":
        """Inverse of `to_arrow`."""
        names = table.column_names
        for key in ("example_id", "position"):
            if key not in names:
                raise ValueError(f"arrow table has no {key!r} column (columns: {names})")
        cols = {n: table.column(n).to_numpy() for n in names if n not in ("example_id", "position")}
        return cls(table.column("example_id").to_numpy(), table.column("position").to_numpy(), cols)


def _key_codes(*tables: TokenTable) -> List[np.ndarray]:
    """One int64 code per key, comparable across ``tables``.

    Example ids are factorised into dense codes first, so any int64 id works.
    """
    if not tables:
        return []
    all_eid = np.concatenate([t.example_id for t in tables])
    _, inv = np.unique(all_eid, return_inverse=True)
    out, start = [], 0
    for t in tables:
        n = len(t)
        out.append(inv[start:start + n].astype(np.int64) * (1 << 31) + t.position.astype(np.int64))
        start += n
    return out


def _describe_key_diff(a_t: TokenTable, b_t: TokenTable, a: np.ndarray, b: np.ndarray) -> str:
    only_a = np.setdiff1d(a, b)
    only_b = np.setdiff1d(b, a)

    def show(codes, t, src):
        idx = np.flatnonzero(np.isin(src, codes[:5]))[:5]
        return [(int(t.example_id[i]), int(t.position[i])) for i in idx]

    parts = [f"{len(a_t)} vs {len(b_t)} tokens"]
    if only_a.size:
        parts.append(f"{only_a.size} keys only in the first table, e.g. {show(only_a, a_t, a)}")
    if only_b.size:
        parts.append(f"{only_b.size} keys only in the second table, e.g. {show(only_b, b_t, b)}")
    return "; ".join(parts)


def _labels_np(ex: Mapping[str, Any]) -> np.ndarray:
    """An example's ``labels`` as a flat numpy array [L]."""
    return to_numpy(ex["labels"]).reshape(-1)


def response_positions(ex: Mapping[str, Any], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The positions of an example's response tokens (``labels != ignore_index``): [n] int32,
    ascending. These are the ``position`` halves of the example's token keys."""
    return np.flatnonzero(_labels_np(ex) != ignore_index).astype(np.int32)
