"""Traces, tokenization, token keys and batching.

Legend::

    L   tokens in one example          N   tokens in a packed batch
    B   examples in a batch            T   rows of a `TokenTable`

The token key
-------------
Every trace token is named by a key ``(example_id: int64, position: int32)``:
``position`` is the index in the example's ``input_ids`` of the *target* token
y_t, so a causal LM predicts ``input_ids[position]`` from the hidden state at
``position - 1``. ``labels`` follow the Hugging Face convention (aligned with
``input_ids``, the model shifts), so the keyed tokens of an example are exactly
the positions where ``labels != -100``: the response (trace) tokens.

Per-token values (confidences, Δc, masks) live in a `TokenTable`: key columns
plus named value columns. `TokenTable.to_loss_masks` turns one column back into
per-example tensors aligned with ``labels``.

Keys of a batch: `token_keys` maps the targets of any batch layout (padded,
left-padded, packed) to keys, with the index of the hidden state that predicts
each; use it for values computed from a batch. `packed_keys` maps every
position of a `PackedCollator` batch, targets or not. Both share one mapping.

Input format
------------
JSONL, one record per line, either::

    {"prompt": "...", "response": "...", "answer": "..."}
    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}], "answer": "..."}

With ``messages`` the last assistant message is the response and everything
before it is the prompt. An optional ``id`` field names the example (see
`example_id_from`); otherwise the example id is the 0-based line index in the
file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

IGNORE_INDEX = -100
TRUNCATION_MODES = ("error", "truncate", "drop")

__all__ = [
    "IGNORE_INDEX",
    "TokenTable",
    "TraceRecord",
    "TraceDataset",
    "read_traces",
    "tokenize_trace",
    "example_id_from",
    "example_keys",
    "dataset_keys",
    "PaddedCollator",
    "PackedCollator",
    "pack_indices",
    "token_keys",
    "packed_keys",
    "packed_token_table",
]


# --------------------------------------------------------------------------------------
# TokenTable: the one per-token representation
# --------------------------------------------------------------------------------------

def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
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
        eid = _as_numpy(example_id, "example_id")
        pos = _as_numpy(position, "position")
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
            arr = _as_numpy(values, name)
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
            pos = _response_positions(ex, ignore_index)
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
            pos = _response_positions(ex, ignore_index)
            if eid not in values:
                raise ValueError(f"no values for example {eid}")
            v = _as_numpy(values[eid], name)
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
    labels = ex["labels"]
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy().reshape(-1)
    return np.asarray(labels).reshape(-1)


def _response_positions(ex: Mapping[str, Any], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    return np.flatnonzero(_labels_np(ex) != ignore_index).astype(np.int32)


def example_keys(example: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX) -> TokenTable:
    """The keys ``(example_id, position)`` of one example's response tokens: a
    `TokenTable` with no value columns, positions ascending."""
    return TokenTable.from_examples([example], ignore_index=ignore_index)


def dataset_keys(examples: Iterable[Mapping[str, Any]], *, ignore_index: int = IGNORE_INDEX) -> TokenTable:
    """The keys of all response tokens of ``examples``."""
    return TokenTable.from_examples(examples, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------
# Reading traces
# --------------------------------------------------------------------------------------

@dataclass
class TraceRecord:
    """One validated trace.

    prompt_messages: the chat turns before the response; for ``prompt``/``response``
    records this is ``[{"role": "user", "content": prompt}]``. response: the
    teacher trace (reasoning plus final answer). line: 1-based line in the file.
    """

    example_id: int
    prompt_messages: List[Dict[str, str]]
    response: str
    answer: str
    line: int
    source: str = "<records>"
    id: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The prompt as plain text (turn contents joined by newlines) *(choice)*,
        used when the tokenizer has no chat template."""
        return "\n".join(m["content"] for m in self.prompt_messages)


def example_id_from(value: Any, *, where: str = "") -> int:
    """The int64 example id for an ``id`` field.

    Integers (and strings of digits) are used as they are; any other string is
    hashed to a stable non-negative 63-bit integer (blake2b) *(choice)*.
    """
    if isinstance(value, bool):
        raise ValueError(f"{where}'id' must be an int or a string, got a bool")
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if not -(1 << 63) <= v < (1 << 63):
            raise ValueError(f"{where}'id' {v} does not fit in int64")
        return v
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return example_id_from(int(s), where=where)
        digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)
    raise ValueError(f"{where}'id' must be an int or a string, got {type(value).__name__}")


