"""The 'triton' backend: the Triton kernels of `t3s_kernels.triton`.

The automatic choice on CUDA for float16 / bfloat16 / float32 inputs. It also
runs on CPU tensors when TRITON_INTERPRET=1 was set before t3s_kernels was
imported (that is how CI tests the real kernels), but only when asked for by
name there. Without an importable Triton it stays registered, unavailable,
with the import error as the reason.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..prepare import KERNEL_DTYPES, kernel_logit_map
from .registry import Backend, register_backend

try:  # Triton is optional: without it everything runs on the reference.
    from ..triton import backward as triton_backward
    from ..triton import config as triton_config
    from ..triton import forward as triton_forward
    from ..triton import forward_backward as triton_forward_backward
except ImportError as exc:  # pragma: no cover - depends on the install
    triton_backward = triton_config = triton_forward = triton_forward_backward = None
    IMPORT_ERROR: Optional[str] = f"Triton failed to import: {exc}"
else:
    IMPORT_ERROR = None


class TritonBackend(Backend):
    name = "triton"
    priority = 10
    auto_devices = ("cuda",)

    def unavailable_reason(self):
        return IMPORT_ERROR

    def check_inputs(self, hidden):
        if hidden.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernels take float16, bfloat16 and float32 inputs, "
                            f"not dtype {hidden.dtype}")
        problem = triton_config.device_problem(hidden)
        if problem is not None:
            raise ValueError(problem)

    def loss_forward(self, hidden, weight, bias, rows, targets, opts, want_stats):
        return triton_backward.loss_forward(hidden, weight, bias, rows, targets, opts,
                                            want_stats)

    def loss_backward(self, hidden, weight, bias, rows, targets, lse, grad_loss, opts, need):
        return triton_backward.loss_backward(hidden, weight, bias, rows, targets, lse,
                                             grad_loss, opts, need)

    def loss_forward_backward(self, hidden, weight, bias, rows, targets, grad_scale, opts,
                              want_stats, need):
        """One pass (`t3s_kernels.triton.forward_backward`) when its buffers fit
        `buffer_bytes`; otherwise the forward and the deferred backward."""
        V, K = weight.shape
        plan = triton_forward_backward.plan_forward_backward(
            rows.numel(), V, K, hidden.element_size(), need[1],
            accum_fp32=opts.accum_dtype == torch.float32 and weight.dtype != torch.float32,
            buffer_bytes=opts.buffer_bytes)
        if plan is None:
            return super().loss_forward_backward(hidden, weight, bias, rows, targets,
                                                 grad_scale, opts, want_stats, need)
        return triton_forward_backward.loss_forward_backward(
            hidden, weight, bias, rows, targets, grad_scale.float().contiguous(), opts,
            want_stats, need, plan)

    def target_logprobs(self, hidden, weight, bias, rows, targets, *, softcap, want_entropy,
                        want_argmax, buffer_bytes, logit_scale=1.0, temperature=1.0):
        del buffer_bytes  # the streaming kernel holds O(M * splits), never a [rows, V] chunk
        cap, mul = kernel_logit_map(softcap, logit_scale, temperature)
        part = triton_forward.lse_partials(hidden, weight, bias, rows, targets, softcap=cap,
                                           want_entropy=want_entropy, want_argmax=want_argmax,
                                           logit_mul=mul)
        st = triton_forward.combine_partials(part)
        return st.target_logit - st.lse, st.entropy, st.argmax


register_backend(TritonBackend())
