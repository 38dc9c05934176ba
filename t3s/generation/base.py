"""The generation interface every engine implements, and the avg@k statistics.

* `SamplingParams`: how to generate: greedy (``temperature`` 0) or sampled
  (temperature, top-p), ``samples`` answers per prompt, the length bound, stop
  strings, the seed.
* `GenerationEngine`: what generates. ``generate(prompts, params)`` returns, for
  every prompt, ``params.samples`` lists of new token ids; ``sync_weights(model)``
  makes the engine generate with ``model``'s current weights.
* `prompt_list`: the prompts as lists of ints, checked (no empty prompt).
* `avg_at_k`: avg@k (the mean over problems of each problem's fraction of correct
  answers), its standard error over problems, and pass@k.

Shapes: a prompt is a list of token ids [T_p]; ``generate`` returns
[n_prompts][samples][T_new_i] (each answer its own length); `avg_at_k` takes
[n_problems][k] booleans.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._util import mean_and_se

__all__ = ["SamplingParams", "GenerationEngine", "avg_at_k", "prompt_list"]


def _whole_number(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How an engine generates (checked when made; a bad value raises ValueError).

    max_new_tokens: the most tokens generated per answer (>= 1).
    temperature: 0 is greedy decoding (one answer per prompt, the argmax at every
        step); > 0 samples from the softmax of logits / temperature.
    top_p: nucleus sampling, in (0, 1]; 1 keeps the whole distribution. Unused when
        greedy. *(choice)* No top-k cut is applied (HF's default of 50 is turned off),
        so the distribution sampled is set by temperature and top_p alone.
    samples: answers per prompt (k of avg@k). Greedy decoding with samples > 1 is
        refused: the k answers would be identical.
    stop: stop strings (a single string counts as one). An answer ends with the
        token that completes the first of them to appear; that token is kept, so a
        stop string such as the ``}`` closing ``\\boxed{...}`` stays in the answer.
    seed: the seed of the sampling (unused when greedy).
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    samples: int = 1
    stop: Tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        put("max_new_tokens", _whole_number("max_new_tokens", self.max_new_tokens, 1))
        put("samples", _whole_number("samples", self.samples, 1))
        put("seed", _whole_number("seed", self.seed, -(2 ** 63)))
        temperature = _number("temperature", self.temperature)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got "
                             f"{self.temperature!r}")
        put("temperature", temperature)
        top_p = _number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        put("top_p", top_p)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        put("stop", tuple(stop))
        if temperature == 0 and self.samples > 1:
            raise ValueError(f"samples={self.samples} with temperature 0: greedy decoding gives "
                             f"{self.samples} identical answers; set temperature > 0")

    @property
    def greedy(self) -> bool:
        """Whether this is greedy decoding (temperature 0)."""
        return self.temperature == 0


class GenerationEngine(abc.ABC):
    """What generates answers for `t3s.training_accuracy` and the eval stage.

    An engine holds (or reaches) a model. Its answers are token ids; decoding and
    verifying them is the caller's work, so every engine is scored the same way.
    """

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> List[List[List[int]]]:
        """For every prompt (token ids [T_p], no padding), ``params.samples`` answers,
        each the list of new token ids [T_new_i] (at most ``params.max_new_tokens``;
        ending with the eos token when the model stopped on it, or with the token that
        completes a stop string). Returns [len(prompts)][params.samples][T_new_i], in
        the prompts' order."""

    @abc.abstractmethod
    def sync_weights(self, model) -> None:
        """Make the engine generate with ``model``'s current weights (call it after the
        weights changed, e.g. before each evaluation during training)."""

    def close(self) -> None:
        """Free what the engine holds beyond the caller's model (an engine that holds
        nothing of its own, as `HFEngine`, has nothing to free)."""


def prompt_list(prompts: Sequence[Sequence[int]]) -> List[List[int]]:
    """``prompts`` (token id sequences or 1-D tensors) as lists of ints; ValueError on
    an empty prompt."""
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not ids:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        out.append([int(t) for t in ids])
    return out


def avg_at_k(correct: Sequence[Sequence[bool]]) -> Dict[str, Any]:
    """avg@k statistics of ``correct`` [n problems][k answers] (booleans).

    Returns {"avg": the mean over problems of each problem's fraction of correct
    answers (avg@k; with k = 1 the accuracy), "se": its standard error over
    problems (the sample standard deviation of the per-problem fractions, ddof=1,
    over sqrt(n); None when n < 2), "pass_at_k": the fraction of problems with at
    least one correct answer, "k", "n"}.

    ValueError when there are no problems, a problem has no answers, or problems
    have different numbers of answers.
    """
    rows = [list(r) for r in correct]
    if not rows:
        raise ValueError("no problems: avg@k needs at least one")
    k = len(rows[0])
    if k == 0:
        raise ValueError("problem 0 has no answers")
    for i, r in enumerate(rows):
        if len(r) != k:
            raise ValueError(f"problem {i} has {len(r)} answers but problem 0 has {k}: every "
                             "problem needs the same number of answers k")
    n = len(rows)
    scores = [sum(bool(c) for c in r) / k for r in rows]
    avg, se = mean_and_se(scores)
    return {"avg": avg, "se": se, "pass_at_k": sum(s > 0 for s in scores) / n, "k": k, "n": n}
