"""t3s_kernels: fused linear + masked cross-entropy and streaming target log-probs.

    linear_cross_entropy(hidden [..., H], weight [V, H], targets [...], ...)
    target_logprobs(hidden [..., H], weight [V, H], targets [...], ...)

Layout, top-down:

- `api`: the two public functions (static checks, dispatch, reductions);
- `ops`: the `torch.library` custom ops that `torch.compile` traces;
- `backends`: the registry and the built-in backends ('triton', 'cpp', 'torch');
- `triton`: the Triton kernels (`forward`, `backward`, launch `config`);
- `reference`: the pure-PyTorch specification, also the 'torch' backend;
- `dense`: small CPU problems on materialised logits (the streaming path's fixed
  cost would dominate them);
- `vocab_parallel`: the loss and log-probs of a head sharded by vocabulary rows;
- `prepare`: validation and compaction shared by every backend;
- `debug`: test hooks (forced blocks, splits, NaN-poisoned outputs).

Triton kernels on CUDA, the C++ kernels (`csrc/`, oneDNN GEMM micro-kernels)
on CPU, the chunked reference elsewhere. ``T3S_KERNELS_DEBUG=1`` logs each
automatic backend choice.
"""

from .api import TargetLogprobs, TokenStats, linear_cross_entropy, target_logprobs
from .backends import Backend, available_backends, register_backend, registered_backends
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_target_logprobs

__all__ = [
    "Backend",
    "TargetLogprobs",
    "TokenStats",
    "available_backends",
    "linear_cross_entropy",
    "register_backend",
    "registered_backends",
    "target_logprobs",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_target_logprobs",
]
__version__ = "0.1.0"


def __getattr__(name):
    # BACKENDS was a fixed tuple; the registry is the source of truth now.
    if name == "BACKENDS":
        return registered_backends()
    raise AttributeError(f"module 't3s_kernels' has no attribute {name!r}")