def _parse_record(obj: Any, index: int, source: str) -> TraceRecord:
    where = f"{source} line {index + 1}: "
    if not isinstance(obj, dict):
        raise ValueError(f"{where}expected a JSON object, got {type(obj).__name__}")
    answer = obj.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError(f"{where}missing 'answer' (the gold answer the verifier checks against)")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"{where}'answer' must be a string or a number, got {type(answer).__name__}")
    answer = str(answer)

    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}'messages' must be a non-empty list of {{role, content}}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}messages[{j}] must be an object with string 'role' and 'content'")
        last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"{where}'messages' has no assistant message (the response)")
        if last != len(msgs) - 1:
            raise ValueError(f"{where}messages after the last assistant message "
                             f"({len(msgs) - 1 - last} of them); the response must be the final turn")
        if last == 0:
            raise ValueError(f"{where}'messages' has no prompt before the assistant response")
        prompt_messages = [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]
        response = msgs[last]["content"]
        extra_keys = set(obj) - {"messages", "answer", "id"}
    elif "prompt" in obj or "response" in obj:
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}missing or empty 'prompt'")
        if not isinstance(response, str):
            raise ValueError(f"{where}missing 'response' (the teacher trace)")
        prompt_messages = [{"role": "user", "content": prompt}]
        extra_keys = set(obj) - {"prompt", "response", "answer", "id"}
    else:
        raise ValueError(f"{where}record has neither 'prompt'/'response' nor 'messages' "
                         f"(keys: {sorted(obj)})")
    if not response.strip():
        raise ValueError(f"{where}empty response")
    eid = example_id_from(obj["id"], where=where) if "id" in obj else index
    return TraceRecord(example_id=eid, prompt_messages=prompt_messages, response=response,
                       answer=answer, line=index + 1, source=source, id=obj.get("id"),
                       extra={k: obj[k] for k in extra_keys})


