"""Verifiers for training accuracy: does a generated answer match the gold answer?

A verifier is any callable ``(prediction: str, gold: str) -> bool``. Built in:

* ``"math"`` (default): `math_verify_match`, Hugging Face ``math-verify`` on the
  boxed / final answer (``pip install math-verify``);
* ``"exact"``: `exact_match` on normalised strings.
"""

from __future__ import annotations

import re
import threading
from typing import Callable, Optional, Union

__all__ = [
    "Verifier",
    "extract_boxed",
    "extract_final_answer",
    "normalize_answer",
    "exact_match",
    "math_verify_match",
    "answer_text",
    "get_verifier",
]

Verifier = Callable[[str, str], bool]


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``,
    with nested braces matched; None when there is none."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            best = text[m.end():i - 1]
    return best


_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]?\s*(\S.*)", re.I)


def extract_final_answer(text: str) -> str:
    """The final answer in a generated text *(choice)*: the last ``\\boxed{}``;
    else what follows the last ``####``; else the last ``answer:`` /
    ``final answer is``; else what follows the last ``#``; else the last
    non-empty line. Only the first line after a marker counts."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for marker in ("####",):
        if marker in text:
            tail = text.rsplit(marker, 1)[1].strip()
            if tail:
                return tail.splitlines()[0].strip()
    matches = list(_ANSWER_LINE.finditer(text))
    if matches:
        return matches[-1].group(1).strip()
    if "#" in text:
        tail = text.rsplit("#", 1)[1].strip()
        if tail:
            return tail.splitlines()[0].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_answer(s: str) -> str:
    """Lower-case, strip ``$``, ``\\text{}``, surrounding punctuation, thousands
    separators and whitespace; ``1.50`` -> ``1.5``."""
    s = s.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"\s+", "", s).lower()
    s = s.strip(".;:,")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


def exact_match(prediction: str, gold: str) -> bool:
    """Normalised string equality of the prediction's final answer
    (`extract_final_answer`) and the gold answer."""
    return normalize_answer(extract_final_answer(prediction)) == normalize_answer(gold)


def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'math' verifier needs math-verify: pip install math-verify "
                          "(or pass verifier='exact' or a callable)") from e
    return parse, verify


_UNFINISHED = tuple("+-*/^=(,")


def answer_text(prediction: str) -> Optional[str]:
    """The part of a generation that states its answer, or None when it states none.

    The last ``\boxed{}`` when there is one; else `extract_final_answer`, cut to
    what follows its last ``=`` (so ``12+7=19`` gives ``19``). A text that ends in
    an operator or ``=`` is an unfinished computation, not an answer: a
    generation cut off at ``31 + 14 = `` would otherwise evaluate to the sum.
    """
    boxed = extract_boxed(prediction)
    if boxed is not None:
        return f"\\boxed{{{boxed}}}"
    answer = extract_final_answer(prediction)
    if "=" in answer:
        answer = answer.rsplit("=", 1)[1]
    answer = answer.strip().rstrip(".")
    if not answer or answer.endswith(_UNFINISHED):
        return None
    return answer


def math_verify_match(prediction: str, gold: str) -> bool:
    """``math_verify.verify(parse(gold), parse(answer))`` on the prediction's stated
    answer (`answer_text`); False when it states none.

    Gold and answer are parsed as they are, then as ``$...$`` if that finds
    nothing; when the gold parses neither way, falls back to `exact_match`.
    math-verify's timeouts use SIGALRM, so they are only enabled in the main thread.
    """
    parse, verify = _math_verify()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(text):
        return parse(text, parsing_timeout=timeout) or parse(f"${text}$", parsing_timeout=timeout)

    gold_parsed = parsed(gold)
    if not gold_parsed:
        return exact_match(prediction, gold)
    answer = answer_text(prediction)
    if answer is None:
        return False
    pred_parsed = parsed(answer)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


_BUILTIN = {
    "math": math_verify_match,
    "math_verify": math_verify_match,
    "math-verify": math_verify_match,
    "exact": exact_match,
    "exact_match": exact_match,
}


def get_verifier(verifier: Union[str, Verifier, None] = "math") -> Verifier:
    """A verifier by name (``"math"``, ``"exact"``) or a callable passed through.
    ``None`` means ``"math"``; asking for ``"math"`` without math-verify installed
    raises ImportError."""
    if verifier is None:
        verifier = "math"
    if callable(verifier):
        return verifier
    if verifier not in _BUILTIN:
        raise ValueError(f"unknown verifier {verifier!r}; use one of {sorted(_BUILTIN)} or a callable "
                         "(prediction: str, gold: str) -> bool")
    fn = _BUILTIN[verifier]
    if fn is math_verify_match:
        _math_verify()
    return fn
