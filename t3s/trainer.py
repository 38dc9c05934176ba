"""Hugging Face ``Trainer`` and TRL ``SFTTrainer`` integration.

What a run gets from `T3STrainer` (or the `T3STrainerMixin` on any Trainer
subclass) over a plain ``transformers.Trainer``:

* **The fused, maskable loss.** The model is patched once (`t3s.patch`), so the
  [B, T, V] logits are never materialised during training, and a batch's
  ``loss_mask`` [B, T] (aligned with ``labels``; 1 keeps a token, 0 drops it,
  other values weight it) reaches the loss. ``example_id`` [B] is taken out of
  the model inputs.
* **Exact gradient accumulation with masks.** HF's Trainer counts
  ``labels != -100`` over the micro-batches of one optimizer step and passes it
  to the model as ``num_items_in_batch``. With a mask the right normaliser is
  the *kept* weight (``Σ loss_mask`` over the labelled targets after the causal
  shift, `t3s.count_loss_items`), so that the accumulated loss is the mean over
  the kept tokens of the whole step, exactly as one large batch. The trainer
  recomputes it in ``Trainer._get_num_items_in_batch(batch_samples, device)``,
  the hook through which transformers 5.x counts items for training
  (``get_batch_samples``) and for evaluation (``prediction_step``); the
  cross-device sum and the tensor/context/sequence-parallel divisor are applied
  as transformers does.
* **Trajectory recording** (``trajectory_dir=`` or ``recorder=``): every
  training forward records each trained token's log p(y_t) from the fused
  loss's per-token statistics (``return_token_stats=True``: the statistic at
  hidden index i belongs to ``labels[:, i + 1]``), keyed by the batch's
  ``example_id`` and the token's position, under ``step`` = the number of
  optimizer updates applied before this forward (0 = θ0 for the first step;
  all micro-batches of one step share it). The recorder is closed when
  ``train()`` returns or raises.
* **Token metrics** averaged in `log` (see `T3STrainerMixin.log`).

`AccuracyCallback` evaluates training accuracy (greedy generation checked by a
verifier, `t3s.training_accuracy`) every k steps, tracks the bottleneck
(`t3s.BottleneckTracker`), prunes checkpoints that can no longer be θ_b, can
stop the pilot once accuracy has recovered, and writes the history as JSON.

TRL: ``T3SSFTTrainer`` (``from t3s.trainer import T3SSFTTrainer``, or
`sft_trainer_class()`) is the same mixin on ``trl.SFTTrainer``; it needs
``pip install trl``.

Legend: B batch rows, T padded sequence length.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "t3s.trainer needs transformers and accelerate: pip install transformers accelerate "
        "(or pip install 't3s[hf]')") from exc

from .artifact import dataset_fingerprint, tokenizer_fingerprint
from .bottleneck import BottleneckTracker, training_accuracy
from .data import PaddedCollator
from .hf import count_loss_items, is_patched, patch
from .recorder import TrajectoryRecorder

__all__ = [
    "T3STrainerMixin",
    "T3STrainer",
    "T3SSFTTrainer",
    "sft_trainer_class",
    "AccuracyCallback",
    "read_accuracy_history",
    "ACCURACY_FILE",
    "METRICS",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ACCURACY_FILE = "t3s_accuracy.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

#: The metrics `T3STrainerMixin.log` adds to the Trainer's own train logs (and,
#: prefixed ``eval_``, to evaluation logs). Each is a token-weighted average over
#: all micro-batches (and ranks) since the previous log, not a mean of per-batch
#: means. "Kept" tokens are those in the loss: label != -100 after the causal
#: shift and a non-zero ``loss_mask``.
METRICS = {
    "t3s/kept_fraction": "kept weight (Σ loss_mask over labelled targets) / labelled targets; "
                         "1.0 without a mask",
    "t3s/kept_tokens": "kept weight per optimizer step (the loss normaliser "
                       "num_items_in_batch, summed over ranks)",
    "t3s/target_logprob": "mean log p(y_t) of the kept tokens, from the fused loss (no extra pass)",
    "t3s/entropy": "mean entropy of the predictive distribution at the kept tokens (nats)",
    "t3s/token_accuracy": "fraction of kept tokens whose argmax is the target (teacher-forced; "
                          "not the generated training accuracy of AccuracyCallback)",
}
# Accumulated sums, in this order, per mode ("train" / "eval").
_SUMS = ("kept", "labelled", "stat_tokens", "logprob", "entropy", "correct")
# Columns of TraceDataset examples that are not model inputs; kept out of the
# model call whatever remove_unused_columns says.
_NON_MODEL_KEYS = ("example_id",)


# --------------------------------------------------------------------------------------
# The trainer mixin
# --------------------------------------------------------------------------------------


class T3STrainerMixin:
    """T3S on top of a ``transformers.Trainer`` subclass (put it first in the bases).

    Keyword arguments, besides the Trainer's own:

    * ``trajectory_dir``: record the per-token log-probs of every training step
      in a trajectory store in this directory (`t3s.TrajectoryRecorder`, one
      shard per rank: ``rank = args.process_index``). The store's dataset
      fingerprint is `t3s.dataset_fingerprint` of ``train_dataset`` (every
      example needs ``example_id``, ``input_ids`` and ``labels``), its
      tokenizer fingerprint that of ``processing_class`` when it is a tokenizer.
      A new recorder is opened (appending) at each ``train()`` call.
    * ``recorder``: an open `t3s.TrajectoryRecorder` to use instead (closed at
      the end of ``train()``).
    * ``trajectory_options``: extra keyword arguments for the recorder opened on
      ``trajectory_dir`` (``extra_columns=("entropy",)``, ``fsync``,
      ``max_queue``, ``metadata``, ``model_id``, ``dataset_fingerprint``, ...).
    * ``patch_options``: keyword arguments for `t3s.patch` (``backend``,
      ``compose_liger``, ``label_smoothing``, ``filter_eps``, ...), used when
      the model is not patched yet. The model is patched at construction (so
      that the ``loss_mask`` column is known to the Trainer's column filter) and
      again in `compute_loss` if it was replaced (``model_init``) or unpatched.
    * ``log_token_metrics``: collect `METRICS` (default True). They come from
      the fused loss's per-token statistics, so they cost no extra pass.

    Batches are dicts with the model inputs plus, optionally, ``loss_mask`` [B, T]
    (bool or float, aligned with ``labels``) and ``example_id`` [B] (padded) or
    [num_sequences] (packed, with ``position_ids`` restarting at 0 per
    sequence), as `t3s.PaddedCollator` / `t3s.PackedCollator` produce them.
    Without a ``data_collator`` the trainer uses
    ``t3s.PaddedCollator(pad_token_id)`` with the tokenizer's pad (else eos)
    token.

    Raises ValueError on what it does not support: ``label_smoothing_factor``
    (pass ``patch_options={"label_smoothing": x}``), ``compute_loss_func`` (it
    would bypass the fused loss), ``use_liger_kernel`` (its fused loss replaces
    the model's forward; use ``patch_options={"compose_liger": True}``),
    ``nn.DataParallel`` (several GPUs in one process), both ``trajectory_dir``
    and ``recorder``, and a transformers version without
    ``Trainer._get_num_items_in_batch``.
    """

    def __init__(self, *args, trajectory_dir: Optional[Union[str, os.PathLike]] = None,
                 recorder: Optional[TrajectoryRecorder] = None,
                 trajectory_options: Optional[Mapping[str, Any]] = None,
                 patch_options: Optional[Mapping[str, Any]] = None,
                 log_token_metrics: bool = True, **kwargs):
        if trajectory_dir is not None and recorder is not None:
            raise ValueError("pass trajectory_dir= or recorder=, not both")
        if recorder is not None and not isinstance(recorder, TrajectoryRecorder):
            raise TypeError("recorder must be a t3s.TrajectoryRecorder, got "
                            f"{type(recorder).__name__}")
        if trajectory_options and trajectory_dir is None:
            raise ValueError("trajectory_options= needs trajectory_dir=")
        if not hasattr(Trainer, "_get_num_items_in_batch"):
            raise ValueError(
                f"transformers {transformers.__version__} has no "
                "Trainer._get_num_items_in_batch, the hook t3s uses to normalise accumulated "
                "masked losses by the kept tokens; upgrade: pip install -U transformers")
        self._t3s_patch_options = dict(patch_options or {})
        self._t3s_log_token_metrics = bool(log_token_metrics)
        self._t3s_trajectory_dir = None if trajectory_dir is None else os.fspath(trajectory_dir)
        self._t3s_trajectory_options = dict(trajectory_options or {})
        self.recorder: Optional[TrajectoryRecorder] = recorder
        self._t3s_sums: Dict[str, Dict[str, List[torch.Tensor]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)}
        self._t3s_steps_seen: set = set()

        if kwargs.get("data_collator") is None and len(args) < 3:
            pad = _pad_token_id(kwargs.get("processing_class"),
                                kwargs.get("model", args[0] if args else None))
            kwargs["data_collator"] = PaddedCollator(pad)
        super().__init__(*args, **kwargs)

        targs = self.args
        if getattr(targs, "label_smoothing_factor", 0.0):
            raise ValueError(
                "label_smoothing_factor needs full logits, which the fused loss never builds; pass "
                "patch_options={'label_smoothing': x} instead")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("compute_loss_func would bypass t3s's fused masked loss; subclass the "
                             "trainer and override compute_loss instead")
        if getattr(targs, "use_liger_kernel", False):
            raise ValueError("use_liger_kernel=True replaces the model's forward with liger's "
                             "fused loss; use patch_options={'compose_liger': True} for liger's "
                             "other kernels")
        if getattr(targs, "n_gpu", 1) > 1:
            raise ValueError(
                "nn.DataParallel (several GPUs visible to one process) is not supported: its "
                "replicas would not run the patched forward. Launch with torchrun / accelerate "
                "launch, or make one GPU visible with CUDA_VISIBLE_DEVICES")
        if self.model is not None:
            self._t3s_ensure_patched(self.model)
        if self._t3s_trajectory_dir is not None:
            self._t3s_store_fingerprints()  # fail now, not at train(), on data without keys
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, AccuracyCallback) and cb.trainer is None:
                cb.trainer = self

    # ------------------------------------------------------------------ patching
    def _t3s_ensure_patched(self, model) -> None:
        base = _unwrap(self, model)
        if not is_patched(base):
            patch(base, **self._t3s_patch_options)
        # The patched forward takes num_items_in_batch (and normalises by it).
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        cols = list(self._signature_columns or [])
        for name in ("input_ids", "labels", "attention_mask", "position_ids", "loss_mask",
                     "example_id"):
            if name not in cols:
                cols.append(name)
        self._signature_columns = cols

    # ------------------------------------------------------------------ recording
    def _t3s_store_fingerprints(self):
        """(dataset fingerprint, tokenizer fingerprint) for the store; computed once."""
        cached = getattr(self, "_t3s_fingerprints", None)
        if cached is not None:
            return cached
        opts = self._t3s_trajectory_options
        fp = opts.get("dataset_fingerprint")
        if fp is None:
            if self.train_dataset is None:
                raise ValueError("trajectory_dir= needs a train_dataset (or "
                                 "trajectory_options={'dataset_fingerprint': ...})")
            try:
                fp = dataset_fingerprint(self.train_dataset)
            except (KeyError, TypeError) as exc:
                raise ValueError(
                    "trajectory recording keys every token by (example_id, position): every "
                    "example of train_dataset needs 'example_id', 'input_ids' and 'labels' (as "
                    f"t3s.TraceDataset gives them); missing {exc}") from None
        tok = opts.get("tokenizer_fingerprint")
        if tok is None:
            tok = ""
            if hasattr(self.processing_class, "get_vocab"):
                tok = tokenizer_fingerprint(self.processing_class)
        self._t3s_fingerprints = (fp, tok)
        return fp, tok

    def _t3s_open_recorder(self) -> None:
        if self._t3s_trajectory_dir is None:
            if self.recorder is not None and self.recorder.closed:
                raise RuntimeError("the recorder passed to the trainer is closed (it is closed "
                                   "at the end of train()); pass trajectory_dir= to open one "
                                   "per run")
            return
        fp, tok = self._t3s_store_fingerprints()
        opts = {k: v for k, v in self._t3s_trajectory_options.items()
                if k not in ("dataset_fingerprint", "tokenizer_fingerprint")}
        opts.setdefault("rank", self.args.process_index)
        if "model_id" not in opts:
            config = getattr(self.model, "config", None)
            opts["model_id"] = str(getattr(config, "_name_or_path", "")
                                   or type(self.model).__name__)
        self.recorder = TrajectoryRecorder(self._t3s_trajectory_dir, dataset_fingerprint=fp,
                                           tokenizer_fingerprint=tok, **opts)

    def _t3s_close_recorder(self, failed: bool) -> None:
        rec = self.recorder
        if rec is None:
            return
        try:
            rec.close()
        except RuntimeError:
            if not failed:
                raise
            logger.warning("closing the trajectory recorder failed", exc_info=True)

    def train(self, *args, **kwargs):
        """``Trainer.train``, with the trajectory recorder opened before and closed after."""
        self._t3s_open_recorder()
        try:
            out = super().train(*args, **kwargs)
        except BaseException:
            self._t3s_close_recorder(failed=True)
            raise
        self._t3s_close_recorder(failed=False)
        return out

    # ------------------------------------------------------------------ accumulation
    def _get_num_items_in_batch(self, batch_samples: list, device) -> Optional[torch.Tensor]:
        """``num_items_in_batch`` for one optimizer step: the kept weight of its micro-batches.

        Σ over ``batch_samples`` of `t3s.count_loss_items(labels, loss_mask)`
        (targets after the causal shift, or ``shift_labels`` as given, times
        the mask), summed over ranks when ``average_tokens_across_devices`` and
        divided by the tensor/context/sequence-parallel degree, as transformers
        does with its label count. Float32 (masks may be fractional). Without
        labels it defers to the Trainer.
        """
        if (not batch_samples or not self.model_accepts_loss_kwargs
                or not all(isinstance(b, Mapping) and ("labels" in b or "shift_labels" in b)
                           for b in batch_samples)):
            return super()._get_num_items_in_batch(batch_samples, device)
        num = sum(_kept_weight(b)[0] for b in batch_samples)
        args = self.args
        if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
            num = self.accelerator.gather(num.to(device)).sum()
        num = num.to(device)
        divisor = 1
        for name in ("get_tp_size", "get_cp_size", "get_sp_size"):
            getter = getattr(self, name, None)
            if callable(getter):
                divisor *= int(getter())
        return num / divisor if divisor != 1 else num

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Run the patched model with the batch's ``loss_mask``; record and collect metrics.

        ``example_id`` is removed from the model inputs; ``loss_mask`` and
        ``num_items_in_batch`` are passed on. In training, with a recorder, the
        per-token log-probs are recorded at ``state.global_step``.
        """
        self._t3s_ensure_patched(model)
        inputs = dict(inputs)
        extras = {k: inputs.pop(k) for k in _NON_MODEL_KEYS if k in inputs}
        example_ids = extras.get("example_id")
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        loss_mask = inputs.get("loss_mask")
        if labels is None and shift_labels is None:
            if loss_mask is not None:
                raise ValueError("the batch has a loss_mask but no labels")
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        kept, labelled = _kept_weight(inputs)  # validates the mask's shape
        training = bool(model.training)
        mode = "train" if training else "eval"
        record = training and self.recorder is not None
        if record:
            if example_ids is None:
                raise ValueError(
                    "trajectory recording needs the batch's 'example_id' (one per row, or per "
                    "packed sequence): use t3s.PaddedCollator / t3s.PackedCollator on data with an "
                    "'example_id' column (t3s.TraceDataset has one)")
            if labels is None:
                raise ValueError("trajectory recording needs labels aligned with input_ids, not "
                                 "only shift_labels (e.g. under context parallelism)")
        want_stats = record or self._t3s_log_token_metrics
        if want_stats:
            inputs["return_token_stats"] = True
        if training:
            inputs.setdefault("use_cache", False)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        stats = outputs.get("token_stats") if isinstance(outputs, Mapping) else None
        if record:
            if stats is None:
                raise RuntimeError("the patched model returned no token_stats")
            self.recorder.record(int(self.state.global_step), stats, labels, example_ids,
                                 position_ids=inputs.get("position_ids"),
                                 attention_mask=inputs.get("attention_mask"))
        if self._t3s_log_token_metrics:
            self._t3s_collect(mode, kept, labelled, stats)
        args = self.args
        if (getattr(args, "average_tokens_across_devices", False) and num_items_in_batch is not None
                and self.model_accepts_loss_kwargs):
            # As Trainer.compute_loss: num_items_in_batch sums every rank's tokens, while
            # DDP averages the gradients over ranks.
            get_tp = getattr(self, "get_tp_size", None)
            tp = int(get_tp()) if callable(get_tp) else 1
            loss = loss * (self.accelerator.num_processes // tp)
        if return_outputs and isinstance(outputs, Mapping) and "token_stats" in outputs:
            # Not logits: keep it out of prediction_step's outputs (ModelOutput has no `del`).
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "token_stats"})
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _t3s_collect(self, mode: str, kept: torch.Tensor, labelled: torch.Tensor, stats) -> None:
        sums = self._t3s_sums[mode]
        sums["kept"].append(kept.detach().float())
        sums["labelled"].append(labelled.detach().float())
        if stats is not None:
            lp = stats.target_logprob
            ok = torch.isfinite(lp)
            sums["stat_tokens"].append(ok.sum().float())
            sums["logprob"].append(torch.where(ok, lp, 0.0).sum().float())
            sums["entropy"].append(torch.where(ok, stats.entropy.float(), 0.0).sum())
            sums["correct"].append((stats.argmax_correct & ok).sum().float())
        if mode == "train":
            self._t3s_steps_seen.add(int(self.state.global_step))

    def _t3s_pop_metrics(self, mode: str) -> Dict[str, float]:
        sums = self._t3s_sums[mode]
        if not sums.get("kept"):
            sums.clear()
            return {}
        device = sums["kept"][0].device
        totals = torch.stack([torch.stack(sums[k]).sum().to(device) if sums.get(k)
                              else torch.zeros((), device=device) for k in _SUMS])
        steps = max(len(self._t3s_steps_seen), 1) if mode == "train" else 1
        sums.clear()
        if mode == "train":
            self._t3s_steps_seen.clear()
        if getattr(self.accelerator, "num_processes", 1) > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        t = dict(zip(_SUMS, totals.double().cpu().tolist()))
        nan = float("nan")
        out = {"t3s/kept_fraction": t["kept"] / t["labelled"] if t["labelled"] else nan}
        if mode == "train":
            out["t3s/kept_tokens"] = t["kept"] / steps
        if t["stat_tokens"]:
            out["t3s/target_logprob"] = t["logprob"] / t["stat_tokens"]
            out["t3s/entropy"] = t["entropy"] / t["stat_tokens"]
            out["t3s/token_accuracy"] = t["correct"] / t["stat_tokens"]
        return out

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log`` plus the `METRICS` collected since the previous log.

        They are added to the Trainer's own training logs (those with ``loss``)
        and, prefixed ``eval_``, to evaluation logs (keys starting ``eval_``);
        other log calls (e.g. `AccuracyCallback`'s) pass through unchanged.
        """
        if self._t3s_log_token_metrics:
            if any(k.startswith("eval_") for k in logs):
                logs.update({f"eval_{k}": v for k, v in self._t3s_pop_metrics("eval").items()})
            elif "loss" in logs:
                logs.update(self._t3s_pop_metrics("train"))
        return super().log(logs, *args, **kwargs)


class T3STrainer(T3STrainerMixin, Trainer):
    """``transformers.Trainer`` with T3S's fused masked loss, exact accumulation, trajectory
    recording and token metrics; see `T3STrainerMixin` for the extra arguments."""


# --------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------

_SFT_CLASS = None


def sft_trainer_class():
    """``T3SSFTTrainer``: `T3STrainerMixin` on ``trl.SFTTrainer`` (built on first use).

    The t3s mixin's `compute_loss` replaces SFTTrainer's (TRL's own fused head
    stays installed but unused for the loss; its ``entropy`` /
    ``mean_token_accuracy`` metrics are replaced by `METRICS`). Datasets that
    are not ``datasets.Dataset`` (a `t3s.TraceDataset`, a list of example
    dicts) are converted with ``datasets.Dataset.from_list``, as TRL requires.
    When the training data is already tokenized (examples carry
    ``input_ids``), TRL's dataset preparation is skipped
    (``dataset_kwargs={"skip_prepare_dataset": True}`` is set): it would
    truncate ``input_ids`` and ``labels`` but not ``loss_mask``, and TRL's
    packing would lose ``example_id``. Loss masks and trajectory keys need a
    t3s collator (the default when ``data_collator`` is None); for
    padding-free batches pass ``data_collator=t3s.PackedCollator()``.

    Raises ImportError (with the install command) when trl is missing.
    """
    global _SFT_CLASS
    if _SFT_CLASS is not None:
        return _SFT_CLASS
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError("T3SSFTTrainer needs TRL: pip install trl") from exc

    class T3SSFTTrainer(T3STrainerMixin, SFTTrainer):
        __doc__ = sft_trainer_class.__doc__

        def __init__(self, model=None, args=None, data_collator=None, train_dataset=None,
                     eval_dataset=None, processing_class=None, **kwargs):
            train_dataset = _as_hf_dataset(train_dataset)
            if isinstance(eval_dataset, Mapping):
                eval_dataset = {k: _as_hf_dataset(v) for k, v in eval_dataset.items()}
            else:
                eval_dataset = _as_hf_dataset(eval_dataset)
            if hasattr(args, "dataset_kwargs") and _is_tokenized(train_dataset):
                dk = dict(getattr(args, "dataset_kwargs", None) or {})
                if not dk.get("skip_prepare_dataset"):
                    dk["skip_prepare_dataset"] = True
                    args.dataset_kwargs = dk
            super().__init__(model=model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)
            if getattr(self.args, "loss_type", "nll") != "nll":
                raise ValueError(f"loss_type={self.args.loss_type!r} is not supported by t3s's "
                                 "fused loss; use loss_type='nll'")

    T3SSFTTrainer.__module__ = __name__
    T3SSFTTrainer.__qualname__ = "T3SSFTTrainer"
    _SFT_CLASS = T3SSFTTrainer
    return T3SSFTTrainer


def __getattr__(name: str):
    if name == "T3SSFTTrainer":
        return sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# Training accuracy, bottleneck and checkpoint retention
# --------------------------------------------------------------------------------------


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
    (``eval_at_end``). Every rank evaluates (generation may need all ranks
    under sharding); only the main process writes files and deletes
    checkpoints.

    Each training accuracy feeds ``tracker`` (a `t3s.BottleneckTracker` with
    ``margin``, ``recover_margin`` and ``patience``) and is logged through the
    trainer (``trainer.log``; `T3STrainerMixin` binds itself, else pass
    ``trainer=`` or call `bind`; unbound, the values go to
    ``state.log_history``) as:

    * ``t3s/train_acc``: training accuracy at this step;
    * ``t3s/heldout_acc``: held-out accuracy (with ``heldout``);
    * ``t3s/bottleneck_step``: the argmin step so far (ties to the earliest).

    Checkpoint retention (``prune_checkpoints=True``): after each save, every
    ``checkpoint-<step>`` directory in ``output_dir`` that can no longer be
    θ_b is deleted: evaluated ones whose accuracy is above the running minimum
    + ``margin``, and ones never evaluated. The latest checkpoint is always
    kept, for resuming. Disk use stays O(1) in the number of steps. HF's own
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
                 tracker: Optional[BottleneckTracker] = None, stop_on_recovery: bool = False,
                 prune_checkpoints: bool = False, eval_at_start: bool = True,
                 eval_at_end: bool = True, history_file: str = ACCURACY_FILE,
                 progress: bool = False, trainer=None):
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
            margin=margin, recover_margin=recover_margin, patience=patience)
        self.stop_on_recovery = bool(stop_on_recovery)
        self.prune_checkpoints = bool(prune_checkpoints)
        self.eval_at_start = bool(eval_at_start)
        self.eval_at_end = bool(eval_at_end)
        self.history_file = history_file
        self.progress = bool(progress)
        self.trainer = trainer
        self.heldout_history: Dict[int, float] = {}
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
        """The argmin step of training accuracy so far (`t3s.find_bottleneck` semantics)."""
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
            t = self.tracker
            self.tracker = BottleneckTracker(margin=t.margin, recover_margin=t.recover_margin,
                                             patience=t.patience)
            self.heldout_history, self.deleted_checkpoints = {}, []
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
        if self.eval_at_end and (not self.tracker.history or step > max(self.tracker.history)):
            self._evaluate(model, args, state, control, at_end=True)
        else:
            self._write(args, state)
        return control

    # -- internals -----------------------------------------------------------------------
    def _accuracy(self, model, examples, subset_size) -> float:
        return float(training_accuracy(
            model, self.tokenizer, examples, verifier=self.verifier, subset_size=subset_size,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed,
            progress=self.progress, generation_kwargs=self.generation_kwargs))

    def _evaluate(self, model, args, state, control, at_end: bool = False) -> None:
        if model is None:
            raise ValueError("AccuracyCallback needs the model (it is given by the Trainer)")
        step = int(state.global_step)
        if self.tracker.history and step <= max(self.tracker.history):
            return
        was_done = self.tracker.done
        acc = self._accuracy(model, self.examples, self.subset_size)
        self.tracker.update(step, acc)
        metrics = {"t3s/train_acc": acc}
        if self.heldout is not None:
            held = self._accuracy(model, self.heldout, self.heldout_subset_size)
            self.heldout_history[step] = held
            metrics["t3s/heldout_acc"] = held
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
        found = self._checkpoints(output_dir)
        if not found:
            return
        latest = max(found)
        bound = self.tracker.running_min + self.tracker.margin
        for step, path in sorted(found.items()):
            if step == latest:
                continue
            acc = self.tracker.history.get(step)
            if acc is None or acc > bound:
                shutil.rmtree(path, ignore_errors=True)
                self.deleted_checkpoints.append(step)
                logger.info("t3s: deleted %s (%s)", path,
                            "not evaluated" if acc is None else
                            f"accuracy {acc:.4f} > running minimum + margin {bound:.4f}")

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
                         "patience": t.patience},
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
        self.deleted_checkpoints = list(saved.get("deleted_checkpoints", []))


def read_accuracy_history(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read the JSON that `AccuracyCallback` writes (a file, or the ``output_dir`` holding it).

    Returns its contents with ``train_acc`` and ``heldout_acc`` as
    ``{step (int): accuracy}``, ready for `t3s.find_bottleneck`.
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
    return data


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _unwrap(trainer, model):
    """The module `t3s.patch` applies to: without DDP/FSDP wrappers and PEFT adapters."""
    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        model = acc.unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        model = get_base()
    return model


def _kept_weight(batch: Mapping[str, Any]):
    """(kept weight, labelled targets) of one batch as float32 CPU/device scalars.

    Raises ValueError when ``loss_mask`` is not aligned with the labels.
    """
    shifted = batch.get("shift_labels") is not None
    labels = batch["shift_labels"] if shifted else batch["labels"]
    mask = batch.get("loss_mask")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(labels.shape):
            name = "shift_labels" if shifted else "labels"
            raise ValueError(f"loss_mask has shape {tuple(mask.shape)} but {name} has shape "
                             f"{tuple(labels.shape)}; the mask must be aligned with {name} "
                             "(one value per label)")
    kept = count_loss_items(labels, mask, shifted=shifted)
    labelled = count_loss_items(labels, None, shifted=shifted) if mask is not None else kept
    return kept, labelled


def _as_hf_dataset(dataset):
    """A ``datasets.Dataset`` for TRL: t3s datasets and lists of example dicts are converted
    (tensors become lists); ``datasets`` objects and None pass through."""
    if dataset is None:
        return None
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - trl depends on datasets
        raise ImportError("T3SSFTTrainer needs datasets: pip install datasets") from exc
    if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return dataset  # let TRL say what it accepts

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return value

    return datasets.Dataset.from_list([{k: plain(v) for k, v in dataset[i].items()}
                                       for i in range(len(dataset))])


def _is_tokenized(dataset) -> bool:
    if dataset is None:
        return False
    names = getattr(dataset, "column_names", None)
    if isinstance(names, (list, tuple)):
        return "input_ids" in names
    try:
        first = dataset[0]
    except Exception:  # iterable datasets, custom containers
        return False
    return isinstance(first, Mapping) and "input_ids" in first


def _pad_token_id(processing_class, model) -> int:
    tok = getattr(processing_class, "tokenizer", processing_class)  # processors wrap one
    for source in (tok, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0
