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

`TrajectoryCallback` records the same trajectory in a plain
``transformers.Trainer`` with a `t3s.patch`-ed model (no subclass), and
`LossMaskCallback` gives such a Trainer t3s's mask checks (an unpatched model,
the loss normaliser); see `t3s.trainer.callback`.

Modules: `t3s.trainer.mixin` (the trainers), `t3s.trainer.accuracy` (the
accuracy callback, `read_accuracy_history`), `t3s.trainer.callback` (the
recording and mask callbacks), `t3s.trainer.sft` (TRL).

Legend: B batch rows, T padded sequence length.
"""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "t3s.trainer needs transformers and accelerate: pip install transformers accelerate "
        "(or pip install 't3s[hf]')") from exc

from ..data.table import IGNORE_INDEX  # noqa: F401  (re-exported: t3s.trainer had it)
from .accuracy import ACCURACY_FILE, AccuracyCallback, read_accuracy_history
from .callback import LossMaskCallback, TrajectoryCallback, keep_example_id_column
from .checkpoints import TRAINER_STATE_FILE, checkpoint_step
from .mixin import METRICS, T3STrainer, T3STrainerMixin
from .sft import sft_trainer_class, trl_dataset

__all__ = [
    "T3STrainerMixin",
    "T3STrainer",
    "T3SSFTTrainer",
    "sft_trainer_class",
    "trl_dataset",
    "AccuracyCallback",
    "TrajectoryCallback",
    "LossMaskCallback",
    "keep_example_id_column",
    "read_accuracy_history",
    "ACCURACY_FILE",
    "METRICS",
    "checkpoint_step",
    "TRAINER_STATE_FILE",
]


def __getattr__(name: str):
    # T3SSFTTrainer is built on first access: importing t3s.trainer must not import TRL.
    if name == "T3SSFTTrainer":
        return sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
