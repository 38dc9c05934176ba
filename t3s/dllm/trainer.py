"""Training a diffusion LM with `transformers.Trainer`: the collator, the trainer, accuracy.

Legend: B sequences in a micro-batch, L padded length.

* `DiffusionCollator`: pads examples (`t3s.PaddedCollator`) and adds
  ``response`` [B, L] bool (the tokens that may be masked: ``labels != -100``)
  and ``forced`` [B, L] bool (from ``forced_masks``, example_id -> [L]; all
  False without). The forced set never leaves the loss: it is not folded into
  the labels.
* `DiffusionTrainer`: ``compute_loss`` is `t3s.dllm.diffusion_sft_loss` on the
  model seen through a `MaskedLMAdapter` (a fresh noise level and random mask
  per sequence and step, the forced set on top). The loss of a micro-batch is
  LLaDA's per-batch mean, and the Trainer divides it by the accumulation steps.
  It logs, averaged over the micro-batches since the previous log, token-weighted:
  `METRICS`.
* `DiffusionAccuracyCallback`: `t3s.trainer.AccuracyCallback` whose accuracy is
  `t3s.dllm.diffusion_accuracy` (iterative unmasking instead of ``generate``).

One process, one device: the adapter reads the head of the unwrapped model.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from transformers import Trainer

from ..data.collate import PaddedCollator
from ..data import IGNORE_INDEX
from ..trainer import AccuracyCallback
from .evaluate import diffusion_accuracy, round_up
from .loss import FORCED_WEIGHTS, diffusion_sft_loss
from .masking import DEFAULT_EPS
from .models import MaskedLMAdapter

__all__ = ["DiffusionCollator", "DiffusionTrainer", "DiffusionAccuracyCallback", "METRICS"]

#: what `DiffusionTrainer.log` adds to the training logs
METRICS = {
    "t3s/forced_fraction": "forced tokens / maskable tokens (response, EOS padding included) "
                           "since the previous log",
    "t3s/masked_fraction": "masked tokens (random ∪ forced) / maskable tokens since the previous log",
    "t3s/mean_t": "mean noise level t of the sequences since the previous log",
}


class DiffusionCollator:
    """Padded batches for `DiffusionTrainer` (see the module docstring).

    pad_token_id: the padding id (padding is never masked: it is not response).
    forced_masks: example_id -> forced [L] bool aligned with ``labels``
    (`t3s.dllm.forced_masks`); every example of a batch needs one when given.
    eos_token_id: when given, each row is padded to the batch's length with this
    token instead, attended to and part of the response (maskable and in the
    loss), as in LLaDA's SFT: the model learns to fill the positions after its
    answer with EOS, which is what generation asks of it (a fixed number of masked
    positions after the prompt). ``min_length``: pad every batch to at least
    this many positions (e.g. the longest prompt plus the generation length).
    """

    def __init__(self, pad_token_id: int, *, forced_masks: Optional[Mapping[int, Any]] = None,
                 eos_token_id: Optional[int] = None, min_length: Optional[int] = None):
        if min_length is not None and eos_token_id is None:
            raise ValueError("min_length pads with eos_token_id; pass it too")
        self.forced_masks = forced_masks
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.min_length = None if min_length is None else int(min_length)
        self.padded = PaddedCollator(pad_token_id, loss_masks=forced_masks,
                                     fold_mask_into_labels=False)

    def __call__(self, examples):
        if self.forced_masks is not None:
            missing = [int(ex["example_id"]) for ex in examples
                       if "example_id" not in ex or int(ex["example_id"]) not in self.forced_masks]
            if missing:
                raise ValueError(f"no forced mask for examples {missing[:5]}")
        out = self.padded(examples)
        out["response"] = out["labels"] != IGNORE_INDEX
        mask = out.pop("loss_mask", None)
        out["forced"] = (torch.zeros_like(out["response"]) if mask is None
                         else mask.to(torch.bool) & out["response"])
        if self.eos_token_id is not None:
            if self.min_length is not None and out["input_ids"].shape[1] < self.min_length:
                extra = self.min_length - out["input_ids"].shape[1]
                for key in ("input_ids", "attention_mask", "labels", "response", "forced"):
                    x = out[key]
                    out[key] = torch.cat([x, x.new_zeros((x.shape[0], extra))], 1)
            pad = out["attention_mask"] == 0
            out["input_ids"] = torch.where(pad, torch.full_like(out["input_ids"], self.eos_token_id),
                                           out["input_ids"])
            out["labels"] = torch.where(pad, out["input_ids"], out["labels"])
            out["response"] = out["response"] | pad
            out["attention_mask"] = torch.ones_like(out["attention_mask"])
        return out


class DiffusionTrainer(Trainer):
    """`transformers.Trainer` with the masked-diffusion SFT loss (see the module docstring).

    Extra keyword arguments: ``mask_token_id`` (default: the tokenizer's /
    config's), ``forced_weight`` (`t3s.dllm.FORCED_WEIGHTS`, default
    ``"inv_t"``), ``eps`` (t ~ U(eps, 1)), ``verify`` (probe the model's head and
    bidirectional attention at construction). ``remove_unused_columns`` is
    turned off: the collator needs ``example_id`` and ``labels``. Without a
    ``data_collator``, a `DiffusionCollator` without forced set (plain diffusion
    SFT).
    """

    def __init__(self, *args, mask_token_id: Optional[int] = None, forced_weight: str = "inv_t",
                 eps: float = DEFAULT_EPS, verify: bool = True, **kwargs):
        if forced_weight not in FORCED_WEIGHTS:
            raise ValueError(f"forced_weight must be one of {FORCED_WEIGHTS}, got {forced_weight!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        model = kwargs.get("model", args[0] if args else None)
        tok = kwargs.get("processing_class")
        self.adapter = MaskedLMAdapter(model, tokenizer=tok, mask_token_id=mask_token_id, verify=verify)
        self.forced_weight = forced_weight
        self.eps = float(eps)
        if kwargs.get("data_collator") is None:
            pad = getattr(tok, "pad_token_id", None)
            if pad is None:
                raise ValueError("pass a data_collator or a tokenizer with a pad token")
            kwargs["data_collator"] = DiffusionCollator(pad)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        self.loss_is_scaled_for_ga = False     # a per-batch mean: the Trainer divides by GA
        self._sums: Dict[str, float] = {"forced": 0.0, "masked": 0.0, "response": 0.0,
                                        "t": 0.0, "seqs": 0.0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model is not self.adapter.model:       # replaced (model_init): a new adapter
            self.adapter = MaskedLMAdapter(self.model, mask_token_id=self.adapter.mask_token_id,
                                           verify=False)
        out = diffusion_sft_loss(self.adapter, inputs["input_ids"], inputs["response"],
                                 attention_mask=inputs.get("attention_mask"),
                                 forced=inputs.get("forced"), eps=self.eps,
                                 forced_weight=self.forced_weight)
        c = out.corruption
        if model.training:
            self._sums["forced"] += float(c.forced.sum())
            self._sums["masked"] += float(c.masked.sum())
            self._sums["response"] += float(c.response.sum())
            self._sums["t"] += float(c.t.sum())
            self._sums["seqs"] += float(c.t.numel())
        return (out.loss, {"corruption": c}) if return_outputs else out.loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log`` plus `METRICS` on the training logs (those with ``loss``)."""
        s = self._sums
        if "loss" in logs and s["seqs"] > 0:
            n = max(s["response"], 1.0)
            logs["t3s/forced_fraction"] = s["forced"] / n
            logs["t3s/masked_fraction"] = s["masked"] / n
            logs["t3s/mean_t"] = s["t"] / s["seqs"]
            for k in s:
                s[k] = 0.0
        return super().log(logs, *args, **kwargs)


