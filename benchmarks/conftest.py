"""pytest setup for the microbenchmarks in this folder.

Without CUDA the Triton kernels run under the CPU interpreter, which must be
switched on before `triton.jit` runs, i.e. before t3s_kernels is imported; so
it is decided here, at collection time. With CUDA they run natively unless
TRITON_INTERPRET=1 was set by hand.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `pytest benchmarks/` from anywhere finds the package
    sys.path.insert(0, _REPO)

import t3s_kernels  # noqa: E402,F401  (after TRITON_INTERPRET)