def read_traces(source: Union[str, os.PathLike, Iterable[Any]]) -> List[TraceRecord]:
    """Read and validate traces from a JSONL file, or from an iterable of dicts / JSON lines.

    Blank lines are skipped but still counted, so an example's default id is its
    0-based line index in the file. Bad input raises ValueError naming the line:
    invalid JSON, a missing ``answer``, an empty response, neither
    ``prompt``/``response`` nor ``messages``, or duplicate example ids.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        with open(name, encoding="utf-8") as fh:
            items = fh.read().splitlines()
    else:
        name, items = "<records>", list(source)
    records: List[TraceRecord] = []
    seen: Dict[int, int] = {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item.strip():
                continue
            try:
                item = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} line {i + 1}: invalid JSON ({e.msg})") from None
        rec = _parse_record(item, i, name)
        if rec.example_id in seen:
            raise ValueError(f"{name} line {i + 1}: example id {rec.example_id} already used on line "
                             f"{seen[rec.example_id]}")
        seen[rec.example_id] = i + 1
        records.append(rec)
    return records


# --------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------

def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_special_ids(tokenizer) -> List[int]:
    """The ids the tokenizer puts *before* a text when adding special tokens (e.g. BOS)."""
    probe = "a"
    plain = _encode(tokenizer, probe)
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _render(tokenizer, messages, add_generation_prompt: bool, kwargs) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    if not isinstance(text, str):
        raise ValueError("apply_chat_template(tokenize=False) did not return a string")
    return text


def tokenize_trace(record: TraceRecord, tokenizer, *, max_length: Optional[int] = None,
                   truncation: str = "error", use_chat_template: Optional[bool] = None,
                   add_eos: bool = True, chat_template_kwargs: Optional[Mapping[str, Any]] = None,
                   ) -> Optional[Dict[str, Any]]:
    """Tokenize one trace; the loss covers the response tokens only.

    With a chat template (``use_chat_template=None`` uses one when the tokenizer
    has it): the prompt turns rendered with ``add_generation_prompt=True`` are
    the prompt; the full conversation's remaining tokens, including the
    template's end-of-turn tokens, are the response *(choice)*. The rendered
    prompt's tokens must be a prefix of the full conversation's tokens, else
    ValueError. Without one: ``[leading special tokens (BOS)] + prompt +
    response + [eos if add_eos]``, prompt and response tokenized separately.

    Truncation when ``len(input_ids) > max_length`` *(choice: explicit)*:
    ``"error"`` raises ValueError naming the line; ``"truncate"`` cuts the end of
    the response (the example gets ``truncated=True``; a prompt that leaves no
    room for a response token raises); ``"drop"`` returns None.

    Returns a dict: ``example_id`` int, ``input_ids`` [L] int64, ``labels`` [L]
    int64 (``-100`` on prompt tokens), ``prompt_length`` int, ``answer`` str,
    ``line`` int, ``truncated`` bool.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    where = f"{record.source} line {record.line}: "
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template:
        if not _has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        kw = dict(chat_template_kwargs or {})
        prompt_text = _render(tokenizer, record.prompt_messages, True, kw)
        full_text = _render(tokenizer, record.prompt_messages
                            + [{"role": "assistant", "content": record.response}], False, kw)
        prompt_ids = _encode(tokenizer, prompt_text)
        full_ids = _encode(tokenizer, full_text)
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{where}the chat template's prompt (add_generation_prompt=True) does not "
                             "tokenize to a prefix of the full conversation; cannot tell where the "
                             "response starts")
        response_ids = full_ids[len(prompt_ids):]
    else:
        prompt_ids = _leading_special_ids(tokenizer) + _encode(tokenizer, record.prompt_text)
        response_ids = _encode(tokenizer, record.response)
        eos = getattr(tokenizer, "eos_token_id", None)
        if add_eos and eos is not None:
            response_ids = response_ids + [int(eos)]
    if not response_ids:
        raise ValueError(f"{where}the response tokenizes to no tokens")
    if not prompt_ids:
        raise ValueError(f"{where}the prompt tokenizes to no tokens; the first response token "
                         "needs a preceding token to be predicted from")
    truncated = False
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        total = len(prompt_ids) + len(response_ids)
        if truncation == "error":
            raise ValueError(f"{where}{total} tokens exceed max_length={max_length} "
                             "(pass truncation='truncate' or 'drop')")
        if truncation == "drop":
            return None
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"{where}the prompt alone has {len(prompt_ids)} tokens, leaving no room "
                             f"for the response within max_length={max_length}")
        response_ids = response_ids[:room]
        truncated = True
    input_ids = torch.tensor(prompt_ids + response_ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[:len(prompt_ids)] = IGNORE_INDEX
    return {"example_id": int(record.example_id), "input_ids": input_ids, "labels": labels,
            "prompt_length": len(prompt_ids), "answer": record.answer, "line": record.line,
            "truncated": truncated}


class TraceDataset(torch.utils.data.Dataset):
    """Tokenized traces: a list of example dicts (see `tokenize_trace`).

    ``dataset[i]`` is the i-th example dict; `by_id` looks one up by example id.
    ``dropped`` lists the example ids skipped under ``truncation="drop"``.
    """

    def __init__(self, examples: Sequence[Dict[str, Any]], dropped: Sequence[int] = ()):
        self.examples = list(examples)
        self.dropped = list(dropped)
        self._index: Dict[int, int] = {}
        for i, ex in enumerate(self.examples):
            eid = int(ex["example_id"])
            if eid in self._index:
                raise ValueError(f"duplicate example id {eid}")
            self._index[eid] = i

    @classmethod
    def from_records(cls, records: Iterable[TraceRecord], tokenizer, *, max_length: Optional[int] = None,
                     truncation: str = "error", **tokenize_kwargs) -> "TraceDataset":
        examples, dropped = [], []
        for rec in records:
            ex = tokenize_trace(rec, tokenizer, max_length=max_length, truncation=truncation,
                                **tokenize_kwargs)
            if ex is None:
                dropped.append(rec.example_id)
            else:
                examples.append(ex)
        if dropped:
            warnings.warn(f"dropped {len(dropped)} examples longer than max_length={max_length}",
                          stacklevel=2)
        return cls(examples, dropped)

    @classmethod
    def from_jsonl(cls, source: Union[str, os.PathLike, Iterable[Any]], tokenizer, *,
                   max_length: Optional[int] = None, truncation: str = "error",
                   **tokenize_kwargs) -> "TraceDataset":
        """Read (`read_traces`) and tokenize (`tokenize_trace`) a JSONL file."""
        return cls.from_records(read_traces(source), tokenizer, max_length=max_length,
                                truncation=truncation, **tokenize_kwargs)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.examples[i]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.examples)

    def by_id(self, example_id: int) -> Dict[str, Any]:
        try:
            return self.examples[self._index[int(example_id)]]
        except KeyError:
            raise KeyError(f"no example with id {example_id}") from None

    @property
    def example_ids(self) -> List[int]:
        return [int(ex["example_id"]) for ex in self.examples]

    def keys(self) -> TokenTable:
        """Keys of all response tokens (see `dataset_keys`)."""
        return dataset_keys(self.examples)

    def num_response_tokens(self) -> int:
        return int(sum(int((ex["labels"] != IGNORE_INDEX).sum()) for ex in self.examples))


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------

