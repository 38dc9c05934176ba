"""Reading, validating and tokenizing traces; `TraceDataset`.

Input format: JSONL, one record per line, either::

    {"prompt": "...", "response": "...", "answer": "..."}
    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}], "answer": "..."}

With ``messages`` the last assistant message is the response and everything
before it is the prompt. An optional ``id`` field names the example (see
`example_id_from`); otherwise the example id is the 0-based line index in the
file. `tokenize_trace` turns a record into an example dict whose ``labels``
are ``IGNORE_INDEX`` outside the response (``L`` below: tokens of the example).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .keys import dataset_keys
from .table import IGNORE_INDEX, TokenTable

TRUNCATION_MODES = ("error", "truncate", "drop")

__all__ = ["TRUNCATION_MODES", "MAX_REPORTED_ERRORS", "TraceRecord", "example_id_from", "read_traces", "tokenize_trace",
           "TraceDataset"]


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


#: how many bad lines `read_traces` lists in its error (the rest are counted)
MAX_REPORTED_ERRORS = 20


def read_traces(source: Union[str, os.PathLike, Iterable[Any]]) -> List[TraceRecord]:
    """Read and validate traces from a JSONL file, or from an iterable of dicts / JSON lines.

    Blank lines are skipped but still counted, so an example's default id is its
    0-based line index in the file. Bad input raises one ValueError naming every
    bad line (the first `MAX_REPORTED_ERRORS`, then how many more): invalid JSON
    (with the decoder's message and column), a missing ``answer``, an empty
    response, neither ``prompt``/``response`` nor ``messages``, or duplicate
    example ids. One bad line reads ``"<file> line N: <what>"``.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        with open(name, encoding="utf-8") as fh:
            items = fh.read().splitlines()
    else:
        name, items = "<records>", list(source)
    records: List[TraceRecord] = []
    seen: Dict[int, int] = {}
    # every bad line is collected, so one run over a file shows all that needs fixing
    errors: List[str] = []
    for i, item in enumerate(items):
        where = f"{name} line {i + 1}: "
        try:
            if isinstance(item, str):
                if not item.strip():
                    continue
                try:
                    item = json.loads(item)
                except json.JSONDecodeError as e:
                    # e.msg alone drops the position ("Unterminated string starting at")
                    raise ValueError(f"{where}invalid JSON ({e.msg}: column {e.colno})") from None
            rec = _parse_record(item, i, name)
            if rec.example_id in seen:
                raise ValueError(f"{where}example id {rec.example_id} already used on line "
                                 f"{seen[rec.example_id]}")
        except ValueError as e:
            msg = str(e)
            errors.append(f"line {i + 1}: {msg[len(where):] if msg.startswith(where) else msg}")
            continue
        seen[rec.example_id] = i + 1
        records.append(rec)
    if len(errors) == 1:
        raise ValueError(f"{name} {errors[0]}")
    if errors:
        shown = "; ".join(errors[:MAX_REPORTED_ERRORS])
        rest = len(errors) - MAX_REPORTED_ERRORS
        more = f"; and {rest} more bad line{'s' if rest > 1 else ''}" if rest > 0 else ""
        raise ValueError(f"{name}: {len(errors)} bad lines: {shown}{more}")
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
        """Tokenize ``records`` (`tokenize_trace`); examples dropped under ``truncation="drop"``
        are listed in ``dropped`` (with a warning)."""
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
        """The example dict with this id; KeyError when there is none."""
        try:
            return self.examples[self._index[int(example_id)]]
        except KeyError:
            raise KeyError(f"no example with id {example_id}") from None

    @property
    def example_ids(self) -> List[int]:
        """The example ids, in dataset order."""
        return [int(ex["example_id"]) for ex in self.examples]

    def keys(self) -> TokenTable:
        """Keys of all response tokens (see `dataset_keys`)."""
        return dataset_keys(self.examples)

    def num_response_tokens(self) -> int:
        """Response tokens (``labels != IGNORE_INDEX``) over all examples: the keyed tokens."""
        return int(sum(int((ex["labels"] != IGNORE_INDEX).sum()) for ex in self.examples))
