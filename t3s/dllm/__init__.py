"""T3S for masked-diffusion language models (LLaDA-style SFT) with an autoregressive selector.

The method for diffusion LMs: an autoregressive model that shares the
diffusion model's tokenizer runs the T3S pilot and selection (Δc = c(θb) −
c(θ0)); the forced set S = {Δc < −τ} (τ = 0.2 by default, stored in the
`t3s.SelectionArtifact`) is then masked in every training step of the
diffusion model, on top of the random corruption, and every masked position is
reconstructed.

Modules, in the order a training step uses them:

- `t3s.dllm.selector`: the AR selector's artifact -> forced set per example
  (`forced_masks`; tokenizer fingerprint and data checked), the same-size
  random set (`random_forced_masks`);
- `t3s.dllm.masking`: t ~ U(eps, 1) per sequence, the random mask of the
  response with probability t, the forced set on top (`corrupt`);
- `t3s.dllm.loss`: LLaDA's 1/t-weighted SFT loss through
  `t3s_kernels.linear_cross_entropy` with per-token float weights
  (`diffusion_sft_loss`; forced tokens weighted 1/t or 1, ``forced_weight``);
- `t3s.dllm.models`: `MaskedLMAdapter` for any HF bidirectional masked LM
  (`load_masked_lm`) and LLaDA-style models (`load_llada`, ``trust_remote_code``
  off unless passed);
- `t3s.dllm.generate`, `t3s.dllm.evaluate`: iterative unmasking with
  low-confidence remasking (``steps``, ``block_length``) and accuracy with the
  verifiers of the AR path;
- `t3s.dllm.trainer`: `DiffusionCollator`, `DiffusionTrainer` (logs
  ``t3s/forced_fraction``), `DiffusionAccuracyCallback` (it imports transformers, so
  this package loads it on first use of one of its names).

The rest of the diffusion side sits here too, in the layers above, and this package module
imports none of it (importing the method never loads the pipeline):

- `t3s.dllm.pipeline` (pipeline layer): the ``objective: diffusion`` train, baseline
  and eval stages of ``t3s run``;
- `t3s.dllm.report` (pipeline layer): the report of a diffusion run;
- `t3s.dllm.demo`, `t3s.dllm.demo_model` (demo layer): ``t3s demo --diffusion`` and its
  bidirectional student (shipped in ``t3s/demo/assets/diffusion_base``).

Example::

    adapter, tok = t3s.dllm.load_masked_lm("diffusion_model_dir")
    train = t3s.TraceDataset.from_jsonl("traces.jsonl", tok)
    forced = t3s.dllm.forced_masks("ar_run/select/selection.parquet", train, tok)
    trainer = t3s.dllm.DiffusionTrainer(
        model=adapter.model, args=args, train_dataset=train, processing_class=tok,
        data_collator=t3s.dllm.DiffusionCollator(tok.pad_token_id, forced_masks=forced))
    trainer.train()
"""

from .evaluate import diffusion_accuracy, prompt_tokens
from .generate import REMASKING, check_schedule, diffusion_generate
from .loss import (FORCED_WEIGHTS, DiffusionLoss, diffusion_sft_loss, diffusion_token_weights,
                   masked_diffusion_loss)
from .masking import DEFAULT_EPS, Corruption, corrupt, sample_noise_levels
from .models import (MaskedLMAdapter, load_diffusion_lm, load_llada, load_masked_lm,
                     resolve_mask_token_id)
from .selector import (DEFAULT_TAU, forced_artifact, forced_fraction_of, forced_masks,
                       random_forced_masks)

#: the names of `t3s.dllm.trainer`, which imports transformers (seconds): loaded on first use
_TRAINER_NAMES = ("METRICS", "DiffusionAccuracyCallback", "DiffusionCollator", "DiffusionTrainer")

__all__ = [
    "DEFAULT_EPS", "DEFAULT_TAU", "FORCED_WEIGHTS", "REMASKING", "METRICS",
    "Corruption", "sample_noise_levels", "corrupt",
    "diffusion_token_weights", "masked_diffusion_loss", "DiffusionLoss", "diffusion_sft_loss",
    "MaskedLMAdapter", "load_masked_lm", "load_llada", "load_diffusion_lm", "resolve_mask_token_id",
    "forced_artifact", "forced_masks", "random_forced_masks", "forced_fraction_of",
    "check_schedule", "diffusion_generate", "diffusion_accuracy", "prompt_tokens",
    "DiffusionCollator", "DiffusionTrainer", "DiffusionAccuracyCallback",
]


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 't3s.dllm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_TRAINER_NAMES))
