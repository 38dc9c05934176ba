"""Kernel backends: the registry (`registry`) and the built-in backends.

- 'torch' (`torch_reference`): the PyTorch reference, every device;
- 'triton' (`triton_kernels`): the Triton kernels, the default on CUDA;
- 'cpp' (`cpp`): the C++ CPU kernels (compiled on first use), the default on CPU.

A new backend (a vocab-parallel head, ...) subclasses
`Backend`, implements its three methods and calls `register_backend`; dispatch,
`available_backends()` and ``backend=`` pick it up from there.
"""

from . import torch_reference, triton_kernels  # noqa: F401  (each registers itself)
from . import cpp  # noqa: F401,I001  (registered after those two: registration order is listing order)

from .registry import (
    Backend,
    available_backends,
    check_backend_name,
    get_backend,
    register_backend,
    registered_backends,
    resolve_backend,
    unregister_backend,
)

__all__ = ["Backend", "available_backends", "check_backend_name", "get_backend",
           "register_backend", "registered_backends", "resolve_backend", "unregister_backend"]
