"""The demo task: sums of two-digit numbers, answered in three styles.

A problem is a tuple of terms, e.g. ``(23, 45, 12)``, whose prompt is
``23+45+12=``. It is answered in one of these styles:

* ``"steps"`` (the base student's own style: compact running sums)::

      23+45=68;68+12=80;\\boxed{80}

* ``"teacher"`` (the rule-based teacher's style: the same steps, one per line,
  with spaces around the operators)::

      23 + 45 = 68
      68 + 12 = 80
      \\boxed{80}

* ``"direct"`` (the answer alone)::

      \\boxed{80}

The teacher's traces carry the same reasoning as the student's own style in a
different surface form, as when a strong reasoning model is distilled from a
teacher that writes differently (continual reasoning distillation). The final
answer is always in ``\\boxed{}``, so the same verifier as a real run
(`t3s.verify`, ``"math"`` by default) checks it; the gold answer is the sum as a
decimal string.

Splits. Every problem belongs to exactly one of two pools, fixed by a hash of
its prompt (`is_held_out`): about `HELD_OUT_PERCENT` percent of all problems
are *held out*, the rest may be trained on. Training sets (the base's data,
the teacher traces) draw only from the training pool and evaluation sets only
from the held-out pool, so no held-out problem is ever trained on, whatever the
seeds and sizes. All generators are deterministic given their seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple, Union

__all__ = [
    "HELD_OUT_PERCENT",
    "STYLES",
    "Problem",
    "is_held_out",
    "sample_problem",
    "iter_problems",
    "make_problems",
    "make_mixed_problems",
    "response_for",
    "to_records",
    "write_jsonl",
]

#: percentage of all problems in the held-out pool (by prompt hash)
HELD_OUT_PERCENT = 10
#: answer styles
STYLES = ("steps", "teacher", "direct")
#: default range of the terms (two-digit numbers, inclusive)
LOW, HIGH = 10, 99


@dataclass(frozen=True)
class Problem:
    """A sum of ``terms``; ``prompt`` is ``"a+b+...="``, ``answer`` the sum as a string."""

    terms: Tuple[int, ...]

    def __post_init__(self):
        if len(self.terms) < 2:
            raise ValueError(f"a problem needs at least 2 terms, got {self.terms}")
        if any((not isinstance(t, int)) or t < 0 for t in self.terms):
            raise ValueError(f"terms must be non-negative ints, got {self.terms}")

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    @property
    def prompt(self) -> str:
        return "+".join(str(t) for t in self.terms) + "="

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    def _running_sums(self) -> List[Tuple[int, int, int]]:
        """(accumulator, term, new accumulator) for each term after the first."""
        acc, out = self.terms[0], []
        for t in self.terms[1:]:
            out.append((acc, t, acc + t))
            acc += t
        return out

    def direct_response(self) -> str:
        """The answer alone: ``\\boxed{<sum>}``."""
        return "\\boxed{" + self.answer + "}"

    def steps_response(self) -> str:
        """The student's style: one ``acc+t=acc';`` step per remaining term, then the boxed sum."""
        return "".join(f"{a}+{t}={b};" for a, t, b in self._running_sums()) + self.direct_response()

    def teacher_response(self) -> str:
        """The teacher's style: one ``acc + t = acc'`` line per remaining term, then the boxed sum."""
        return "".join(f"{a} + {t} = {b}\n" for a, t, b in self._running_sums()) + self.direct_response()

    def response(self, style: str) -> str:
        return response_for(self, style)


def response_for(problem: Problem, style: str) -> str:
    """The response of ``problem`` in ``style`` (one of `STYLES`)."""
    if style == "steps":
        return problem.steps_response()
    if style == "teacher":
        return problem.teacher_response()
    if style == "direct":
        return problem.direct_response()
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def is_held_out(problem: Problem) -> bool:
    """True for the ~`HELD_OUT_PERCENT`% of problems reserved for evaluation
    (a stable hash of the prompt, independent of any seed)."""
    h = hashlib.blake2b(problem.prompt.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(h, "little") % 100 < HELD_OUT_PERCENT


def _check_split(split: str) -> None:
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")


def sample_problem(rng: random.Random, n_terms: int, split: str = "train", *,
                   low: int = LOW, high: int = HIGH) -> Problem:
    """One random problem with ``n_terms`` terms in [low, high] from ``split``
    (``"train"`` or ``"held_out"``), by rejection."""
    _check_split(split)
    if n_terms < 2:
        raise ValueError(f"n_terms must be >= 2, got {n_terms}")
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    want = split == "held_out"
    for _ in range(10_000):
        p = Problem(tuple(rng.randint(low, high) for _ in range(n_terms)))
        if is_held_out(p) == want:
            return p
    raise RuntimeError(f"could not draw a {split} problem with {n_terms} terms in [{low}, {high}]")


def iter_problems(n_terms: Union[int, Sequence[int]], split: str = "train", *, seed: int = 0,
                  low: int = LOW, high: int = HIGH) -> Iterator[Problem]:
    """An endless deterministic stream of problems (repeats possible); with a
    sequence ``n_terms`` the number of terms is drawn uniformly from it."""
    _check_split(split)
    choices = [n_terms] if isinstance(n_terms, int) else list(n_terms)
    if not choices:
        raise ValueError("n_terms is empty")
    rng = random.Random(seed)
    while True:
        yield sample_problem(rng, rng.choice(choices), split, low=low, high=high)


def make_problems(n: int, n_terms: int, split: str = "train", *, seed: int = 0, low: int = LOW,
                  high: int = HIGH, exclude: Iterable[Problem] = ()) -> List[Problem]:
    """``n`` distinct problems with ``n_terms`` terms from ``split``, none in
    ``exclude``, in the order drawn. Deterministic given the arguments."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_split(split)
    space = (high - low + 1) ** n_terms
    pool = space * HELD_OUT_PERCENT // 100 if split == "held_out" else space - space * HELD_OUT_PERCENT // 100
    if n > pool // 2:  # rejection sampling of distinct problems stays fast below half the pool
        raise ValueError(f"{n} distinct {n_terms}-term problems is too many for the {split} pool")
    rng = random.Random(f"t3s-demo/{split}/{n_terms}/{seed}")
    seen = set(exclude)
    out: List[Problem] = []
    while len(out) < n:
        p = sample_problem(rng, n_terms, split, low=low, high=high)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def make_mixed_problems(counts: Dict[int, int], split: str = "train", *, seed: int = 0,
                        low: int = LOW, high: int = HIGH, shuffle: bool = True) -> List[Problem]:
    """Distinct problems, ``counts[k]`` of them with ``k`` terms, shuffled with ``seed``."""
    out: List[Problem] = []
    counts = {int(k): int(v) for k, v in counts.items()}
    for k in sorted(counts):
        out.extend(make_problems(counts[k], k, split, seed=seed, low=low, high=high))
    if shuffle:
        random.Random(f"t3s-demo/shuffle/{seed}").shuffle(out)
    return out


def to_records(problems: Sequence[Problem], style: str = "teacher", *,
               start_id: int = 0) -> List[Dict[str, Any]]:
    """JSONL-ready records ``{"id", "prompt", "response", "answer", "n_terms"}``
    (accepted by `t3s.data.read_traces`); ids count from ``start_id``."""
    return [{"id": start_id + i, "prompt": p.prompt, "response": response_for(p, style),
             "answer": p.answer, "n_terms": p.n_terms} for i, p in enumerate(problems)]


def write_jsonl(path: Union[str, os.PathLike], problems: Sequence[Problem], style: str = "teacher", *,
                start_id: int = 0) -> str:
    """Write `to_records` to ``path`` as JSONL, one record per line; returns the path."""
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for rec in to_records(problems, style, start_id=start_id):
            fh.write(json.dumps(rec) + "\n")
    return path
