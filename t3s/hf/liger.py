"""Composition with liger-kernel: its non-loss kernels for the model type, t3s's loss."""

from __future__ import annotations

import inspect
import warnings

from torch import nn

__all__ = ["apply_liger"]


def apply_liger(model: nn.Module) -> bool:
    """Apply liger-kernel's non-loss kernels for the model type; the loss stays t3s's."""
    try:
        from liger_kernel.transformers import monkey_patch as liger
    except ImportError as exc:
        raise ImportError("compose_liger=True needs liger-kernel, the liger extra: "
                          "pip install 't3s[liger]'") from exc
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    table = getattr(liger, "MODEL_TYPE_TO_APPLY_LIGER_FN", {})
    apply_fn = table.get(model_type) or getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply_fn is None:
        warnings.warn(f"t3s.patch(compose_liger=True): liger-kernel has no kernels for model type "
                      f"{model_type!r}; continuing without them", stacklevel=3)
        return False
    accepted = inspect.signature(apply_fn).parameters
    options = {"fused_linear_cross_entropy": False, "cross_entropy": False, "model": model}
    apply_fn(**{k: v for k, v in options.items() if k in accepted})
    return True
