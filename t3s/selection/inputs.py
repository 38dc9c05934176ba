"""The inputs of the selection rules: keyed tables, or plain tensors / arrays.

Every rule of `t3s.selection` reads its input through these helpers. Legend:
T = number of tokens (rows of a table), S = the shape of a plain input.

* A `TokenTable` (keys ``(example_id, position)`` plus value columns) is used
  as it is; `values` reads one float64 column [T] (the column named, else the
  first of ``prefer`` present, else the only one) and refuses NaN.
* A torch tensor or numpy array of any shape S becomes a table with one column
  (`ARRAY_COLUMN`) of prod(S) rows (`as_table`): "example" = the index along
  the first dimension (0 for a 0-D / 1-D array), position = the flat index,
  so key order is the row-major (flat) order. `Shape` remembers the input's
  type, device and shape, and `Shape.give_back` turns a result [prod(S)] back
  into a tensor / array [S].
* `key_order` is the tie-breaking order of the budgeted rules (example_id, then
  position); `count` turns a fraction of n into a number of tokens;
  `mask_table` and `mask_out` build a rule's ``loss_mask`` [T] output (or its
  [S] form for an array input).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import TokenTable

__all__ = [
    "CONF_NAMES",
    "DELTA_NAMES",
    "LOSS_NAMES",
    "Tokens",
    "ARRAY_COLUMN",
    "Shape",
    "as_table",
    "column_of",
    "mask_out",
    "column_values",
    "key_order",
    "fraction_count",
    "mask_table",
]

#: the column names a rule looks for, in order, when none is given: confidences
#: c_t (log-probs), confidence changes Δc_t, per-token losses (−c_t)
CONF_NAMES = ("c", "c0", "confidence", "logprob")
DELTA_NAMES = ("delta",)
LOSS_NAMES = ("loss",)


#: What a rule's input may be: a keyed table, or a plain tensor / array of any shape.
Tokens = Union[TokenTable, torch.Tensor, np.ndarray]
ARRAY_COLUMN = "value"  # the column an array becomes (any name works: it is the only one)


class Shape:
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


def as_table(x, what: str, *, like: Optional[Shape] = None) -> Tuple[TokenTable, Optional[Shape]]:
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
    shape = Shape(x, what)
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
    return TokenTable(eid, np.arange(n, dtype=np.int64), {ARRAY_COLUMN: v}, _validated=True), shape


def column_of(column: Optional[str], shape: Optional[Shape]) -> Optional[str]:
    """The column to read: ``column`` for tables; an array has one value column."""
    if shape is None:
        return column
    if column is not None:
        raise ValueError(f"column={column!r} names a TokenTable column; {shape.what} is an array "
                         "with one value per entry")
    return ARRAY_COLUMN


def mask_out(table: TokenTable, shape: Optional[Shape], column: str):
    """A rule's output table, or its column in the input's tensor / array form."""
    return table if shape is None else shape.give_back(np.asarray(table[column]), bool)


def column_values(table: TokenTable, column: Optional[str], prefer: Sequence[str],
                  what: str) -> np.ndarray:
    """The float64 values [T] of ``column`` (or the first of ``prefer`` present, or the
    only column) of ``table``; TypeError for a non-table, ValueError on NaN."""
    if not isinstance(table, TokenTable):
        raise TypeError(f"{what} must be a TokenTable, got {type(table).__name__}")
    name, v = table.column(column, prefer=prefer)
    v = np.asarray(v, dtype=np.float64)
    if np.isnan(v).any():
        raise ValueError(f"{what} column {name!r} has {int(np.isnan(v).sum())} NaN values")
    return v


def key_order(table: TokenTable) -> np.ndarray:
    """Row indices [T] of ``table`` sorted by (example_id, position)."""
    return np.lexsort((table.position, table.example_id))


def fraction_count(fraction: float, n: int, what: str) -> int:
    """round(fraction * n), halves rounded up *(choice)*."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {fraction}")
    return min(n, int(math.floor(fraction * n + 0.5)))


def mask_table(table: TokenTable, keep: np.ndarray) -> TokenTable:
    """A table with ``table``'s keys (same row order) and a bool ``loss_mask`` [T] = ``keep``."""
    return TokenTable(table.example_id, table.position, {"loss_mask": keep.astype(bool)}, _validated=True)
