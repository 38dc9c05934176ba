"""`T3STrainerMixin` / `T3STrainer`: the fused masked loss, exact accumulation,
trajectory recording and token metrics on a ``transformers.Trainer``.

See `t3s.trainer` for what a run gets. Legend: B batch rows, T padded sequence
length.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import transformers
from transformers import Trainer

from .. import dist
from ..artifact import dataset_fingerprint, tokenizer_fingerprint
from ..data.collate import PackedCollator, PaddedCollator, pad_token_id
from ..hf import count_loss_items, is_patched, patch
from ..trajectory.recorder import TrajectoryRecorder
from .accuracy import AccuracyCallback
from .callback import LossMaskCallback, TrajectoryCallback
from .checkpoints import checkpoint_step

__all__ = ["T3STrainerMixin", "T3STrainer", "METRICS"]

logger = logging.getLogger(__name__)

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
    # TRL's SFTTrainer names, so that dashboards built on TRL keep working.
    "entropy": "TRL's name: t3s/entropy",
    "mean_token_accuracy": "TRL's name: t3s/token_accuracy",
    "num_tokens": "TRL's name: input tokens trained on so far (attention mask, or packed length), "
                  "all ranks",
}
# Accumulated sums, in this order, per mode ("train" / "eval").
_SUMS = ("kept", "labelled", "stat_tokens", "logprob", "entropy", "correct", "input_tokens")
# Columns of TraceDataset examples that are not model inputs; kept out of the
# model call whatever remove_unused_columns says.
_NON_MODEL_KEYS = ("example_id",)


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

    Recording can also come from a `t3s.TrajectoryCallback` in ``callbacks``
    (not together with ``trajectory_dir`` / ``recorder``). A t3s collator left
    at ``fold_mask_into_labels=None`` is used with folding off (a copy): this
    trainer counts the kept weight itself, and ``t3s/kept_fraction`` needs the
    unfolded labels.

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
        self._t3s_num_tokens = 0.0  # TRL's num_tokens: input tokens trained on so far

        given_model = kwargs.get("model", args[0] if args else None)
        if isinstance(given_model, torch.nn.Module):
            # Before Trainer.__init__: callbacks (TrajectoryCallback) check it in on_init_end.
            self._t3s_ensure_patched(given_model)
        if kwargs.get("data_collator") is None and len(args) < 3:
            pad = pad_token_id(kwargs.get("processing_class"), given_model)
            kwargs["data_collator"] = PaddedCollator(pad, fold_mask_into_labels=False)
        super().__init__(*args, **kwargs)
        self.data_collator = _unfolded(self.data_collator)

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
        self._t3s_callbacks_record = False
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, AccuracyCallback) and cb.trainer is None:
                cb.trainer = self
            if isinstance(cb, LossMaskCallback):
                cb.counts_kept_items = True  # _get_num_items_in_batch counts the kept weight
            if isinstance(cb, TrajectoryCallback):
                if self._t3s_trajectory_dir is not None or self.recorder is not None:
                    raise ValueError("a TrajectoryCallback records already: pass it or "
                                     "trajectory_dir= / recorder=, not both")
                self._t3s_callbacks_record = True

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
        if dist.world_size() > 1 and self.args.world_size == 1 and "rank" not in opts:
            # The Trainer sees one process under a larger process group (accelerate's
            # DeepSpeed state on CPU): it does not split the data, every rank trains on
            # the same batches, so rank 0's shard alone is the whole trajectory.
            if not dist.is_main():
                return
            logger.warning(
                "the Trainer sees one process (args.world_size 1) under a process group of "
                "%d ranks: every rank trains on the same batches; rank 0 records the "
                "trajectory", dist.world_size())
        opts.setdefault("rank", self.args.process_index)
        opts.setdefault("world_size", self.args.world_size)  # readers then notice a lost shard
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

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, with the trajectory recorder opened before and closed after.

        resume_from_checkpoint: as in ``Trainer.train``. The store then loses the
        records of the checkpoint's step and later ones (a killed run wrote them
        past its checkpoint), since the resumed run records them again: every
        (step, example, position) is stored once.
        """
        self._t3s_open_recorder()
        if resume_from_checkpoint and self.recorder is not None:
            step = checkpoint_step(resume_from_checkpoint, self.args.output_dir)
            dropped = self.recorder.rewind(step)
            if dropped:
                logger.info("t3s: resuming at step %d: dropped %d trajectory records of steps "
                            ">= %d", step, dropped, step)
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._t3s_close_recorder(failed=True)
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, TrajectoryCallback):
                    cb.close_recorder()
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
        if getattr(self.args, "loss_type", "nll") == "dft":  # TRL's SFTConfig: DFT in the kernel
            inputs["token_scaling"] = True
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        if self._t3s_callbacks_record and example_ids is not None:
            inputs["example_id"] = example_ids  # TrajectoryCallback's pre-hook takes it out
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
            self._t3s_collect(mode, kept, labelled, stats, _input_tokens(inputs))
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
    def _t3s_collect(self, mode: str, kept: torch.Tensor, labelled: torch.Tensor, stats,
                     input_tokens: torch.Tensor) -> None:
        sums = self._t3s_sums[mode]
        sums["kept"].append(kept.detach().float())
        sums["input_tokens"].append(input_tokens.to(kept.device).float())
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
            self._t3s_num_tokens += t["input_tokens"]
            out["num_tokens"] = self._t3s_num_tokens
        if t["stat_tokens"]:
            out["t3s/target_logprob"] = t["logprob"] / t["stat_tokens"]
            out["t3s/entropy"] = out["entropy"] = t["entropy"] / t["stat_tokens"]
            out["t3s/token_accuracy"] = out["mean_token_accuracy"] = \
                t["correct"] / t["stat_tokens"]
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


def _unwrap(trainer, model):
    """The module `t3s.patch` applies to: without DDP/FSDP wrappers and PEFT adapters."""
    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        model = acc.unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        model = get_base()
    return model


def _unfolded(collator):
    """A t3s collator left at the automatic fold, as a copy with folding off (see the class)."""
    if (isinstance(collator, (PaddedCollator, PackedCollator))
            and collator.fold_mask_into_labels is None):
        collator = copy.copy(collator)
        collator.fold_mask_into_labels = False
    return collator


def _input_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's input tokens as TRL counts them: the attention mask's sum, else the
    packed row's length (padding-free batches carry ``position_ids`` [1, L])."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.sum()
    ids = batch.get("position_ids", batch.get("input_ids"))
    return torch.tensor(float(ids.numel()) if isinstance(ids, torch.Tensor) else 0.0)


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
