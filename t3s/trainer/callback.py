"""`LossMaskCallback` / `TrajectoryCallback`: t3s's checks and trajectory recording in any Trainer.

With a plain ``transformers.Trainer`` (no t3s subclass), two lines record
every trained token's log p(y_t) at every step::

    t3s.patch(model)
    Trainer(model, args, train_dataset=ds, data_collator=t3s.PaddedCollator(pad),
            callbacks=[t3s.TrajectoryCallback("traj/")]).train()

How it works, with public APIs only. The callback puts a forward pre-hook
and a forward hook (``nn.Module.register_forward_pre_hook(with_kwargs=True)``)
on the model the Trainer calls. In training, the pre-hook takes the batch's
``example_id`` out of the model inputs and asks the patched forward for
``return_token_stats=True``; the forward hook hands ``output.token_stats``
([B, T], the statistic at i belongs to ``labels[:, i + 1]``) with the labels
and ids to a `t3s.TrajectoryRecorder`, and drops ``token_stats`` from the
output again unless the caller asked for it. So the values come from the loss
pass itself: no extra forward.

``example_id``: the Trainer keeps only the dataset columns named in the
model's forward signature (``remove_unused_columns``), and t3s's patched
signature does not name ``example_id``. The callback adds it, as a
keyword-only parameter of the patched forward's ``__signature__``
(`keep_example_id_column`), when the Trainer is built (``on_init_end``, before
any dataloader exists); the pre-hook removes the value before the model sees
it, in training and evaluation alike.

Legend: B batch rows, T padded sequence length.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from transformers import TrainerCallback

from ..artifact import dataset_fingerprint, tokenizer_fingerprint
from ..data.collate import check_mask_reaches_loss, patched_model
from ..hf import count_loss_items, shift_for_causal_lm
from ..hf.trl_head import TRL_HEAD_KWARG
from ..trajectory.recorder import TrajectoryRecorder

__all__ = ["LossMaskCallback", "TrajectoryCallback", "keep_example_id_column"]

logger = logging.getLogger(__name__)


def keep_example_id_column(model: torch.nn.Module, keep: bool = True) -> bool:
    """Name (``keep=True``) or stop naming ``example_id`` in a patched forward's signature.

    HF's Trainer drops every dataset column its model's ``forward`` signature
    does not name; ``example_id`` must survive to key the recorded tokens. Only
    the ``__signature__`` that `t3s.patch` set is changed; the forward itself
    never receives the value (`LossMaskCallback`'s pre-hook removes it).
    Returns whether the signature named ``example_id`` before the call.
    """
    target = patched_model(model)
    if target is None:
        raise ValueError(f"{type(model).__name__} is not patched by t3s")
    forward = target.forward  # what the Trainer inspects
    sig = inspect.signature(forward)
    P = inspect.Parameter
    had = "example_id" in sig.parameters
    if had == keep:
        return had
    params = [p for p in sig.parameters.values() if p.name != "example_id"]
    if keep:
        at = next((i for i, p in enumerate(params) if p.kind == P.VAR_KEYWORD), len(params))
        params.insert(at, P("example_id", P.KEYWORD_ONLY, default=None))
    try:
        forward.__signature__ = sig.replace(parameters=params)
    except AttributeError:  # a bound method installed over t3s's forward
        raise ValueError(
            f"cannot name example_id in {type(target).__name__}.forward ({type(forward).__name__}, "
            "installed after t3s.patch); pass TrainingArguments(remove_unused_columns=False) so "
            "the Trainer keeps the column") from None
    return had


class LossMaskCallback(TrainerCallback):
    """t3s's checks on the batches a Trainer feeds a `t3s.patch`-ed model.

    * Refuses, when the Trainer is built (``on_init_end``), a model that is not
      patched (its loss would ignore ``loss_mask`` silently), and at every
      forward a batch whose ``loss_mask`` heads for an unpatched model.
    * Removes ``example_id`` from the model inputs (see `keep_example_id_column`).
    * Makes the loss normaliser match the mask. A plain Trainer divides the
      summed loss by ``num_items_in_batch`` = its count of labelled targets
      over the micro-batches of one step. That is the kept weight exactly when
      the mask is 1 on every labelled target (a 0/1 mask folded into the labels,
      `t3s.PaddedCollator`'s default). Otherwise (weights, or an unfolded 0/1
      mask) the callback replaces it with `t3s.count_loss_items` (labels,
      loss_mask) when one micro-batch is the whole step (gradient accumulation
      1, one process). With accumulation or several processes it cannot: the
      first micro-batch's loss needs the kept weight of the whole step, which
      no callback sees before that micro-batch runs. That case raises
      ValueError at the first forward (before any update); use
      `t3s.trainer.T3STrainer`, which counts the kept weight of the step
      itself. Checking the mask costs one host sync per micro-batch that has
      one.

    ``counts_kept_items`` is set True by `t3s.trainer.T3STrainerMixin`, whose
    ``num_items_in_batch`` is already the kept weight.
    """

    def __init__(self):
        self.counts_kept_items = False
        self.model: Optional[torch.nn.Module] = None
        self._handles = []
        self._accumulates = False
        self._named_example_id = False  # whether attach added example_id to the signature

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if getattr(args, "n_gpu", 1) > 1:
            raise ValueError(f"{type(self).__name__}: nn.DataParallel (several GPUs in one "
                             "process) is not supported; launch with torchrun / accelerate")
        self._accumulates = (args.gradient_accumulation_steps > 1 or args.world_size > 1)
        if model is not None:  # None with model_init: attached in on_train_begin
            self.attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._accumulates = (args.gradient_accumulation_steps > 1 or args.world_size > 1)
        if model is not None and model is not self.model:
            self.attach(model)

    # ------------------------------------------------------------------ hooks
    def attach(self, model: torch.nn.Module) -> None:
        """Install the hooks on ``model`` (the module the Trainer calls); once per model."""
        if patched_model(model) is None:
            raise ValueError(
                f"{type(self).__name__} needs a t3s.patch-ed model (its fused loss takes "
                f"loss_mask and gives the per-token statistics); {type(model).__name__} is not "
                "patched: call t3s.patch(model) before creating the Trainer")
        self.detach()
        self._named_example_id = not keep_example_id_column(model)
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]
        self.model = model

    def detach(self) -> None:
        """Remove the hooks and the ``example_id`` signature entry (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if (self._named_example_id and self.model is not None
                and patched_model(self.model) is not None):
            keep_example_id_column(self.model, keep=False)  # only what attach added
        self._named_example_id = False
        self.model = None

    def _before(self, module, args, kwargs):
        example_id = kwargs.pop("example_id", None)
        mask = kwargs.get("loss_mask")
        if mask is not None:
            check_mask_reaches_loss(module, "the batch")
        labels = kwargs.get("labels")
        if module.training and labels is not None and mask is not None:
            self._normaliser(kwargs, labels, mask)
        return self._prepare(module, args, kwargs, example_id)

    def _prepare(self, module, args, kwargs, example_id):
        """The inputs the forward gets (a subclass may ask for more); ``example_id`` removed."""
        return args, kwargs

    def _normaliser(self, kwargs, labels, mask) -> None:
        if self.counts_kept_items:
            return
        shifted = kwargs.get("shift_labels") is not None
        if shifted:
            targets, m = kwargs["shift_labels"], mask
        else:
            targets, m = shift_for_causal_lm(labels, mask)
        if not bool(((targets != -100) & (m.to(targets.device) != 1)).any()):
            return  # the Trainer's label count is the kept weight
        if self._accumulates:
            raise ValueError(
                "this batch's loss_mask is not 1 on every labelled token (weights, or a 0/1 mask "
                "not folded into the labels), and the plain Trainer normalises the loss by its "
                "count of labelled tokens. With gradient_accumulation_steps > 1 or several "
                "processes no callback can correct that (the step's kept weight is needed before "
                "its first micro-batch): train with t3s.trainer.T3STrainer, which counts the "
                "kept weight, or use a 0/1 mask folded into the labels (t3s.PaddedCollator's "
                "default)")
        if kwargs.get("num_items_in_batch") is not None:
            kwargs["num_items_in_batch"] = count_loss_items(
                kwargs["shift_labels"] if shifted else labels, mask, shifted=shifted)

    def _after(self, module, args, kwargs, output):
        return None


class TrajectoryCallback(LossMaskCallback):
    """Records every trained token's log p(y_t) at every training step (see the module doc).

    Args:
        store_dir: directory of the trajectory store (one shard per rank,
            ``rank = args.process_index``), opened (appending) at each
            ``train()``. Or pass ``recorder=``.
        recorder: an open `t3s.TrajectoryRecorder` to use instead (closed at the
            end of ``train()``).
        **recorder_options: for the recorder opened on ``store_dir``:
            ``dataset_fingerprint`` (default: `t3s.dataset_fingerprint` of the
            training dataloader's dataset, whose examples need ``example_id``,
            ``input_ids`` and ``labels``), ``tokenizer_fingerprint`` (default:
            the Trainer's ``processing_class`` when it is a tokenizer),
            ``model_id``, ``extra_columns`` (e.g. ``("entropy",)``), ``fsync``,
            ``max_queue``, ``metadata``.

    Values are recorded under ``step`` = the optimizer updates applied before
    the forward (0 = θ0; all micro-batches of one step share it), keyed by the
    batch's ``example_id`` [B] (padded) or [num_sequences] (packed) and the
    target's position; only tokens the loss trained on (finite statistics) are
    written. Batches need ``example_id``: `t3s.PaddedCollator` /
    `t3s.PackedCollator` on data with that column (`t3s.TraceDataset`).

    Also does everything `LossMaskCallback` does. Works with a plain
    ``transformers.Trainer`` and with `t3s.trainer.T3STrainer` /
    ``T3SSFTTrainer``. A step in which no training forward of the patched
    model was seen raises RuntimeError (e.g. a wrapper that bypasses
    ``model(...)``). If ``train()`` raises, call `close_recorder` (else the
    queued steps are written at interpreter exit).
    """

    def __init__(self, store_dir: Optional[Union[str, os.PathLike]] = None, *,
                 recorder: Optional[TrajectoryRecorder] = None, **recorder_options: Any):
        super().__init__()
        if (store_dir is None) == (recorder is None):
            raise ValueError("pass store_dir or recorder= (exactly one)")
        if recorder is not None:
            if not isinstance(recorder, TrajectoryRecorder):
                raise TypeError(f"recorder must be a t3s.TrajectoryRecorder, got "
                                f"{type(recorder).__name__}")
            if recorder_options:
                raise ValueError(f"recorder options {sorted(recorder_options)} need store_dir")
        bad = sorted(set(recorder_options) - _RECORDER_OPTIONS)
        if bad:
            raise TypeError(f"unknown recorder option(s) {bad}; known: {sorted(_RECORDER_OPTIONS)}")
        self.store_dir = None if store_dir is None else os.fspath(store_dir)
        self.recorder_options = dict(recorder_options)
        self.recorder: Optional[TrajectoryRecorder] = recorder
        self._state = None
        self._tokenizer = None
        self._recording = False
        self._pending = None
        self._seen_in_step = 0

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._tokenizer = processing_class
        super().on_init_end(args, state, control, model=model, **kwargs)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if self.model is None:
            raise ValueError("TrajectoryCallback got no model from the Trainer")
        self._open(args, train_dataloader)
        if state.global_step > 0 and self.recorder is not None:
            # resumed from a checkpoint: what a killed run recorded past it is recorded again
            self.recorder.rewind(int(state.global_step))
        self._state = state
        self._recording = True
        self._seen_in_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._recording and self._seen_in_step == 0:
            self.close_recorder()
            raise RuntimeError(
                f"TrajectoryCallback saw no training forward of {type(self.model).__name__} with "
                f"labels in step {state.global_step}: something called the model's forward "
                "without model(...) (its hooks), or passed labels positionally")
        self._seen_in_step = 0

    def on_train_end(self, args, state, control, **kwargs):
        self.close_recorder()

    def close_recorder(self) -> None:
        """Stop recording; drain and close the recorder (idempotent)."""
        self._recording = False
        self._pending = None
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.close()

    # ------------------------------------------------------------------ recording
    def _open(self, args, train_dataloader) -> None:
        if self.store_dir is None:
            if self.recorder.closed:
                raise RuntimeError("the recorder passed to TrajectoryCallback is closed (it is "
                                   "closed at the end of train()); pass store_dir to open one "
                                   "per run")
            return
        opts = dict(self.recorder_options)
        if opts.get("dataset_fingerprint") is None:
            dataset = getattr(train_dataloader, "dataset", None)
            try:
                opts["dataset_fingerprint"] = dataset_fingerprint(dataset)
            except (KeyError, TypeError) as exc:
                raise ValueError(
                    "TrajectoryCallback keys every token by (example_id, position): every "
                    "training example needs 'example_id', 'input_ids' and 'labels' (as "
                    "t3s.TraceDataset gives them), or pass dataset_fingerprint=; missing "
                    f"{exc}") from None
        if opts.get("tokenizer_fingerprint") is None:
            tok = self._tokenizer
            opts["tokenizer_fingerprint"] = (tokenizer_fingerprint(tok)
                                             if hasattr(tok, "get_vocab") else "")
        if opts.get("model_id") is None:
            config = getattr(patched_model(self.model), "config", None)
            opts["model_id"] = str(getattr(config, "_name_or_path", "")
                                   or type(self.model).__name__)
        opts["rank"] = args.process_index
        opts["world_size"] = args.world_size  # readers then notice a lost shard
        self.recorder = TrajectoryRecorder(self.store_dir, **opts)

    def _prepare(self, module, args, kwargs, example_id):
        self._pending = None
        labels = kwargs.get("labels")
        if not (self._recording and module.training and labels is not None):
            return args, kwargs
        if example_id is None:
            raise ValueError(
                "trajectory recording needs the batch's 'example_id' (one per row, or per packed "
                "sequence): use t3s.PaddedCollator / t3s.PackedCollator on data with an "
                "'example_id' column (t3s.TraceDataset has one); if the Trainer's column filter "
                "dropped it (a model from model_init), pass "
                "TrainingArguments(remove_unused_columns=False)")
        asked = bool(kwargs.get("return_token_stats", False))
        # TRL's fused head (fused_lm_head=True) returns per-token log-probs of its own.
        trl = bool(kwargs.get("fused_lm_head")) or kwargs.get(TRL_HEAD_KWARG) is not None
        if not trl:
            kwargs["return_token_stats"] = True
        self._pending = (labels, example_id, kwargs.get("position_ids"),
                         kwargs.get("attention_mask"), asked, trl)
        return args, kwargs

    def _after(self, module, args, kwargs, output):
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        labels, example_id, position_ids, attention_mask, asked, trl = pending
        if trl:
            values, extras = self._trl_values(output)
            self.recorder.record(int(self._state.global_step), values, labels, example_id,
                                 position_ids=position_ids, attention_mask=attention_mask,
                                 extras=extras)
            self._seen_in_step += 1
            return None
        stats = output.get("token_stats") if isinstance(output, Mapping) else None
        if stats is None:
            raise RuntimeError("the patched model returned no token_stats (TrajectoryCallback "
                               "needs return_dict=True outputs)")
        self.recorder.record(int(self._state.global_step), stats, labels, example_id,
                             position_ids=position_ids, attention_mask=attention_mask)
        self._seen_in_step += 1
        if asked:
            return None
        # Not asked for by the caller: keep the output as the model would give it.
        return type(output)(**{k: v for k, v in output.items() if k != "token_stats"})

    def _trl_values(self, output):
        """(values [B, T-1], extras) from TRL's ``FusedCausalLMOutput``: its ``log_probs``,
        NaN where ``label_mask`` is False (not trained), and its fields named like the
        store's extra columns."""
        log_probs = output.get("log_probs") if isinstance(output, Mapping) else None
        mask = output.get("label_mask") if isinstance(output, Mapping) else None
        if log_probs is None or mask is None:
            raise RuntimeError("TRL's fused LM head returned no log_probs / label_mask")
        nan = float("nan")
        values = torch.where(mask, log_probs.detach().float(), nan)
        extras = {}
        for name in self.recorder.extra_columns:
            field = output.get(name)
            if field is None:
                raise ValueError(f"the trajectory store records {name!r}, which TRL's fused "
                                 "head of this trainer does not compute (its outputs=)")
            extras[name] = torch.where(mask, field.detach().float(), nan)
        return values, extras


_RECORDER_OPTIONS = frozenset(
    name for name in inspect.signature(TrajectoryRecorder).parameters
    if name not in ("store", "rank", "mode"))
