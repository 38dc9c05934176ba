"""Guards of `t3s.patch`: which models it takes, and a loss that must not be bypassed.

- `check_causal_lm`: only causal (decoder-only) LMs; a masked LM or a seq2seq model
  has another loss, which a patch would replace silently;
- `BypassGuard`: a forward pre-hook on the backbone that refuses a training forward
  that skips t3s's loss (a wrapper that runs the backbone itself; TRL's fused LM head
  is served by t3s instead, `t3s.hf.trl_head`);
- `describe_forward`: who installed a forward, for error messages.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["PATCH_ATTR", "check_causal_lm", "BypassGuard", "describe_forward",
           "forward_chain", "install_guard", "is_trl_code", "remove_guards"]

# Where `patch` keeps its `PatchInfo` on the model (an instance attribute).
PATCH_ATTR = "_t3s_patch"


def check_causal_lm(model: nn.Module) -> None:
    """`ValueError` unless ``model`` is a Hugging Face causal (decoder-only) language model.

    Accepted: a class, or a base class, named ``*ForCausalLM`` or registered by
    transformers as a causal LM (``GPT2LMHeadModel``, ...) or as an image-text-to-text
    model (``Gemma3ForConditionalGeneration``, ...), and not encoder-decoder. A masked
    LM, a classifier or a seq2seq model has another loss: patching it would replace
    that loss with a shifted next-token loss, silently.
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"t3s.patch needs a decoder-only causal LM; {name} is an "
                         "encoder-decoder model, whose loss is not a shifted next-token loss")
    known = _causal_class_names()
    for cls in type(model).__mro__:
        if cls.__name__.endswith("ForCausalLM") or cls.__name__ in known:
            return
    raise ValueError(
        f"t3s.patch needs a causal language model (a *ForCausalLM); {name} is not one, and "
        "its own loss (masked-LM, classification, ...) is not the shifted next-token loss "
        "that t3s would put in its place")


def _causal_class_names() -> frozenset:
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is needed for any HF model
        return frozenset()
    names = set()
    for table in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"):
        for value in getattr(modeling_auto, table, {}).values():
            names.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(names)


class BypassGuard:
    """A forward pre-hook on the backbone: refuses a training forward that skips t3s's loss.

    Something that replaces ``model.forward`` after `patch` and then runs the
    backbone itself would train on its own loss and drop ``loss_mask``
    silently. The guard raises when the backbone runs with gradients in
    training mode, outside a t3s forward, while ``model.forward`` is no longer
    t3s's. A wrapper that calls through to t3s's forward (accelerate's, TRL's
    fused head, whose calls `t3s.hf.trl_head` turns into t3s's) is not affected;
    neither is TRL's head where t3s said it leaves a call to it
    (``PatchInfo.trl_fallback``).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, module: nn.Module, args):
        model = self.model
        info = model.__dict__.get(PATCH_ATTR)
        if info is None or info.patched_forward.depth or not model.training:
            return None
        if not torch.is_grad_enabled():
            return None
        current = model.__dict__.get("forward")
        if current is info.patched_forward:
            return None  # the user called the backbone directly: not a replaced forward
        if info.trl_fallback is not None and _chain_is_trl(current):
            return None  # TRL's own head serves a call t3s cannot (said once, see trl_head)
        raise RuntimeError(
            f"t3s.patch's loss was bypassed: {type(model).__name__}.forward was replaced after "
            f"t3s.patch by {describe_forward(current)}, which ran the backbone itself, so the "
            "loss would ignore loss_mask and t3s's normalisation. Remove that wrapper, or call "
            "t3s.unpatch first")


def forward_chain(fn) -> list:
    """``fn`` and what it wraps: bound methods (``__func__``), ``functools.wraps``
    (``__wrapped__``) and accelerate's output-conversion wrapper (``model_forward``)."""
    seen, chain = set(), []
    while fn is not None and id(fn) not in seen and len(chain) < 16:
        seen.add(id(fn))
        chain.append(fn)
        fn = (getattr(fn, "__func__", None) or getattr(fn, "__wrapped__", None)
              or getattr(fn, "model_forward", None))
    return chain


def is_trl_code(fn) -> bool:
    """Whether ``fn`` is a function defined in TRL's package."""
    where = getattr(getattr(fn, "__code__", None), "co_filename", "") or ""
    return f"{os.sep}trl{os.sep}" in where


def _chain_is_trl(fn) -> bool:
    return any(is_trl_code(f) for f in forward_chain(fn))


def describe_forward(fn) -> str:
    """A short description of a forward function: who installed it.

    Follows ``__func__`` and ``__wrapped__`` (``functools.wraps``), so a wrapper of a
    wrapper (accelerate's around TRL's) is described by what it wraps.
    """
    chain = forward_chain(fn)
    if any(is_trl_code(f) for f in chain):
        return "TRL's fused LM head (trl add_fused_lm_head, installed by trl.SFTTrainer)"
    code = next((f.__code__ for f in chain if hasattr(f, "__code__")), None)
    if code is None:
        return type(chain[0]).__name__ if chain else "None"
    return f"{code.co_name} ({code.co_filename})"


def backbone(model: nn.Module) -> Optional[nn.Module]:
    """The model's decoder (``model.base_model``), or None when it is the model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else None


def install_guard(model: nn.Module) -> None:
    """Register a `BypassGuard` on the model's backbone (no-op without one)."""
    base = backbone(model)
    if base is not None:
        base.register_forward_pre_hook(BypassGuard(model))


def remove_guards(model: nn.Module) -> None:
    """Remove every `BypassGuard` from the model's backbone.

    Found by type rather than through a hook handle: a handle holds a weak
    reference to the original hooks dict, which ``copy.deepcopy`` does not follow.
    """
    base = backbone(model)
    if base is None:
        return
    hooks = base._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if isinstance(hook, BypassGuard)]:
        del hooks[key]
