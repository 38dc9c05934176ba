"""The bottleneck θ_b: the pilot-run checkpoint with the lowest training accuracy.

* `find_bottleneck`: argmin over a finished history, θ0 (step 0) left out by default.
* `BottleneckTracker`: the same online, plus which checkpoints may be deleted
  (only the ones that can still be the argmin are kept, so disk use stays
  O(1)) and early detection (stop the pilot once accuracy has recovered).
* `training_accuracy`: the accuracy itself, by generation on a fixed subset of
  training prompts (greedy by default; avg@k over sampled answers; the engine is
  `t3s.generation`'s), checked by a verifier (`t3s.verify`). This is not
  teacher-forced token accuracy, which falls with the loss.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from .data.table import IGNORE_INDEX
from .generation import GenerationEngine, HFEngine, SamplingParams, avg_at_k
from .verify import Verifier, get_verifier

__all__ = ["INITIAL_STEP", "find_bottleneck", "BottleneckTracker", "select_subset",
           "training_accuracy", "answer_marks", "answer_agreement", "verifier_free_bottleneck"]


def _check_acc(step: Any, acc: Any) -> float:
    try:
        a = float(acc)
    except (TypeError, ValueError):
        raise ValueError(f"step {step}: accuracy {acc!r} is not a number") from None
    if math.isnan(a):
        raise ValueError(f"step {step}: accuracy is NaN")
    return a


#: The step of θ0 in an accuracy history: steps count the optimizer updates applied
#: before the evaluation (`t3s.trainer.AccuracyCallback`), so step 0 is the base model.
INITIAL_STEP = 0


def find_bottleneck(history: Mapping[int, float], exclude_initial: bool = True) -> int:
    """The step with the lowest training accuracy; ties go to the earliest step.

    history: step -> accuracy (e.g. ``read_accuracy_history(...)["train_acc"]``).

    exclude_initial: leave out the initial entry, step ``INITIAL_STEP`` (0, θ0
    itself, evaluated before any update), *(choice, default)*: θ0 is the
    reference of Δc = c(θ_b) - c(θ0), so b = 0 would make Δc ≡ 0 and the
    selection meaningless. A history without step 0 is used as it is. Pass
    False for the plain argmin over every step.

    Raises ValueError when the history is empty, holds NaN or a non-number, or
    (with ``exclude_initial``) holds nothing but θ0: then no checkpoint after
    θ0 was evaluated and there is no bottleneck to return.
    """
    if not history:
        raise ValueError("empty accuracy history: no checkpoint was evaluated")
    steps = sorted(history)
    for step in steps:
        _check_acc(step, history[step])
    if exclude_initial:
        steps = [s for s in steps if not _is_initial(s)]
        if not steps:
            raise ValueError(f"the accuracy history holds only step {INITIAL_STEP} (θ0), which is "
                             "not a bottleneck candidate (Δc would be 0): evaluate at least one "
                             "step after θ0, or pass exclude_initial=False")
    best_step, best = None, math.inf
    for step in steps:
        a = float(history[step])
        if a < best:
            best_step, best = step, a
    return int(best_step)


def _is_initial(step: int) -> bool:
    return int(step) == INITIAL_STEP


class BottleneckTracker:
    """Online argmin of training accuracy, checkpoint retention and early stop.

    margin: a checkpoint is kept while its accuracy is <= running minimum +
    ``margin`` (it can still be the argmin, or nearly). recover_margin, patience:
    the bottleneck is declared (``done``) once ``patience`` consecutive
    evaluations are >= running minimum + ``recover_margin``.

    exclude_initial: step ``INITIAL_STEP`` (θ0) is recorded in ``history`` but
    is no bottleneck candidate: it sets no minimum, counts for no recovery, and
    its checkpoint is never kept; `bottleneck` is None until a later step is
    recorded. This is the rule of `find_bottleneck`, with the same default
    (True), so ``tracker.bottleneck == find_bottleneck(tracker.history,
    exclude_initial=tracker.exclude_initial)`` once a candidate is recorded.
    False: every step, θ0 included, is a candidate.

    Steps must be given in increasing order. After ``done`` the tracker keeps
    recording, and `bottleneck` stays the argmin of everything seen *(choice)*;
    ``done`` does not reset.

    Checkpoint retention lives here, in one rule (`should_keep_checkpoint`):
    `deletable`, `kept`, `pop_deletable` and `checkpoints_to_delete` (what
    `t3s.trainer.AccuracyCallback` deletes) all apply it.
    """

    def __init__(self, *, margin: float = 0.0, recover_margin: float = 0.05, patience: int = 2,
                 exclude_initial: bool = True):
        if margin < 0 or recover_margin < 0:
            raise ValueError("margin and recover_margin must be >= 0")
        if patience < 1:
            raise ValueError("patience must be >= 1")
        self.margin = float(margin)
        self.recover_margin = float(recover_margin)
        self.patience = int(patience)
        self.exclude_initial = bool(exclude_initial)
        self.reset()

    def reset(self) -> None:
        """Forget every evaluation (a new run with the same settings)."""
        self.history: Dict[int, float] = {}
        self.running_min = math.inf
        self.min_step: Optional[int] = None
        self.done = False
        self.declared_at: Optional[int] = None
        self._recovered = 0
        self._released: set = set()

    def update(self, step: int, acc: float) -> bool:
        """Record one evaluation. Returns True when ``step`` is the new (strict) minimum."""
        a = _check_acc(step, acc)
        step = int(step)
        if self.history and step <= max(self.history):
            raise ValueError(f"step {step} is not after the last recorded step {max(self.history)}")
        self.history[step] = a
        if self._excluded(step):
            return False
        new_min = a < self.running_min
        if new_min:
            self.running_min, self.min_step = a, step
        if a >= self.running_min + self.recover_margin and not new_min:
            self._recovered += 1
        else:
            self._recovered = 0
        if not self.done and self._recovered >= self.patience:
            self.done = True
            self.declared_at = step
        return new_min

    @property
    def bottleneck(self) -> Optional[int]:
        """The argmin step so far (ties to the earliest), None before any candidate."""
        return self.min_step

    def _excluded(self, step: int) -> bool:
        return self.exclude_initial and _is_initial(step)

    def should_keep_checkpoint(self, step: int, acc: Optional[float] = None) -> bool:
        """Can this checkpoint still be (within ``margin`` of) the argmin?
        True iff acc <= running minimum + margin (and ``step`` is a candidate, see
        ``exclude_initial``). ``acc`` defaults to the recorded accuracy of
        ``step``; an unrecorded accuracy is compared with the current minimum
        without being recorded."""
        if acc is None:
            if step not in self.history:
                raise ValueError(f"step {step} was not recorded; pass its accuracy")
            acc = self.history[step]
        a = _check_acc(step, acc)
        if self._excluded(step):
            return False
        return a <= min(self.running_min, a) + self.margin

    def deletable(self) -> List[int]:
        """All recorded steps whose checkpoints can no longer be the argmin."""
        return [s for s in sorted(self.history) if not self.should_keep_checkpoint(s)]

    def pop_deletable(self) -> List[int]:
        """The deletable steps not returned by an earlier call (delete them now)."""
        new = [s for s in self.deletable() if s not in self._released]
        self._released.update(new)
        return new

    def kept(self) -> List[int]:
        """Recorded steps whose checkpoints must be kept."""
        return [s for s in sorted(self.history) if self.should_keep_checkpoint(s)]

    def checkpoints_to_delete(self, saved_steps: Iterable[int], *,
                              keep_latest: bool = True) -> List[int]:
        """Of the checkpoints saved at ``saved_steps``, those that can no longer be θ_b.

        A saved step is deleted when it was never evaluated (its accuracy is
        unknown, so it can never be chosen) or when `should_keep_checkpoint`
        says no. With ``keep_latest`` the latest saved step is always kept
        (training resumes from it). Returns the steps to delete, ascending.
        """
        steps = sorted({int(s) for s in saved_steps})
        latest = steps[-1] if steps and keep_latest else None
        return [s for s in steps if s != latest
                and (s not in self.history or not self.should_keep_checkpoint(s))]

    def __repr__(self) -> str:
        return (f"BottleneckTracker(bottleneck={self.bottleneck}, min={self.running_min:.4f}, "
                f"done={self.done}, evaluations={len(self.history)})")


def select_subset(examples: Sequence[Mapping[str, Any]], subset_size: Optional[int], seed: int = 0
                  ) -> List[Mapping[str, Any]]:
    """A fixed subset of ``examples``: ``subset_size`` drawn with ``seed`` from the
    examples sorted by id, returned in id order; all of them when ``subset_size``
    is None or at least the number of examples. Same inputs, same subset."""
    ordered = sorted(examples, key=lambda ex: int(ex["example_id"]))
    if subset_size is None or subset_size >= len(ordered):
        return ordered
    if subset_size < 1:
        raise ValueError("subset_size must be >= 1")
    idx = sorted(random.Random(seed).sample(range(len(ordered)), subset_size))
    return [ordered[i] for i in idx]


def _prompt_ids(ex: Mapping[str, Any]) -> List[int]:
    ids = ex["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if "prompt_length" in ex:
        return ids[:int(ex["prompt_length"])]
    labels = ex["labels"]
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    n = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    return ids[:n]


def answer_agreement(answers: Mapping[int, Sequence[str]],
                     reference_step: Optional[int] = None) -> Dict[int, float]:
    """step -> the share of prompts whose answer equals the reference step's (θ0's).

    answers: step -> the final answers (`t3s.verify.extract_final_answer`) on the same
    fixed subset of training prompts, in the same order (what `AccuracyCallback` stores as
    ``train_answers``). reference_step: default the earliest step (θ0 at step 0).
    No verifier and no gold answer is involved.
    """
    if not answers:
        raise ValueError("no answers: no checkpoint was evaluated")
    ref_step = min(answers) if reference_step is None else reference_step
    if ref_step not in answers:
        raise ValueError(f"no answers at the reference step {ref_step}")
    ref = list(answers[ref_step])
    out = {}
    for step in sorted(answers):
        row = list(answers[step])
        if len(row) != len(ref) or not ref:
            raise ValueError(f"step {step} has {len(row)} answers but the reference step "
                             f"{ref_step} has {len(ref)}: the prompts must be the same")
        out[step] = sum(a == b for a, b in zip(row, ref)) / len(ref)
    return out


def verifier_free_bottleneck(answers: Mapping[int, Sequence[str]]) -> int:
    """The bottleneck without a verifier: the step whose greedy answers agree least with
    θ0's own on the training prompts (`answer_agreement`, then `find_bottleneck`'s
    argmin: the earliest of ties, θ0 excluded).

    The paper's premise is a strong base: θ0 answers most training prompts right, so
    Imitation Shock shows as answers moving away from θ0's and coming back.
    """
    return find_bottleneck(answer_agreement(answers, reference_step=INITIAL_STEP
                                            if INITIAL_STEP in answers else None))


def answer_marks(details: Sequence[Mapping[str, Any]]) -> List[List[bool]]:
    """The verdicts [n problems][k answers] of `training_accuracy`'s detail rows: each
    row's ``samples`` when it has them (k > 1), else its one ``correct``."""
    return [[s["correct"] for s in d["samples"]] if "samples" in d else [d["correct"]]
            for d in details]


