"""The 'torch' backend: the chunked PyTorch reference (`t3s_kernels.reference`).

Runs on every device and dtype PyTorch supports (float64 included), and is the
automatic choice wherever no faster backend applies.
"""

from __future__ import annotations

from .. import reference
from .registry import Backend, register_backend


class TorchBackend(Backend):
    name = "torch"
    priority = 0
    auto_devices = ("*",)

    def loss_forward(self, hidden, weight, bias, rows, targets, opts, want_stats):
        return reference.token_losses_forward_ref(hidden, weight, bias, rows, targets, opts,
                                                  want_stats)

    def loss_backward(self, hidden, weight, bias, rows, targets, lse, grad_loss, opts, need):
        return reference.token_losses_backward_ref(hidden, weight, bias, rows, targets, lse,
                                                   grad_loss, opts, need)

    def target_logprobs(self, hidden, weight, bias, rows, targets, *, softcap, want_entropy,
                        want_argmax, buffer_bytes, logit_scale=1.0, temperature=1.0):
        return reference.target_logprobs_ref(hidden, weight, bias, rows, targets,
                                             softcap=softcap, want_entropy=want_entropy,
                                             want_argmax=want_argmax, buffer_bytes=buffer_bytes,
                                             logit_scale=logit_scale, temperature=temperature)


register_backend(TorchBackend())
