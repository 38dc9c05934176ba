"""Training pieces the pilot and the retraining stages share.

`training_args` (Hugging Face `TrainingArguments` from the settings),
`accuracy_callback` (training / held-out accuracy every ``eval_steps``, θ0
recorded but never the bottleneck), `progress_bar` (one bar with loss and
accuracies instead of the Trainer's printing), `save_log`, `checkpoints` and
`finals` (the last accuracies of a history).

Resuming: every training stage saves a full checkpoint (model, optimizer,
scheduler, RNG, trainer state) every ``checkpoint_steps`` steps
(`checkpoint_args`); `resume_point` finds the last complete one of an
interrupted attempt, and the Trainer continues from it with the same data
order, so the result equals an uninterrupted run's. Only the latest
checkpoint keeps the optimizer and RNG state (`resume_state_retention`); the
pilot's older ones keep only the model weights that can be θb.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .._util import one_line
from . import rundir
from .console import show_progress
from .loaders import resolve_device
from .rundir import write_json
from .settings import UsageError

__all__ = ["training_args", "checkpoint_args", "resume_point", "continue_from", "checkpoint_step_of",
           "resume_state_retention",
           "strip_resume_state", "accuracy_callback", "progress_bar", "save_log", "checkpoints",
           "finals", "RESUME_STATE_FILES"]

#: a checkpoint's optimizer state: ``optimizer.pt``, or under FSDP ``optimizer.bin`` (full)
#: or ``optimizer_0/`` (sharded)
_OPTIMIZER_STATES = ("optimizer.pt", "optimizer.bin", "optimizer_0")
#: the files of a Trainer checkpoint needed only to resume from it (not for θb)
RESUME_STATE_FILES = _OPTIMIZER_STATES + ("scheduler.pt", "scaler.pt", "rng_state.pth",
                                          "rng_state_*.pth", "training_args.bin")


def training_args(cfg: Mapping[str, Any], out: Path, *, packed: bool = False, **overrides):
    """`TrainingArguments` of the pilot and the retrainings (``overrides`` on top).

    ``batch_size`` is the global batch. Under a launcher each of the W ranks
    trains on its slice of every batch (accelerate's ``split_batches``), so the
    batches, their order and the loss (normalised by the tokens of all ranks)
    are those of one process. Padded batches are collated on rank 0 and sent out
    by rows (``dispatch_batches``); ``packed`` (the stage's collator packs, one row
    a batch) has each rank collate its own slice of the batch's examples instead."""
    from transformers import TrainingArguments

    from .. import dist
    device = resolve_device(cfg)
    kw = dict(output_dir=str(out), per_device_train_batch_size=cfg["batch_size"],
              gradient_accumulation_steps=cfg["grad_accum"], max_steps=cfg["steps"],
              learning_rate=cfg["lr"], lr_scheduler_type=cfg["lr_scheduler"],
              warmup_steps=cfg["warmup_steps"], weight_decay=cfg["weight_decay"],
              logging_steps=1, save_strategy="no", report_to=[], use_cpu=device == "cpu",
              disable_tqdm=True, seed=cfg["seed"], data_seed=cfg["seed"],
              dataloader_num_workers=0)
    if dist.world_size() > 1:
        kw.update(accelerator_config={"split_batches": True, "dispatch_batches": not packed},
                  ddp_find_unused_parameters=False)
    kw.update(overrides)
    try:
        return TrainingArguments(**kw)
    except ValueError as e:
        raise UsageError(f"training settings: {one_line(e)}") from None


def checkpoint_args(cfg: Mapping[str, Any], *, pilot: bool) -> Dict[str, Any]:
    """`TrainingArguments` overrides for resumable checkpoints every ``checkpoint_steps``
    (default ``eval_steps``). The pilot also saves at every evaluation (each can be
    θb), i.e. every gcd of the two; the retrainings keep only their latest."""
    every = cfg["checkpoint_steps"] or cfg["eval_steps"]
    if pilot:
        every = math.gcd(every, cfg["eval_steps"])
    return dict(save_strategy="steps", save_steps=every, save_only_model=False,
                save_total_limit=None if pilot else 1)


def resume_point(work: Path) -> Optional[Path]:
    """The last complete checkpoint of an interrupted attempt in ``work`` (None: none).

    The Trainer writes ``trainer_state.json`` last, so a checkpoint whose state
    file reads back is whole; later ones (cut off by the interruption) are
    removed."""
    from ..trainer import checkpoint_step
    for step, path in sorted(checkpoints(work).items(), reverse=True):
        try:
            if checkpoint_step(path, str(work)) == step and any(
                    (path / name).exists() for name in _OPTIMIZER_STATES):
                return path
        except ValueError:
            pass
        shutil.rmtree(path)  # incomplete: the interruption came while it was written
    return None


def continue_from(work: Path, resume: bool, say, label: str) -> Optional[Path]:
    """The checkpoint a training stage continues from: `resume_point` of an interrupted
    attempt (``resume``), else None. An attempt with no complete checkpoint starts
    from step 0, its files removed (the attempt record stays)."""
    if not resume:
        return None
    start = resume_point(work)
    if start is None:
        for p in work.iterdir():
            if p.name != rundir.ATTEMPT_FILE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        say(f"[{label}] the interrupted attempt saved no complete checkpoint: from step 0")
    else:
        say(f"[{label}] continuing from its last checkpoint, {start.name}")
    return start


def checkpoint_step_of(path: Optional[Path]) -> Optional[int]:
    """The step of a checkpoint directory from its name (None for None)."""
    return None if path is None else int(path.name[len(rundir.CHECKPOINT_PREFIX):])


def strip_resume_state(checkpoint: Path) -> None:
    """Remove what only resuming needs (`RESUME_STATE_FILES`), keeping the model."""
    for pattern in RESUME_STATE_FILES:
        for f in checkpoint.glob(pattern):
            shutil.rmtree(f) if f.is_dir() else f.unlink()


def resume_state_retention():
    """A Trainer callback: after each save, only the latest checkpoint keeps its resume
    state (optimizer moments are twice the model's size); the others keep their
    weights (the pilot's θb candidates; `t3s.trainer.AccuracyCallback` prunes them)."""
    from transformers import TrainerCallback

    class ResumeStateRetention(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                found = checkpoints(Path(args.output_dir))
                for step, path in found.items():
                    if step != max(found):
                        strip_resume_state(path)
            return control

    return ResumeStateRetention()


def accuracy_callback(cfg, tok, train, heldout, *, prune: bool):
    """`t3s.trainer.AccuracyCallback` under the settings, writing `rundir.ACCURACY_FILE`.

    Its default tracker excludes θ0 (step 0) from the bottleneck candidates, as
    `t3s.find_bottleneck` does; checkpoint pruning follows the same minimum."""
    from ..trainer import AccuracyCallback
    from .generators import accuracy_engine
    subset = cfg["eval_subset"] or None
    # *(choice)* greedy, whatever samples / temperature / top_p say (they apply to the eval
    # stage's final scoring): the bottleneck is the argmin of this curve, which sampling
    # noise would move, and the pilot's stage hash leaves them out
    return AccuracyCallback(tok, train, heldout=heldout, eval_steps=cfg["eval_steps"],
                            verifier=cfg["verifier"], subset_size=subset,
                            heldout_subset_size=subset, max_new_tokens=cfg["max_new_tokens"],
                            batch_size=cfg["eval_batch_size"], seed=cfg["seed"],
                            prune_checkpoints=prune,
                            progress=show_progress(cfg["progress"]), history_file=rundir.ACCURACY_FILE,
                            engine=accuracy_engine(cfg, tok))


def progress_bar(trainer, cfg, desc: str) -> None:
    """Replace the Trainer's printing with one bar showing loss and accuracies."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if show_progress(cfg["progress"]):
        trainer.add_callback(_bar_callback(desc))


def _bar_callback(desc: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    shown = {"loss": "loss", "t3s/train_acc": "train_acc", "t3s/heldout_acc": "heldout_acc"}

    class Bar(TrainerCallback):
        def __init__(self):
            self.bar, self.postfix = None, {}

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc,
                                unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs:
                return
            for key, label in shown.items():
                if isinstance(logs.get(key), (int, float)):
                    self.postfix[label] = f"{logs[key]:.3g}"
            self.bar.set_postfix(self.postfix, refresh=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Bar()


def save_log(trainer, work: Path) -> None:
    """The Trainer's log history as `rundir.LOG_HISTORY_FILE`."""
    write_json(work / rundir.LOG_HISTORY_FILE, list(trainer.state.log_history))


def checkpoints(directory: Path) -> Dict[int, Path]:
    """step -> Trainer checkpoint directory in ``directory``."""
    found = {}
    for p in directory.glob(rundir.CHECKPOINT_PREFIX + "*"):
        tail = p.name[len(rundir.CHECKPOINT_PREFIX):]
        if p.is_dir() and tail.isdigit():
            found[int(tail)] = p
    return found


def finals(history: Mapping[str, Any]) -> Dict[str, Any]:
    """final_train_acc / final_heldout_acc: the last evaluation of an accuracy history."""
    out = {}
    for key in ("train_acc", "heldout_acc"):
        h = history.get(key) or {}
        out[f"final_{key}"] = h[max(h)] if h else None
    return out
