"""Moved to `t3s_kernels.triton.backward`; this re-export goes in the next release."""

from .triton.backward import backward_mode, loss_backward, loss_forward

__all__ = ["backward_mode", "loss_backward", "loss_forward"]