def _where(ex: Mapping[str, Any], i: int) -> str:
    return f"example {ex['example_id']}" if "example_id" in ex else f"example at index {i}"


def _as_row(value: Any, key: str, where: str, dtype: torch.dtype) -> torch.Tensor:
    """One example's column as a 1-D tensor of ``dtype``."""
    t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"{where}: {key} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{where}: {key} must be real, got {t.dtype}")
    return t.to(dtype)


def _loss_masks(examples: Sequence[Mapping[str, Any]], loss_masks: Optional[Mapping[int, Any]],
                lengths: Sequence[int]) -> Optional[List[torch.Tensor]]:
    """Each example's ``[L]`` loss mask, or None when no example has one.

    From ``loss_masks[example_id]`` when the mapping is given (every example
    needs an entry), else from the example's own ``loss_mask``; an example
    without one keeps all its tokens (ones). The masks are bool when all are
    bool, else float32 (0/1 integers and weights keep their values).
    """
    raw = []
    for i, ex in enumerate(examples):
        if loss_masks is not None:
            if "example_id" not in ex:
                raise ValueError(f"{_where(ex, i)} has no example_id to look up in loss_masks")
            eid = int(ex["example_id"])
            if eid not in loss_masks:
                raise ValueError(f"no loss_mask for example {eid}")
            raw.append(loss_masks[eid])
        else:
            raw.append(ex.get("loss_mask"))
    if all(m is None for m in raw):
        return None
    masks = [None if m is None else (m.detach().cpu() if isinstance(m, torch.Tensor)
                                     else torch.as_tensor(m)) for m in raw]
    dtype = torch.bool if all(m is None or m.dtype == torch.bool for m in masks) else torch.float32
    out = []
    for i, (ex, m, n) in enumerate(zip(examples, masks, lengths)):
        if m is None:
            out.append(torch.ones(n, dtype=dtype))
            continue
        if m.dim() != 1 or m.numel() != n:
            raise ValueError(f"loss_mask for {_where(ex, i)} has shape {tuple(m.shape)} but labels "
                             f"have length {n}; masks must be aligned with labels")
        out.append(m.to(dtype))
    return out


