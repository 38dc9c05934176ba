"""The patched forward's arguments: its signature, positional arguments, the mask's dtype."""

from __future__ import annotations

import inspect
from typing import List

import torch

__all__ = ["EXTRA_KWARGS", "mask_dtype", "patched_signature", "positional_to_keywords"]

# The keyword arguments `t3s.patch` adds to a model's forward.
EXTRA_KWARGS = ("loss_mask", "return_token_stats", "t3s_fused_loss", "example_id",
                "token_scaling")


def patched_signature(sig: inspect.Signature) -> inspect.Signature:
    """The original signature plus t3s's keyword-only arguments.

    HF's Trainer reads it: ``loss_mask`` must be listed so dataset columns of
    that name are kept, and ``**kwargs`` so ``num_items_in_batch`` is passed.
    """
    P = inspect.Parameter
    params = []
    var_kw = None
    for p in sig.parameters.values():
        if p.kind == P.VAR_KEYWORD:
            var_kw = p
        elif p.name not in EXTRA_KWARGS:
            params.append(p)
    params += [P("loss_mask", P.KEYWORD_ONLY, default=None),
               P("return_token_stats", P.KEYWORD_ONLY, default=False),
               P("t3s_fused_loss", P.KEYWORD_ONLY, default=None),
               P("example_id", P.KEYWORD_ONLY, default=None),
               P("token_scaling", P.KEYWORD_ONLY, default=None)]
    params.append(var_kw or P("kwargs", P.VAR_KEYWORD))
    return sig.replace(parameters=params)


def positional_to_keywords(names: List[str], args: tuple, kwargs: dict) -> dict:
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {len(names)} positional arguments, got {len(args)}")
    out = dict(kwargs)
    for name, value in zip(names, args):
        if name in out:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        out[name] = value
    return out


def mask_dtype(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    if mask.is_complex():
        raise TypeError(f"loss_mask must be bool, float or 0/1 integers, got {mask.dtype}")
    return mask.float()
