"""Hugging Face integration: one generic fused-loss patch for any ``*ForCausalLM``.

- `patch` / `unpatch` / `is_patched` (`t3s.hf.patch`): the fused, maskable loss;
- `lm_head`, `LMHead`, `last_hidden_state`, `output_embedding` (`t3s.hf.heads`): how
  a model turns hidden states into logits, measured by a probe;
- `HeadTap` (`t3s.hf.tap`): the capture of the head's input;
- `shift_for_causal_lm`, `count_loss_items` (`t3s.hf.labels`): label conventions;
- `apply_liger` (`t3s.hf.liger`): composition with liger-kernel's other kernels;
- `check_causal_lm`, `BypassGuard` (`t3s.hf.guards`): which models the patch takes,
  and the refusal of a training forward that would skip t3s's loss;
- `t3s.hf.trl_head`: TRL's fused LM head (``fused_lm_head=True``) on t3s's kernels;
- `t3s.hf.packing`: whether a model's attention keeps packed (padding-free) sequences
  apart (`packing_support`, a probe).
"""

from .guards import BypassGuard, check_causal_lm
from .heads import LMHead, last_hidden_state, lm_head, output_embedding
from .labels import count_loss_items, shift_for_causal_lm
from .patch import PatchInfo, is_patched, patch, unpatch
from .tap import HeadTap

__all__ = ["BypassGuard", "HeadTap", "LMHead", "PatchInfo", "check_causal_lm", "count_loss_items", "is_patched",
           "last_hidden_state", "lm_head", "output_embedding", "patch",
           "shift_for_causal_lm", "unpatch"]
