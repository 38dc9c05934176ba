"""Moved to `t3s_kernels.triton.forward` (and `.config`); this re-export goes in the next release."""

from .triton.config import KERNELS_INTERPRETED, LaunchConfig, dot_precision, pick_config, pick_splits  # noqa: F401
from .triton.forward import Partials, RowStats, combine_partials, logit_tile, lse_partials  # noqa: F401
