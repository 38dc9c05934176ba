"""`AccuracyCallback`: training accuracy every k steps, the bottleneck, checkpoint retention.

The callback evaluates (`t3s.training_accuracy`) and does the file work;
which checkpoints may go is decided by its `t3s.BottleneckTracker`
(`BottleneckTracker.checkpoints_to_delete`), so the retention rule lives in one
place. `read_accuracy_history` reads back the JSON it writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from transformers import TrainerCallback

from ..bottleneck import BottleneckTracker, training_accuracy
from ..generation import GenerationEngine
from ..verify import extract_final_answer

__all__ = ["AccuracyCallback", "read_accuracy_history", "ACCURACY_FILE"]

logger = logging.getLogger(__name__)

ACCURACY_FILE = "t3s_accuracy.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class AccuracyCallback(TrainerCallback):
    """Training accuracy every ``eval_steps`` steps; bottleneck tracking; checkpoint retention.

    Training accuracy is `t3s.training_accuracy`: greedy generation on a fixed
    subset (``subset_size``, drawn with ``seed``) of the training ``examples``,
    checked by ``verifier`` (``"math"``, ``"exact"`` or a callable
    ``(prediction, gold) -> bool``). ``heldout`` examples, when given, are
    evaluated the same way (``heldout_subset_size``). The evaluation "at step
    s" evaluates the parameters after s optimizer updates: step 0 (θ0) is
    evaluated in ``on_train_begin`` (``eval_at_start``), then every
    ``eval_steps`` updates, and the last step at the end of training
    (``eval_at_end``). Under ``torch.distributed`` every rank generates for
    its share of the subset and the answers are gathered
    (`t3s.training_accuracy`'s ``split_across_ranks``), so every rank holds
    the same accuracy as one process would; a sharded (FSDP) model generates
    in lockstep. Only the main process writes files and deletes checkpoints.

    ``engine``: what generates (`t3s.generation`): None, the model's own
    ``generate`` (`HFEngine`, with ``batch_size`` and ``generation_kwargs``); a
    `GenerationEngine`; or a function ``model -> GenerationEngine`` called at the
    first evaluation (e.g. ``lambda m: VLLMEngine(m, tokenizer)``; the engine it
    builds is closed at the end of training). Before every evaluation the engine
    gets the model's current weights (``sync_weights``: in memory for vLLM).

    Each training accuracy feeds ``tracker`` (a `t3s.BottleneckTracker` with
    ``margin``, ``recover_margin``, ``patience`` and ``exclude_initial``: θ0
    recorded but no bottleneck candidate) and is logged through the
    trainer (``trainer.log``; `T3STrainerMixin` binds itself, else pass
    ``trainer=`` or call `bind`; unbound, the values go to
    ``state.log_history``) as:

    * ``t3s/train_acc``: training accuracy at this step;
    * ``t3s/heldout_acc``: held-out accuracy (with ``heldout``);
    * ``t3s/bottleneck_step``: the argmin step so far (ties to the earliest);
      not logged while there is none (only θ0 evaluated, with ``exclude_initial``).

    Checkpoint retention (``prune_checkpoints=True``): after each save, every
    ``checkpoint-<step>`` directory in ``output_dir`` that can no longer be
    θ_b is deleted (the tracker decides: `BottleneckTracker.checkpoints_to_delete`):
    evaluated ones whose accuracy is above the running minimum + ``margin``,
    and ones never evaluated. The latest checkpoint is always kept, for
    resuming. Disk use stays O(1) in the number of steps. HF's own
    rotation (``save_total_limit``) and ``load_best_model_at_end`` could
    delete θ_b and are refused (ValueError).

    Online detection (``stop_on_recovery=True``): once accuracy has stayed at
    least ``recover_margin`` above the running minimum for ``patience``
    consecutive evaluations, the bottleneck is declared and training stops
    (``control.should_training_stop``).

    The history is written after every evaluation to
    ``output_dir/<history_file>`` (JSON; see `read_accuracy_history`). On
    resume (``global_step > 0`` at train begin) the earlier history, up to that
    step, is read back from that file; a new run (``global_step == 0``) with
    the same callback starts a fresh history.
    """

    def __init__(self, tokenizer, examples: Sequence[Mapping[str, Any]], *,
                 heldout: Optional[Sequence[Mapping[str, Any]]] = None, eval_steps: int = 10,
                 verifier: Union[str, Callable[[str, str], bool], None] = "math",
                 subset_size: Optional[int] = 64, heldout_subset_size: Optional[int] = 64,
                 max_new_tokens: int = 512, batch_size: int = 8, seed: int = 0,
                 generation_kwargs: Optional[Mapping[str, Any]] = None,
                 margin: float = 0.0, recover_margin: float = 0.05, patience: int = 2,
                 exclude_initial: bool = True,
                 tracker: Optional[BottleneckTracker] = None, stop_on_recovery: bool = False,
                 prune_checkpoints: bool = False, eval_at_start: bool = True,
                 eval_at_end: bool = True, history_file: str = ACCURACY_FILE,
                 progress: bool = False, trainer=None,
                 engine: Union[GenerationEngine, Callable[[Any], GenerationEngine], None] = None):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        examples = list(examples)
        if not examples:
            raise ValueError("AccuracyCallback needs training examples to evaluate")
        self.tokenizer = tokenizer
        self.examples = examples
        self.heldout = None if heldout is None else list(heldout)
        if self.heldout is not None and not self.heldout:
            raise ValueError("heldout is empty")
        self.eval_steps = int(eval_steps)
        self.verifier = verifier
        self.subset_size = subset_size
        self.heldout_subset_size = heldout_subset_size
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.generation_kwargs = dict(generation_kwargs or {})
        self.tracker = tracker if tracker is not None else BottleneckTracker(
            margin=margin, recover_margin=recover_margin, patience=patience,
            exclude_initial=exclude_initial)
        self.stop_on_recovery = bool(stop_on_recovery)
        self.prune_checkpoints = bool(prune_checkpoints)
        self.eval_at_start = bool(eval_at_start)
        self.eval_at_end = bool(eval_at_end)
        self.history_file = history_file
        self.progress = bool(progress)
        self.trainer = trainer
        if engine is not None and not (isinstance(engine, GenerationEngine) or callable(engine)):
            raise TypeError(f"engine must be a GenerationEngine or a function model -> engine, "
                            f"got {type(engine).__name__}")
        self.engine = engine
        self._built_engine: Optional[GenerationEngine] = None
        self.heldout_history: Dict[int, float] = {}
        # step -> the final answers on the training subset (`t3s.verifier_free_bottleneck`)
        self.train_answers: Dict[int, List[str]] = {}
        self._last_details = None
        self.deleted_checkpoints: List[int] = []
        self._output_dir: Optional[str] = None

    def bind(self, trainer) -> "AccuracyCallback":
        """Log through ``trainer.log`` (reporting integrations then see the metrics)."""
        self.trainer = trainer
        return self

    # -- results -------------------------------------------------------------------------
    @property
    def history(self) -> Dict[int, float]:
        """step -> training accuracy."""
        return dict(self.tracker.history)

    @property
    def bottleneck(self) -> Optional[int]:
        """The argmin step of training accuracy so far: ``t3s.find_bottleneck(history,
        exclude_initial=tracker.exclude_initial)``; None before any candidate."""
        return self.tracker.bottleneck

    # -- events --------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        if self.prune_checkpoints:
            if getattr(args, "save_total_limit", None):
                raise ValueError("AccuracyCallback(prune_checkpoints=True) keeps the checkpoints "
                                 "that can still be the bottleneck; set save_total_limit=None "
                                 "(HF's rotation could delete θ_b)")
            if getattr(args, "load_best_model_at_end", False):
                raise ValueError("AccuracyCallback(prune_checkpoints=True) is incompatible with "
                                 "load_best_model_at_end=True")
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._output_dir = args.output_dir
        step = int(state.global_step)
        if step == 0 and self.tracker.history:  # a new run with this callback: start afresh
            self.tracker.reset()  # in place: keeps the settings (and a tracker subclass)
            self.heldout_history, self.deleted_checkpoints = {}, []
            self.train_answers = {}
        if step > 0 and not self.tracker.history:
            self._resume(step)
        if self.eval_at_start and step not in self.tracker.history and (
                not self.tracker.history or step > max(self.tracker.history)):
            self._evaluate(model, args, state, control)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._evaluate(model, args, state, control)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.prune_checkpoints and state.is_world_process_zero:
            self._prune(args.output_dir)
            self._write(args, state)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        step = int(state.global_step)
        try:
            if self.eval_at_end and (not self.tracker.history or step > max(self.tracker.history)):
                self._evaluate(model, args, state, control, at_end=True)
            else:
                self._write(args, state)
        finally:
            if self._built_engine is not None:
                self._built_engine.close()
                self._built_engine = None
        return control

    # -- internals -----------------------------------------------------------------------
    def _synced_engine(self, model) -> Optional[GenerationEngine]:
        """The engine, holding ``model``'s current weights (None: training_accuracy's
        default HF engine on the live model)."""
        engine = self.engine
        if engine is None:
            return None
        if not isinstance(engine, GenerationEngine):   # a factory: build once
            if self._built_engine is None:
                built = engine(model)
                if not isinstance(built, GenerationEngine):
                    raise TypeError(f"the engine function returned {type(built).__name__}, "
                                    "not a GenerationEngine")
                self._built_engine = built
            engine = self._built_engine
        engine.sync_weights(model)
        return engine

    def _accuracy(self, model, examples, subset_size, engine=None) -> float:
        """The accuracy on ``examples``; keeps the per-prompt details in ``_last_details``
        (a subclass that scores another way leaves it None: no answers are stored)."""
        acc, self._last_details = training_accuracy(
            model, self.tokenizer, examples, verifier=self.verifier, subset_size=subset_size,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed,
            progress=self.progress, generation_kwargs=self.generation_kwargs,
            return_details=True, engine=engine)
        return float(acc)

    def _evaluate(self, model, args, state, control, at_end: bool = False) -> None:
        if model is None:
            raise ValueError("AccuracyCallback needs the model (it is given by the Trainer)")
        step = int(state.global_step)
        if self.tracker.history and step <= max(self.tracker.history):
            return
        was_done = self.tracker.done
        self._last_details = None
        engine = self._synced_engine(model)
        acc = self._accuracy(model, self.examples, self.subset_size, engine)
        if self._last_details is not None:
            self.train_answers[step] = [extract_final_answer(d["prediction"])
                                        for d in self._last_details]
        self.tracker.update(step, acc)
        metrics = {"t3s/train_acc": acc}
        if self.heldout is not None:
            held = self._accuracy(model, self.heldout, self.heldout_subset_size, engine)
            self.heldout_history[step] = held
            metrics["t3s/heldout_acc"] = held
        if self.tracker.bottleneck is not None:  # None is no number for reporting integrations
            metrics["t3s/bottleneck_step"] = self.tracker.bottleneck
        self._log(metrics, state, control)
        if self.tracker.done and not was_done:
            logger.info("t3s: bottleneck declared at step %d (recovered for %d evaluations; "
                        "argmin step %s)", step, self.tracker.patience, self.tracker.bottleneck)
        if self.stop_on_recovery and self.tracker.done and not at_end:
            control.should_training_stop = True
        self._write(args, state)

    def _log(self, metrics: Dict[str, float], state, control) -> None:
        if self.trainer is not None:
            # Trainer.log clears control.should_log (via on_log); the Trainer's own log of
            # this step, which comes after on_step_end, must still happen.
            should_log = control.should_log
            self.trainer.log(dict(metrics))
            control.should_log = should_log
            if getattr(self.trainer, "control", None) is not None:
                self.trainer.control.should_log = should_log
        else:
            state.log_history.append({**metrics, "step": int(state.global_step)})
            logger.info("t3s step %d: %s", state.global_step, metrics)

    def _checkpoints(self, output_dir: str) -> Dict[int, str]:
        found = {}
        if output_dir and os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                m = _CHECKPOINT.match(name)
                path = os.path.join(output_dir, name)
                if m and os.path.isdir(path):
                    found[int(m.group(1))] = path
        return found

    def _prune(self, output_dir: str) -> None:
        # Which checkpoints go is the tracker's rule (one place); this only deletes them.
        found = self._checkpoints(output_dir)
        for step in self.tracker.checkpoints_to_delete(found, keep_latest=True):
            shutil.rmtree(found[step], ignore_errors=True)
            self.deleted_checkpoints.append(step)
            acc = self.tracker.history.get(step)
            logger.info("t3s: deleted %s (%s)", found[step],
                        "not evaluated" if acc is None else
                        f"accuracy {acc:.4f}, running minimum {self.tracker.running_min:.4f}, "
                        f"margin {self.tracker.margin:g}")

    def _path(self, args) -> str:
        return os.path.join(args.output_dir, self.history_file)

    def _write(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        t = self.tracker
        data = {
            "format": "t3s.accuracy",
            "version": 1,
            "train_acc": {str(s): a for s, a in sorted(t.history.items())},
            "heldout_acc": {str(s): a for s, a in sorted(self.heldout_history.items())},
            "train_answers": {str(s): a for s, a in sorted(self.train_answers.items())},
            "bottleneck_step": t.bottleneck,
            "running_min": None if math.isinf(t.running_min) else t.running_min,
            "done": t.done,
            "declared_at": t.declared_at,
            "kept_checkpoints": sorted(self._checkpoints(args.output_dir)),
            "deleted_checkpoints": sorted(self.deleted_checkpoints),
            "settings": {"eval_steps": self.eval_steps, "subset_size": self.subset_size,
                         "heldout_subset_size": self.heldout_subset_size if self.heldout else None,
                         "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                         "verifier": self.verifier if isinstance(self.verifier, str) or
                         self.verifier is None else getattr(self.verifier, "__name__", "custom"),
                         "margin": t.margin, "recover_margin": t.recover_margin,
                         "patience": t.patience, "exclude_initial": t.exclude_initial},
        }
        os.makedirs(args.output_dir, exist_ok=True)
        path = self._path(args)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)

    def _resume(self, step: int) -> None:
        path = os.path.join(self._output_dir or "", self.history_file)
        if not os.path.exists(path):
            return
        saved = read_accuracy_history(path)
        for s, a in sorted(saved["train_acc"].items()):
            if s <= step:
                self.tracker.update(s, a)
        self.heldout_history.update({s: a for s, a in saved["heldout_acc"].items() if s <= step})
        self.train_answers.update({s: a for s, a in saved["train_answers"].items() if s <= step})
        self.deleted_checkpoints = list(saved.get("deleted_checkpoints", []))


def read_accuracy_history(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read the JSON that `AccuracyCallback` writes (a file, or the ``output_dir`` holding it).

    Returns its contents with ``train_acc`` and ``heldout_acc`` as
    ``{step (int): accuracy}``, ready for `t3s.find_bottleneck`, and
    ``train_answers`` as ``{step (int): [final answer]}`` on the training subset,
    ready for `t3s.verifier_free_bottleneck`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ACCURACY_FILE)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != "t3s.accuracy":
        raise ValueError(f"{path} is not a t3s accuracy history")
    for key in ("train_acc", "heldout_acc"):
        data[key] = {int(s): float(a) for s, a in data.get(key, {}).items()}
    # final answers per step (histories written before they were stored have none)
    data["train_answers"] = {int(s): list(a) for s, a in data.get("train_answers", {}).items()}
    return data