class PaddedCollator:
    """Pads a list of examples into a batch, one example per row.

    Each example is a mapping with ``input_ids`` [L] (list or 1-D tensor) and
    optionally ``labels`` [L] (default: a copy of ``input_ids``, with
    ``label_pad_id`` where a given ``attention_mask`` is 0), ``attention_mask``
    [L] (default: ones), ``position_ids`` [L], ``loss_mask`` [L] (aligned with
    ``labels``; 1 keeps a token, 0 drops it, other values weight it) and
    ``example_id``.

    Returns [B, L'] tensors, L' the longest example rounded up to
    ``pad_to_multiple_of``: ``input_ids`` (``pad_token_id`` on padding),
    ``attention_mask`` (0 on padding), ``labels`` (``label_pad_id`` on
    padding); ``example_id`` [B] int64 when the examples have ids;
    ``position_ids`` (0 on padding) when any example has them, the others
    getting ``0..L-1``; and ``loss_mask`` (0 on padding) when masks are
    available: from ``loss_masks`` (example_id -> [L] tensor aligned with
    labels; every example needs one) when given, else from the examples' own
    ``loss_mask`` (an example without one gets ones). The mask is bool when all
    masks are bool, else float32. A mask whose length differs from its labels
    raises ValueError. Other keys of the examples are dropped, except those
    named in ``extra_keys`` (collated with ``torch.utils.data.default_collate``).
    Pop ``example_id`` before calling a model; a `t3s.patch`-ed model takes
    ``loss_mask``.

    ``padding_side="left"`` pads at the start of each row (token keys then need
    the ``attention_mask``, see `token_keys`). ``fold_mask_into_labels=True``
    also sets ``labels`` to ``label_pad_id`` wherever ``loss_mask`` is 0. The
    loss is unchanged (those tokens are dropped either way), but then HF's
    Trainer, which derives ``num_items_in_batch`` from the labels alone,
    counts exactly the kept tokens of a 0/1 mask, so gradient accumulation
    averages over kept tokens (T3S's 'mean'); see `t3s.hf.count_loss_items`.
    """

    def __init__(self, pad_token_id: int, *, loss_masks: Optional[Mapping[int, Any]] = None,
                 pad_to_multiple_of: Optional[int] = None, label_pad_id: int = IGNORE_INDEX,
                 padding_side: str = "right", fold_mask_into_labels: bool = False,
                 extra_keys: Sequence[str] = ()):
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (e.g. tokenizer.pad_token_id or eos_token_id)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.loss_masks = loss_masks
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = int(label_pad_id)
        self.padding_side = padding_side
        self.fold_mask_into_labels = fold_mask_into_labels
        self.extra_keys = tuple(extra_keys)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        ids = [_as_row(ex["input_ids"], "input_ids", _where(ex, i), torch.long)
               for i, ex in enumerate(examples)]
        lens = [x.numel() for x in ids]
        L = max(lens)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m

        def column(key, dtype, default, pad):
            out = torch.full((len(examples), L), pad, dtype=dtype)
            for i, (ex, n) in enumerate(zip(examples, lens)):
                value = ex.get(key)
                row = default(i) if value is None else _as_row(value, key, _where(ex, i), dtype)
                if row.numel() != n:
                    raise ValueError(f"{_where(ex, i)}: {key} has {row.numel()} entries but "
                                     f"input_ids has {n}")
                self._place(out, i, row)
            return out

        out = {"input_ids": column("input_ids", torch.long, None, self.pad_token_id),
               "attention_mask": column("attention_mask", torch.long,
                                        lambda i: torch.ones(lens[i], dtype=torch.long), 0)}
        labels = column("labels", torch.long, lambda i: ids[i], self.label_pad_id)
        for i, ex in enumerate(examples):  # defaulted labels: no targets where attention is 0
            if ex.get("labels") is None and ex.get("attention_mask") is not None:
                labels[i][out["attention_mask"][i] == 0] = self.label_pad_id
        out["labels"] = labels
        has_id = ["example_id" in ex for ex in examples]
        if any(has_id):
            if not all(has_id):
                raise ValueError("some examples have an example_id and some do not")
            out["example_id"] = torch.tensor([int(ex["example_id"]) for ex in examples],
                                             dtype=torch.long)
        if any(ex.get("position_ids") is not None for ex in examples):
            out["position_ids"] = column("position_ids", torch.long,
                                         lambda i: torch.arange(lens[i]), 0)
        masks = _loss_masks(examples, self.loss_masks, lens)
        if masks is not None:
            loss_mask = torch.zeros((len(examples), L), dtype=masks[0].dtype)
            for i, m in enumerate(masks):
                self._place(loss_mask, i, m)
            out["loss_mask"] = loss_mask
            if self.fold_mask_into_labels:
                labels[loss_mask == 0] = self.label_pad_id
        for key in self.extra_keys:
            out[key] = torch.utils.data.default_collate([ex[key] for ex in examples])
        return out

    def _place(self, out: torch.Tensor, i: int, row: torch.Tensor) -> None:
        n = row.numel()
        if self.padding_side == "right":
            out[i, :n] = row
        else:
            out[i, out.shape[1] - n:] = row


