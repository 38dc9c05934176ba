"""t3s_kernels: fused linear + masked cross-entropy and streaming target log-probs.

    linear_cross_entropy(hidden [..., H], weight [V, H], targets [...], ...)
    target_logprobs(hidden [..., H], weight [V, H], targets [...], ...)

Triton kernels on CUDA, a chunked pure-PyTorch reference elsewhere
(`t3s_kernels.reference`, which is also the specification).
"""

from .api import (
    BACKENDS,
    TargetLogprobs,
    TokenStats,
    available_backends,
    linear_cross_entropy,
    target_logprobs,
)

__all__ = [
    "BACKENDS",
    "TargetLogprobs",
    "TokenStats",
    "available_backends",
    "linear_cross_entropy",
    "target_logprobs",
]
__version__ = "0.1.0"
