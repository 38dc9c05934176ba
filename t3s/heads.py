"""Moved to `t3s.hf.heads`; this re-export goes in the next release."""

from .hf.heads import HeadTap, LMHead, last_hidden_state, lm_head, output_embedding

__all__ = ["HeadTap", "LMHead", "last_hidden_state", "lm_head", "output_embedding"]