class PackedCollator:
    """Concatenates examples into one padding-free row.

    Returns ``input_ids`` [1, N], ``labels`` [1, N], ``position_ids`` [1, N]
    (restarting at 0 for every example, which is how Hugging Face models find
    the sequence boundaries in padding-free mode), ``example_id`` [B] int64,
    and ``loss_mask`` [1, N] when masks are available (see `PaddedCollator`).
    The first label of each example is set to ``-100`` so that no token is
    predicted across a boundary. With ``return_flash_attn_kwargs=True`` the batch
    also carries ``cu_seq_lens_q/k`` [B+1] int32 and ``max_length_q/k``.
    `packed_keys` maps every packed position back to its key.

    The batch also carries ``use_cache=False`` and no ``attention_mask``: only then
    do Hugging Face models build the block-diagonal causal mask from the restarting
    ``position_ids`` for sdpa and eager attention (transformers 5.x); with a cache
    (a model's default ``use_cache=True``) every sequence would attend to the ones
    packed before it.
    """

    def __init__(self, *, loss_masks: Optional[Mapping[int, Any]] = None,
                 return_flash_attn_kwargs: bool = False):
        self.loss_masks = loss_masks
        self.return_flash_attn_kwargs = return_flash_attn_kwargs

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        ids, labs, pos = [], [], []
        for ex in examples:
            x = torch.as_tensor(ex["input_ids"]).reshape(-1).long()
            y = torch.as_tensor(ex["labels"]).reshape(-1).long().clone()
            if x.numel() == 0 or x.numel() != y.numel():
                raise ValueError(f"example {ex['example_id']}: input_ids and labels must be non-empty "
                                 "and of equal length")
            y[0] = IGNORE_INDEX
            ids.append(x)
            labs.append(y)
            pos.append(torch.arange(x.numel(), dtype=torch.long))
        out: Dict[str, Any] = {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labs)[None],
            "position_ids": torch.cat(pos)[None],
            "example_id": torch.tensor([int(ex["example_id"]) for ex in examples], dtype=torch.long),
            "use_cache": False,  # see the docstring: sequences must not see each other
        }
        masks = _loss_masks(examples, self.loss_masks, [t.numel() for t in labs])
        if masks is not None:
            lm = torch.cat(masks)
            offsets = np.cumsum([0] + [t.numel() for t in ids[:-1]])
            lm[torch.as_tensor(offsets)] = 0
            out["loss_mask"] = lm[None]
        if self.return_flash_attn_kwargs:
            lens = torch.tensor([t.numel() for t in ids])
            cu = torch.zeros(len(ids) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0)
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(),
                       max_length_q=int(lens.max()), max_length_k=int(lens.max()))
        return out


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _batch_positions(shape: Tuple[int, int], example_ids, position_ids, attention_mask):
    """Which example and which position every entry of a [B, L] batch holds.

    Returns (seq [B, L] int64: index into ``example_ids``, -1 before the first
    sequence start of a packed batch; pos [B, L] int64: index of the token in
    its example's input_ids; am [B, L] bool or None; eids [E] int64).
    """
    B, L = shape
    eids = _np(example_ids).reshape(-1).astype(np.int64)
    am = None
    if attention_mask is not None:
        am = _np(attention_mask)
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
    pid = _np(position_ids)
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
    lab = _np(labels)
    if lab.ndim == 1:
        lab = lab[None]
    if lab.ndim != 2:
        raise ValueError(f"labels must be [B, L] or [L], got shape {lab.shape}")
    seq, pos, am, eids = _batch_positions(lab.shape, example_ids, position_ids, attention_mask)
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
    seq, pos, _, eids = _batch_positions(tuple(pid.shape), batch["example_id"], pid, None)
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


def pack_indices(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Greedy in-order grouping of example indices into packs of at most
    ``max_tokens`` tokens; an example longer than ``max_tokens`` gets a pack of
    its own."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    packs: List[List[int]] = []
    cur: List[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        packs.append(cur)
    return packs
