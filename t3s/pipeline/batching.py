"""How a run batches its traces and which attention it runs: ``--attn-implementation``
and ``--packing``.

- `attn_implementation` (`t3s.pipeline.loaders`, re-exported): what models are
  loaded with. ``auto`` is ``flash_attention_2`` where flash-attn imports, the device
  is CUDA and the dtype is bf16 / fp16 (its kernels take no float32), else
  transformers' own choice (sdpa where the model supports it, else eager).
- `packing_wanted`: whether the training and profiling passes put each batch into
  one padding-free row (`t3s.PackedCollator`; `t3s.profile(packing=True)`).
  ``auto`` packs under flash attention only: its varlen kernels cost Σ L² over the
  sequences, while sdpa and eager get a dense block-diagonal mask over the whole row,
  (Σ L)². On the CPU (benchmarks/RESULTS.md, `benchmarks/packing.py`) packed training
  steps gained ×1.2–1.5 in most runs, but the profiling pass lost on the demo's
  length-sorted batches (×0.15–0.87): no steady win, so sdpa / eager pad unless
  ``on``.
- `use_packing`: the wanted packing, for one loaded model: a model whose attention
  does not keep packed sequences apart (`t3s.hf.packing.packing_support`) pads, and
  the run says so once.
- `train_collator`: the collator of a training stage.

Packing changes no number beyond floating-point rounding (the same tokens, the same
masks, the same loss normaliser), but the rounding differs from the padded path's, so
both settings are hashed into the stages that train or profile.

Under a launcher (several ranks) every rank trains on its slice of each batch
(accelerate's ``split_batches``). Padded batches are collated once and cut into slices
by rows (``dispatch_batches``); a packed batch is one row, so there each rank takes its
slice of the batch's examples and packs them itself (`training_args` with
``packed=True``): the same examples per rank either way. Profiling packs per rank too.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from .loaders import attn_implementation, check_attention

__all__ = ["attn_implementation", "check_attention", "packing_wanted", "use_packing",
           "train_collator", "is_packed", "ATTENTION_KEYS"]

logger = logging.getLogger(__name__)

#: the settings of this module, hashed into every stage that trains or profiles
ATTENTION_KEYS = ("attn_implementation", "packing")
# warnings said already in this process: one line per reason, not one per stage
_SAID: set = set()


def packing_wanted(cfg: Mapping[str, Any], attention: str) -> bool:
    """Whether ``packing`` asks for packed batches under ``attention`` (the model's
    implementation): ``on``; ``auto`` with flash attention only (see the module)."""
    setting = cfg.get("packing", "auto")
    if setting == "auto":
        return attention.startswith("flash_attention")
    return setting == "on"


def _say_once(reason: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        logger.warning("t3s: %s", reason)


def use_packing(model, cfg: Mapping[str, Any]) -> bool:
    """Whether ``model``'s training and profiling passes pack: the setting, unless the
    model cannot (then the reason is said once and the passes pad)."""
    from ..hf.packing import attention_of, packing_support
    if not packing_wanted(cfg, attention_of(model)):
        return False
    ok, why = packing_support(model)
    if not ok:
        _say_once(f"packing: {why}; padding its batches instead")
    return ok


def train_collator(model, cfg: Mapping[str, Any], pad_token_id: int,
                   loss_masks: Optional[Mapping[int, Any]] = None):
    """The collator of a training stage for ``model``: `t3s.PackedCollator` (with
    FlashAttention's ``cu_seq_lens`` / ``max_length`` keywords under flash attention)
    when `use_packing`, else `t3s.PaddedCollator`. ``loss_masks``: example_id -> [L]."""
    from ..data import PackedCollator, PaddedCollator
    from ..hf.packing import attention_of
    if use_packing(model, cfg):
        flash = attention_of(model).startswith("flash_attention")
        return PackedCollator(loss_masks=loss_masks, return_flash_attn_kwargs=flash)
    return PaddedCollator(pad_token_id, loss_masks=loss_masks)


def is_packed(collator) -> bool:
    """Whether a training stage's ``collator`` (from `train_collator`) packs: its
    `training_args` then take ``packed=True``."""
    from ..data import PackedCollator
    return isinstance(collator, PackedCollator)