class DiffusionAccuracyCallback(AccuracyCallback):
    """`t3s.trainer.AccuracyCallback` for a diffusion LM: accuracy by `diffusion_accuracy`.

    ``max_new_tokens`` is rounded up to a multiple of ``block_length``; ``steps``
    (default: that length) are the unmasking steps; ``mask_token_id`` as in
    `MaskedLMAdapter`.
    """

    def __init__(self, tokenizer, examples, *, block_length: int = 32, steps: Optional[int] = None,
                 mask_token_id: Optional[int] = None, **kwargs):
        if kwargs.get("engine") is not None:
            raise ValueError("a diffusion model generates by iterative unmasking "
                             "(t3s.dllm.diffusion_generate), which no generation engine "
                             "implements: leave engine unset")
        super().__init__(tokenizer, examples, **kwargs)
        self.block_length = int(block_length)
        self.gen_length = round_up(self.max_new_tokens, self.block_length)
        self.steps = self.gen_length if steps is None else int(steps)
        self.mask_token_id = mask_token_id

    def _accuracy(self, model, examples, subset_size, engine=None) -> float:
        adapter = MaskedLMAdapter(model, tokenizer=self.tokenizer, mask_token_id=self.mask_token_id,
                                  verify=False)
        return float(diffusion_accuracy(
            adapter, self.tokenizer, examples, verifier=self.verifier, subset_size=subset_size,
            gen_length=self.gen_length, steps=self.steps, block_length=self.block_length,
            batch_size=self.batch_size, seed=self.seed))
