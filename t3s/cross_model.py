"""Cross-model selection: one model's selection artifact trains another model.

A small *selector* runs the pilot and the selection; its anchor mask trains a larger
*student* that shares its tokenizer. The mask is per token (``example_id``,
``position``), so it applies only where the student tokenizes every trace into the
selector's token ids. `check_student` decides that before any training:

- the student's tokenizer signature equals the selector's (stored in the artifact): go;
- the signatures differ but every example has the same token ids and trained
  positions: go, and the returned note says so;
- any example differs: ValueError naming the first differing example and, given the
  selector's tokenization (``selector_examples``), the first differing position.

`student_loss_masks` is the check followed by the artifact's per-example loss masks.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ._util import to_numpy
from .artifact import SelectionArtifact, dataset_signature, tokenizer_signature
from .data.table import IGNORE_INDEX

__all__ = ["first_token_difference", "describe_difference", "check_same_tokens", "check_student",
           "student_loss_masks"]


def _ids_and_trained(ex: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    ids = to_numpy(ex["input_ids"], np.int64).reshape(-1)
    trained = to_numpy(ex["labels"]).reshape(-1) != IGNORE_INDEX
    return ids, trained


def first_token_difference(selector_examples: Iterable[Mapping[str, Any]],
                           student_examples: Iterable[Mapping[str, Any]]
                           ) -> Optional[Dict[str, Any]]:
    """The first place where two tokenizations of the same traces differ, or None.

    Both: examples with ``example_id``, ``input_ids`` [L] and ``labels`` [L]. Examples
    are compared in ``example_id`` order. Returns {"example_id", "position" (the first
    token index where the ids or the trained flag differ; the shorter length when one
    is a prefix of the other; None when the example is missing on one side),
    "selector_id", "student_id" (ids at that position, None past an end), "why"}.
    """
    a = {int(ex["example_id"]): ex for ex in selector_examples}
    b = {int(ex["example_id"]): ex for ex in student_examples}
    for eid in sorted(set(a) | set(b)):
        if eid not in a or eid not in b:
            side = "selector's" if eid not in a else "student's"
            return {"example_id": eid, "position": None, "selector_id": None,
                    "student_id": None, "why": f"missing from the {side} data"}
        ids_a, tr_a = _ids_and_trained(a[eid])
        ids_b, tr_b = _ids_and_trained(b[eid])
        n = min(ids_a.size, ids_b.size)
        differ = np.flatnonzero((ids_a[:n] != ids_b[:n]) | (tr_a[:n] != tr_b[:n]))
        if differ.size == 0 and ids_a.size == ids_b.size:
            continue
        pos = int(differ[0]) if differ.size else n
        same_ids = pos < n and ids_a[pos] == ids_b[pos]
        return {"example_id": eid, "position": pos,
                "selector_id": int(ids_a[pos]) if pos < ids_a.size else None,
                "student_id": int(ids_b[pos]) if pos < ids_b.size else None,
                "why": ("the same token is trained on one side only" if same_ids else
                        f"{ids_a.size} tokens under the selector's tokenizer, {ids_b.size} "
                        "under the student's" if pos == n else "other token ids")}
    return None


def describe_difference(diff: Mapping[str, Any]) -> str:
    """`first_token_difference`'s result in words (one line)."""
    if diff["position"] is None:
        return f"example {diff['example_id']} is {diff['why']}"
    return (f"example {diff['example_id']}, token {diff['position']}: selector id "
            f"{diff['selector_id']}, student id {diff['student_id']} ({diff['why']})")


def _first_stored_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The first example whose stored dataset signature differs from ``current``'s."""
    a = dict(zip(stored.get("example_id", []), zip(stored.get("num_tokens", []),
                                                   stored.get("content", []))))
    b = dict(zip(current["example_id"], zip(current["num_tokens"], current["content"])))
    for eid in sorted(set(a) | set(b)):
        if eid not in a or eid not in b:
            return f"example {eid} is missing from the {'artifact' if eid not in a else 'data'}"
        if a[eid] != b[eid]:
            if a[eid][0] != b[eid][0]:
                return (f"example {eid}: {a[eid][0]} tokens under the selector's tokenizer, "
                        f"{b[eid][0]} under the student's")
            return (f"example {eid}: other token ids or trained tokens (the position needs "
                    "the selector's tokenization: pass selector_examples)")
    return "the dataset fingerprints differ"


def _same_ids_note(n_examples: int) -> str:
    return ("the student's tokenizer differs from the selector's, but it gives the same "
            f"token ids for all {n_examples} training examples: the selector's mask applies")


def _misaligned(where: str) -> ValueError:
    return ValueError("the student's tokenizer gives other tokens than the selector's, so the "
                      f"selector's mask would fall on other tokens: {where}")


def check_same_tokens(selector_examples: Iterable[Mapping[str, Any]],
                      student_examples: Iterable[Mapping[str, Any]]) -> str:
    """The check for two tokenizers whose signatures differ, given both tokenizations of
    the traces: a one-line note when every example has the same token ids and trained
    positions; ValueError naming the first differing example and position otherwise."""
    student_examples = list(student_examples)
    diff = first_token_difference(selector_examples, student_examples)
    if diff is not None:
        raise _misaligned(describe_difference(diff))
    return _same_ids_note(len(student_examples))


def check_student(artifact: SelectionArtifact, tokenizer, examples: Iterable[Mapping[str, Any]],
                  *, selector_examples: Optional[Iterable[Mapping[str, Any]]] = None
                  ) -> Optional[str]:
    """Check that ``artifact`` (made by a selector) can mask the student's ``examples``
    (the traces tokenized by the student's ``tokenizer``).

    Returns None when the tokenizer signatures match, a one-line note when they differ
    but the student's token ids and trained positions equal the selector's for every
    example; raises ValueError otherwise, naming the first differing example (and
    position, when ``selector_examples``, the selector's tokenization, is given).
    The data must be the artifact's data in any case (same examples)."""
    examples = list(examples)
    stored_tok = artifact.metadata.get("tokenizer") or {}
    current = tokenizer_signature(tokenizer)
    if stored_tok.get("fingerprint") == current["fingerprint"]:
        artifact.check(examples=examples)
        return None
    stored = artifact.metadata.get("dataset") or {}
    signature = dataset_signature(examples)
    if stored.get("fingerprint") == signature["fingerprint"]:
        return _same_ids_note(len(examples))
    if selector_examples is not None:   # raises at the first token that differs; if none
        # does, the data is not the artifact's, which the stored signature locates
        check_same_tokens(selector_examples, examples)
    raise _misaligned(_first_stored_difference(stored, signature))


def student_loss_masks(artifact: SelectionArtifact, tokenizer,
                       examples: Iterable[Mapping[str, Any]], *,
                       selector_examples: Optional[Iterable[Mapping[str, Any]]] = None,
                       dtype: torch.dtype = torch.bool) -> Dict[int, torch.Tensor]:
    """`check_student`, then example_id -> loss mask [L] of the student's examples (the
    `PaddedCollator` / `PackedCollator` ``loss_masks``)."""
    examples: List[Mapping[str, Any]] = list(examples)
    check_student(artifact, tokenizer, examples, selector_examples=selector_examples)
    return artifact.loss_masks(examples, dtype=dtype, check=False)
