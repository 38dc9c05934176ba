"""What anchors are: the anchor fraction by token class, by position in the trace and by θ0
confidence.

An anchor is a trace token whose confidence rose from θ0 to the bottleneck, Δc_t > 0
(the paper's definition; whatever rule trained the run). `anchor_profile` cuts the
trace tokens three ways and gives, per group, how many tokens it holds, how many of
them are anchors, and the anchor fraction:

* ``token class``: the token's text (the tokenizer's decoding of its id alone) is
  ``digits`` (digits only), ``words`` (letters only), ``whitespace`` (nothing but
  spaces and newlines) or ``formatting and punctuation`` (anything else: ``=``, ``;``,
  ``\\boxed{``, mixed pieces);
* ``position in trace``: the token's rank among its trace's tokens over their count,
  cut into ``position_bins`` equal ranges (first quarter, ...);
* ``θ0 confidence``: p_θ0(y_t) = exp(c0), cut at ``confidence_edges`` (only when the
  table has a ``c0`` column).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Sequence

import numpy as np

__all__ = ["TOKEN_CLASSES", "anchor_profile", "token_class"]

TOKEN_CLASSES = ("digits", "words", "whitespace", "formatting and punctuation")
# Word-start markers of byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece tokenizers.
_WORD_START = ("\u0120", "\u2581", "\u010a")
DEFAULT_CONFIDENCE_EDGES = (0.25, 0.5, 0.75, 0.9)


def token_class(text: str) -> str:
    """The class (`TOKEN_CLASSES`) of one token's text."""
    if text.strip() == "" or all(ch in _WORD_START for ch in text):
        return "whitespace"
    core = text.strip()
    for marker in _WORD_START:
        core = core.replace(marker, "")
    if core.isdigit():
        return "digits"
    if core.isalpha():
        return "words"
    return "formatting and punctuation"


def anchor_profile(table, examples: Iterable[Mapping[str, Any]], tokenizer, *,
                   position_bins: int = 4,
                   confidence_edges: Sequence[float] = DEFAULT_CONFIDENCE_EDGES
                   ) -> List[Dict[str, Any]]:
    """The anchor fraction of the trace tokens, by token class, position and θ0 confidence.

    Args:
        table: a `t3s.TokenTable` with a ``delta`` column [T] (Δc; NaN rows are
            skipped) and optionally ``c0`` [T] (log p_θ0(y_t)).
        examples: the examples the keys refer to (``example_id``, ``input_ids``).
        tokenizer: decodes each token id alone (``decode([id])``).
        position_bins: equal ranges of the relative position in the trace (>= 1).
        confidence_edges: increasing probabilities in (0, 1) cutting p_θ0(y_t).

    Returns:
        rows ``{"by", "group", "tokens", "anchors", "anchor_fraction"}`` (fraction
        None for an empty group), by token class, then position, then confidence.
    """
    if "delta" not in table:
        raise ValueError(f"the table has no 'delta' column (columns: {table.names})")
    if position_bins < 1:
        raise ValueError(f"position_bins must be >= 1, got {position_bins}")
    edges = [float(e) for e in confidence_edges]
    if any(not 0 < e < 1 for e in edges) or edges != sorted(set(edges)):
        raise ValueError(f"confidence_edges must increase strictly within (0, 1), got {edges}")
    delta = np.asarray(table["delta"], dtype=np.float64)
    ok = np.isfinite(delta)
    anchor = ok & (delta > 0)
    by_id = {int(ex["example_id"]): ex for ex in examples}
    missing = sorted(set(table.example_id[ok].tolist()) - set(by_id))
    if missing:
        raise ValueError(f"the table has tokens of example_id {missing[0]}, which the examples "
                         "lack")
    ids = np.array([int(np.asarray(by_id[int(e)]["input_ids"])[int(p)])
                    for e, p in zip(table.example_id, table.position)], dtype=np.int64)
    texts = {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}
    classes = np.array([token_class(texts[int(i)]) for i in ids])
    relative = _relative_positions(table.example_id, table.position)

    rows = [_row("token class", name, ok & (classes == name), anchor) for name in TOKEN_CLASSES]
    cut = np.minimum((relative * position_bins).astype(np.int64), position_bins - 1)
    for b in range(position_bins):
        lo, hi = 100 * b / position_bins, 100 * (b + 1) / position_bins
        rows.append(_row("position in trace", f"{lo:.0f}-{hi:.0f}%", ok & (cut == b), anchor))
    if "c0" in table:
        p0 = np.exp(np.asarray(table["c0"], dtype=np.float64))
        bounds = [0.0] + edges + [1.0]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            inside = (p0 >= lo) & ((p0 < hi) if hi < 1.0 else (p0 <= hi))
            rows.append(_row("θ0 confidence", f"p in [{lo:g}, {hi:g}" + ("]" if hi == 1.0
                                                                         else ")"),
                             ok & np.isfinite(p0) & inside, anchor))
    return rows


def _relative_positions(example_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Each token's rank among its example's tokens over their count, in [0, 1)."""
    order = np.lexsort((position, example_id))
    rel = np.empty(len(position), dtype=np.float64)
    sorted_ids = example_id[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for s, e in zip(starts, ends):
        rel[order[s:e]] = np.arange(e - s) / (e - s)
    return rel


def _row(by: str, group: str, members: np.ndarray, anchor: np.ndarray) -> Dict[str, Any]:
    n, k = int(members.sum()), int((members & anchor).sum())
    return {"by": by, "group": group, "tokens": n, "anchors": k,
            "anchor_fraction": k / n if n else None}