@torch.no_grad()
def training_accuracy(model, tokenizer, examples: Sequence[Mapping[str, Any]], *,
                      verifier: Union[str, Verifier, None] = "math", subset_size: Optional[int] = 64,
                      max_new_tokens: int = 512, batch_size: int = 8, seed: int = 0,
                      progress: bool = True, return_details: bool = False,
                      generation_kwargs: Optional[Mapping[str, Any]] = None,
                      split_across_ranks: Optional[bool] = None, samples: int = 1,
                      temperature: float = 0.0, top_p: float = 1.0,
                      stop: Union[str, Sequence[str]] = (),
                      engine: Optional[GenerationEngine] = None):
    """Fraction of training prompts the model answers correctly (avg@k with ``samples``).

    For a fixed subset (`select_subset`) of ``examples`` (dicts from `t3s.data`:
    ``input_ids``, ``prompt_length`` or ``labels``, ``answer``), generate from the
    prompt tokens with ``engine`` (default: `t3s.generation.HFEngine` on ``model``:
    ``model.generate`` on prompts left-padded in batches of ``batch_size``, with
    ``generation_kwargs`` over its own), decode the new tokens with
    ``skip_special_tokens=True`` and check them with ``verifier(prediction,
    answer)`` *(choice: greedy by default, fixed subset, configurable size)*. The
    model is put in eval mode and restored afterwards.

    Sampling (`t3s.generation.SamplingParams`): ``temperature`` 0 (the default) is
    greedy decoding (``do_sample=False``); > 0 samples, with ``top_p``, ``samples``
    answers per prompt, seeded with ``seed`` (which also draws the subset). ``stop``:
    stop strings. The accuracy is then avg@k (`t3s.generation.avg_at_k`): the mean
    over prompts of each prompt's fraction of correct answers.

    split_across_ranks: under ``torch.distributed`` (default: whenever a
    process group of more than one rank exists), each rank generates for its
    share of the subset (`t3s.dist.rank_share`) and the answers are gathered,
    so every rank returns the same result as one process would (sampled answers
    aside: a draw depends on the batch it is in, and the batches differ). Every rank
    must call this together. A sharded model (FSDP: DTensor parameters) runs
    the ranks in lockstep (equal batch counts, ``synced_gpus``).

    Returns the accuracy in [0, 1]; with ``return_details=True``, ``(accuracy,
    [{"example_id", "prediction", "answer", "correct"}])`` in subset order, the
    prediction and its verdict of the first answer; with ``samples`` > 1 each row
    also has ``"samples"`` ([{"prediction", "correct"}], every answer) and
    ``"score"`` (its fraction correct).
    """
    from . import dist
    verify_fn = get_verifier(verifier)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            samples=samples, stop=stop, seed=seed)
    subset = select_subset(list(examples), subset_size, seed)
    if not subset:
        raise ValueError("no examples to evaluate")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    split = dist.world_size() > 1 and split_across_ranks is not False
    order = list(dist.rank_share(len(subset))) if split else list(range(len(subset)))
    if engine is None:
        engine = HFEngine(model, tokenizer, batch_size=batch_size,
                          lockstep=split and dist.is_sharded(model),
                          progress=progress and dist.is_main(), desc="training accuracy",
                          generation_kwargs=generation_kwargs)
    answers = engine.generate([_prompt_ids(subset[i]) for i in order], params)
    if len(answers) != len(order) or any(len(a) != params.samples for a in answers):
        raise ValueError(f"the engine returned {[len(a) for a in answers]} answers for "
                         f"{len(order)} prompts, {params.samples} each")
    mine = []
    for i, outs in zip(order, answers):
        ex, gold = subset[i], str(subset[i]["answer"])
        preds = [tokenizer.decode(list(toks), skip_special_tokens=True) for toks in outs]
        marks = [bool(verify_fn(p, gold)) for p in preds]
        row = {"example_id": int(ex["example_id"]), "prediction": preds[0], "answer": gold,
               "correct": marks[0]}
        if params.samples > 1:
            row["samples"] = [{"prediction": p, "correct": c} for p, c in zip(preds, marks)]
            row["score"] = sum(marks) / len(marks)
        mine.append((i, row))
    gathered = [row for part in dist.gather_objects(mine) for row in part] if split else mine
    details = [d for _, d in sorted(gathered, key=lambda row: row[0])]
    acc = avg_at_k(answer_marks(details))["avg"]
    return (acc, details) if return_details else acc
