"""Token keys of examples and batches.

Legend: ``B`` rows of a batch, ``L`` its padded length, ``N`` tokens of a packed
row, ``E`` examples (sequences), ``M`` mapped targets.

Every trace token is named by ``(example_id int64, position int32)``, position
being the index of the *target* token in the example's ``input_ids``.

- `example_keys` / `dataset_keys`: the keys of examples' response tokens.
- `token_keys`: the keys of a batch's *targets* (any layout) and the index of
  the hidden state that predicts each; for values computed from a batch.
- `packed_keys`: the key of *every* position of a packed batch.
- `batch_positions`: the layout parser all of them share.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch

from .._util import to_numpy
from .table import IGNORE_INDEX, TokenTable

__all__ = ["example_keys", "dataset_keys", "batch_positions", "token_keys", "packed_keys",
           "packed_token_table"]


def example_keys(example: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX) -> TokenTable:
    """The keys ``(example_id, position)`` of one example's response tokens: a
    `TokenTable` with no value columns, positions ascending."""
    return TokenTable.from_examples([example], ignore_index=ignore_index)


def dataset_keys(examples: Iterable[Mapping[str, Any]], *, ignore_index: int = IGNORE_INDEX) -> TokenTable:
    """The keys of all response tokens of ``examples``."""
    return TokenTable.from_examples(examples, ignore_index=ignore_index)


def batch_positions(shape: Tuple[int, int], example_ids, position_ids=None, attention_mask=None
                    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Which example and which position every entry of a [B, L] batch holds.

    The one parser of batch layouts (padded, left-padded, packed; see
    `token_keys`): `token_keys`, `packed_keys`, `t3s.profiling.profile` (which
    splits batches back into examples) all read a batch through it, so they
    cannot disagree about where a sequence starts.

    Args:
        shape: (B, L) of the batch.
        example_ids: [B] for a padded batch; [E] (one per packed sequence, in
            row-major order of its start) with ``position_ids``.
        position_ids: optional [B, L] (or [L], broadcast over rows); given,
            a sequence starts wherever it is 0.
        attention_mask: optional [B, L]; 0 marks padding.

    Returns:
        (seq [B, L] int64: index into ``example_ids``, -1 before the first
        sequence start of a packed batch; pos [B, L] int64: index of the token
        in its example's input_ids; am [B, L] bool or None; eids [E] int64).
    """
    B, L = shape
    eids = to_numpy(example_ids).reshape(-1).astype(np.int64)
    am = None
    if attention_mask is not None:
        am = to_numpy(attention_mask)
        if am.size != B * L:
            raise ValueError(f"attention_mask must have the batch's shape {(B, L)}, "
                             f"got {am.shape}")
        am = am.reshape(B, L).astype(bool)
    if position_ids is None:
        if eids.shape[0] != B:
            raise ValueError(f"a padded batch needs one example id per row: got "
                             f"{eids.shape[0]} ids for {B} rows")
        pos = np.cumsum(am, axis=1) - 1 if am is not None else np.broadcast_to(np.arange(L), (B, L))
        seq = np.broadcast_to(np.arange(B)[:, None], (B, L))
        return seq, pos, am, eids
    pid = to_numpy(position_ids)
    if pid.size == L and B > 1:
        pid = np.broadcast_to(pid.reshape(1, L), (B, L))
    if pid.size != B * L:
        raise ValueError(f"position_ids must have the batch's shape {(B, L)}, got {pid.shape}")
    pos = pid.reshape(B, L).astype(np.int64)
    starts = pos == 0
    if am is not None:
        starts &= am
    seq = (np.cumsum(starts.reshape(-1)) - 1).reshape(B, L)
    n_seq = int(starts.sum())
    if n_seq != eids.shape[0]:
        raise ValueError(f"the batch packs {n_seq} sequences (position_ids == 0 marks a "
                         f"start) but {eids.shape[0]} example ids were given")
    return seq, pos, am, eids


