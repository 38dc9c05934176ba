"""One interface for generating answers, and the avg@k statistics of their scores.

* `SamplingParams`: how to generate: greedy (``temperature`` 0) or sampled
  (temperature, top-p), ``samples`` answers per prompt, the length bound, stop
  strings, the seed.
* `GenerationEngine`: what generates. ``generate(prompts, params)`` returns, for
  every prompt, ``params.samples`` lists of new token ids; ``sync_weights(model)``
  makes the engine generate with ``model``'s current weights.
* `HFEngine`: the engine on a Hugging Face model's own ``generate`` (left-padded
  batches), used by `t3s.training_accuracy` and so by the training-accuracy
  callback and the pipeline's eval stage.
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

from ._util import mean_and_se

__all__ = ["SamplingParams", "GenerationEngine", "HFEngine", "avg_at_k"]


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


def _prompt_list(prompts: Sequence[Sequence[int]]) -> List[List[int]]:
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not ids:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        out.append([int(t) for t in ids])
    return out


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _id_set(value: Any) -> set:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


class HFEngine(GenerationEngine):
    """Generation with the model's own Hugging Face ``generate``.

    model: a model with ``generate`` (a ``*ForCausalLM``); tokenizer: its tokenizer
    (the pad id, `t3s.data.collate.pad_token_id`, and the stop strings).
    batch_size: prompts per ``generate`` call, left-padded with the pad id
        (``samples`` answers each: the call returns batch_size·samples rows).
    lockstep: every rank calls `generate` together and runs as many ``generate``
        calls as the rank with the most batches (a rank with fewer runs filler
        batches and discards them), with ``synced_gpus=True``: what a sharded model
        (FSDP, ZeRO-3), whose every forward is a collective, needs.
    progress: a progress bar (``desc``) over the prompts.
    generation_kwargs: more keyword arguments of ``generate``, over the ones set
        here (``num_return_sequences`` is refused: set ``SamplingParams.samples``).

    Greedy: ``do_sample=False``. Sampled: ``do_sample=True``, ``temperature``,
    ``top_p``, ``top_k=0``, ``num_return_sequences=samples``, with torch's RNG seeded
    with ``params.seed`` inside `torch.random.fork_rng`, so the caller's RNG state
    is left as it was. The same prompts, batch size and seed give the same answers;
    a prompt's samples depend on the batch it is in (the batch is sampled as one).
    Stop strings go to ``generate`` as ``stop_strings`` (with ``tokenizer``).

    The answers are the new tokens as generated, up to and including the first eos
    token; the pad ids ``generate`` fills a finished row with are removed (after a
    stop string they are trailing pad ids).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, lockstep: bool = False,
                 progress: bool = False, desc: str = "generation",
                 generation_kwargs: Optional[Mapping[str, Any]] = None):
        from .data.collate import pad_token_id
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.generation_kwargs = dict(generation_kwargs or {})
        if "num_return_sequences" in self.generation_kwargs:
            raise ValueError("generation_kwargs must not set num_return_sequences: set "
                             "SamplingParams.samples (the answers per prompt) instead")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.lockstep = int(batch_size), bool(lockstep)
        self.progress, self.desc = bool(progress), desc
        self.pad_id = int(pad_token_id(tokenizer))

    def sync_weights(self, model) -> None:
        """Make the engine generate with ``model``'s current weights.

        The HF engine generates with the live model object, so whatever its
        parameters hold at the time of `generate` is what generates: for the model
        the engine holds this is a no-op on purpose (nothing is copied, nothing is
        reloaded). Given another model object, the engine generates with that one
        from now on."""
        self.model = model

    def _eos_ids(self) -> set:
        if "eos_token_id" in self.generation_kwargs:
            return _id_set(self.generation_kwargs["eos_token_id"])
        config = getattr(self.model, "generation_config", None)
        ids = _id_set(getattr(config, "eos_token_id", None))
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        return ids or _id_set(getattr(tok, "eos_token_id", None))

    def _kwargs(self, params: SamplingParams) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = dict(max_new_tokens=params.max_new_tokens)
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=0, num_return_sequences=params.samples)
        kwargs["pad_token_id"] = self.pad_id
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if self.lockstep:
            kwargs["synced_gpus"] = True
        kwargs.update(self.generation_kwargs)
        return kwargs

    def _trim(self, row: List[int], eos: set, stop: bool) -> List[int]:
        """The tokens up to and including the first eos; after a stop string, without
        the trailing pad ids that fill the finished row."""
        end = next((j + 1 for j, t in enumerate(row) if t in eos), None)
        if end is not None:
            return row[:end]
        if stop:
            while row and row[-1] == self.pad_id:
                row = row[:-1]
        return row

    def _batch(self, prompts: List[List[int]], kwargs: Mapping[str, Any],
               device: torch.device) -> torch.Tensor:
        """The new tokens [B·samples, T_new] of one ``generate`` call on ``prompts``
        [B][T_p], left-padded to [B, max T_p]."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        out = self.model.generate(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device), **kwargs)
        if not isinstance(out, torch.Tensor):
            out = out.sequences
        return out[:, width:].cpu()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> List[List[List[int]]]:
        """See `GenerationEngine.generate`. The model is put in eval mode and restored."""
        from . import dist
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = _prompt_list(prompts)
        bs, k = self.batch_size, params.samples
        n_batches = -(-len(prompts) // bs)
        if self.lockstep:   # every rank runs as many generate calls as the rank with the most
            n_batches = max(dist.gather_objects(n_batches))
        if not n_batches:
            return []
        kwargs, eos, device = self._kwargs(params), self._eos_ids(), _model_device(self.model)
        model = self.model
        was_training = bool(getattr(model, "training", False))
        if hasattr(model, "eval"):
            model.eval()
        out: List[List[List[int]]] = []
        try:
            from tqdm.auto import tqdm
            with tqdm(total=len(prompts), desc=self.desc, leave=False,
                      disable=not self.progress) as bar, self._rng(params):
                for b in range(n_batches):
                    chunk = prompts[b * bs:(b + 1) * bs]
                    # a lockstep filler (discarded): any prompt will do
                    rows = self._batch(chunk or [prompts[0] if prompts else [self.pad_id]],
                                       kwargs, device).tolist()
                    for i in range(len(chunk)):
                        out.append([self._trim(r, eos, bool(params.stop))
                                    for r in rows[i * k:(i + 1) * k]])
                    bar.update(len(chunk))
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        return out

    @staticmethod
    def _rng(params: SamplingParams):
        """Greedy: nothing. Sampled: torch's RNG seeded with ``params.seed`` inside
        `torch.random.fork_rng` (the CUDA devices' states too once CUDA is in use)."""
        import contextlib
        if params.greedy:
            return contextlib.nullcontext()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if cuda else []

        @contextlib.contextmanager
        def seeded():
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed)
                yield
        return seeded()


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
