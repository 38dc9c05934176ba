"""Moved to `t3s_kernels.triton.forward` (and `.config`); this re-export goes in the next release."""

from .triton.config import KERNELS_INTERPRETED, LaunchConfig, dot_precision, pick_config, pick_splits
from .triton.forward import Partials, RowStats, combine_partials, logit_tile, lse_partials

__all__ = ["KERNELS_INTERPRETED", "LaunchConfig", "Partials", "RowStats", "combine_partials",
           "dot_precision", "logit_tile", "lse_partials", "pick_config", "pick_splits"]