def token_keys(labels, example_ids, *, position_ids=None, attention_mask=None,
               ignore_index: int = IGNORE_INDEX
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map the *targets* of a batch to token keys: use it for per-token values
    computed from a batch (losses, log-probs, `t3s.TokenStats`).

    Batch layouts:

    - padded: one sequence per row, ``example_ids`` [B]. Without
      ``attention_mask`` padding must be on the right; with it, positions count
      the attended tokens, so left padding works too.
    - packed, padding-free: ``position_ids`` restart at 0 for each sequence (as
      from `PackedCollator` or ``DataCollatorWithFlattening``); ``example_ids``
      lists every sequence in row-major order of its start. A row that does not
      begin at position 0 continues the previous sequence. Padding whose
      position id is 0 must be excluded with ``attention_mask``. The position is
      the position id.

    A target is a token with ``label != ignore_index`` and a predecessor in the
    same sequence (the first token of a sequence is never predicted).

    Args:
        labels: [B, L] (or [L]) Hugging Face labels aligned to input_ids.
        example_ids: [B] for a padded batch; [num_sequences] with ``position_ids``.
        position_ids: optional [B, L] (or [L]); given, sequences start where it
            is 0 (packed batches).
        attention_mask: optional [B, L]; 0 marks padding.

    Returns:
        (row, col, example_id, position): numpy arrays [M], in row-major order.
        ``(row, col)`` index the hidden state / logit that predicts the target,
        i.e. the target is ``labels[row, col + 1]``; ``position`` (int32) is its
        index in the example's input_ids.
    """
    lab = to_numpy(labels)
    if lab.ndim == 1:
        lab = lab[None]
    if lab.ndim != 2:
        raise ValueError(f"labels must be [B, L] or [L], got shape {lab.shape}")
    seq, pos, am, eids = batch_positions(lab.shape, example_ids, position_ids, attention_mask)
    valid = lab != ignore_index
    valid[:, 0] = False  # nothing predicts the first token of a row
    if am is not None:
        valid &= am
        valid[:, 1:] &= am[:, :-1]
    if position_ids is not None:
        orphan = (lab != ignore_index) & (seq < 0)
        if am is not None:
            orphan &= am
        if np.any(orphan):
            raise ValueError("labelled tokens come before the first sequence start "
                             "(position_ids == 0); they cannot be mapped to an example")
        valid[:, 1:] &= seq[:, 1:] == seq[:, :-1]
        valid &= seq >= 0
    valid &= pos >= 1
    rows, cols = np.nonzero(valid)
    eid = eids[seq[rows, cols]]
    position = pos[rows, cols]
    if position.size and position.max() > np.iinfo(np.int32).max:
        raise ValueError("token positions exceed int32")
    return rows, cols - 1, eid, position.astype(np.int32)


def packed_keys(batch: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map *every* position of a packed batch back to its token key, targets or not:
    use it to look up per-position inputs (masks, ids) by key. For the keys of
    the targets, use `token_keys` (any layout) or `packed_token_table`.

    batch: a `PackedCollator` output (``position_ids`` [1, N] restarting at 0 per
    example, ``example_id`` [B]). Returns ``(example_id [N] int64, position [N]
    int32)``: packed position j holds token ``input_ids[position[j]]`` of example
    ``example_id[j]``.
    """
    pid = torch.as_tensor(batch["position_ids"]).reshape(1, -1)
    if pid.numel() == 0 or int(pid[0, 0]) != 0:
        raise ValueError("position_ids must start at 0")
    seq, pos, _, eids = batch_positions(tuple(pid.shape), batch["example_id"], pid, None)
    return (torch.from_numpy(eids[seq.reshape(-1)]),
            torch.from_numpy(pos.reshape(-1).astype(np.int32)))


def packed_token_table(batch: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX) -> TokenTable:
    """The keys of the targets of a packed batch (see `token_keys`), as a
    `TokenTable` (rows in packed order)."""
    _, _, eid, pos = token_keys(batch["labels"], batch["example_id"],
                                position_ids=batch["position_ids"],
                                attention_mask=batch.get("attention_mask"),
                                ignore_index=ignore_index)
    return TokenTable(eid, pos)
