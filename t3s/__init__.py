"""t3s: Training-Trajectory-Aware Token Selection (arXiv 2601.10348).

`masked_ce` is the drop-in loss for masked retraining; the kernels behind it
live in `t3s_kernels`.
"""

from t3s_kernels import TokenStats, linear_cross_entropy, target_logprobs

from .loss import masked_ce

__all__ = ["masked_ce", "linear_cross_entropy", "target_logprobs", "TokenStats"]
__version__ = "0.1.0"
