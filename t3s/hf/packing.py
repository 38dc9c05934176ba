"""Whether a causal LM's attention keeps packed sequences apart: `packing_support`.

A padding-free batch (`t3s.PackedCollator`) is one row [1, N] of several
sequences whose ``position_ids`` restart at 0 for each, with no
``attention_mask``. Models whose attention builds its mask from those
positions keep the sequences apart:

- ``flash_attention_2`` (and 3): the varlen kernels, from ``cu_seq_lens_*`` or
  from the restarting ``position_ids`` (transformers' flash integration);
- ``sdpa``, ``eager``, ``flex_attention``: transformers' ``masking_utils``
  (``find_packed_sequence_indices``) turns restarting positions into a
  block-diagonal causal mask, but only when no ``attention_mask`` and no cache
  is passed, and only in models whose forward builds its mask there.

A model on its own code, or one whose attention ignores ``position_ids``,
would let each sequence attend to the ones packed before it: silently wrong
losses. So support is *measured* rather than assumed (`packing_support`): one
probe forward of 5 tokens (two sequences packed) against the second sequence
alone; the packed run must give the same hidden states. Legend: H hidden size.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .heads import last_hidden_state, peek_parameter

__all__ = ["FLASH", "attention_of", "flash_attn_installed", "packing_support"]

#: transformers' name of FlashAttention-2
FLASH = "flash_attention_2"
#: implementations whose packed path is transformers' own, not a mask to check
_VARLEN = ("flash_attention_2", "flash_attention_3")
# (model class, attention implementation, dtype) -> (ok, why not): one probe per kind of
# model and process, as θ0, θb and every retraining share them
_CACHE: Dict[Tuple[type, str, torch.dtype], Tuple[bool, str]] = {}


def flash_attn_installed() -> bool:
    """Whether the flash-attn package can be imported (it needs CUDA to run)."""
    return importlib.util.find_spec("flash_attn") is not None


def attention_of(model: nn.Module) -> str:
    """The attention implementation the model runs (``config._attn_implementation``;
    "eager" when the config says nothing)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packing_support(model: nn.Module) -> Tuple[bool, str]:
    """(True, "") when packed rows give the hidden states of separate sequences, else
    (False, why): the reason, to say once.

    The flash implementations pack by construction (varlen kernels), and are not
    probed (their kernels need CUDA tensors, and the model may still be on the
    CPU when the batches are chosen). Otherwise one probe forward, without
    gradients and in eval mode, of two sequences (3 and 2 tokens) packed into one
    row, compared with the second alone: the packed row's last two hidden states
    must equal it (relative 1e-3 in float32, 5e-2 in half precision). The result
    is cached per model class, attention implementation and dtype.
    A model whose weights are not materialised here (meta, DeepSpeed ZeRO-3
    partitions) cannot run a probe: then it is trusted when it runs sdpa or eager
    on transformers' own code, and refused otherwise.
    """
    attn = attention_of(model)
    if attn in _VARLEN:
        return True, ""
    weight = _embedding_weight(model)
    dtype = weight.dtype if weight is not None else torch.float32
    key = (type(model), attn, dtype)
    if key not in _CACHE:
        _CACHE[key] = _probe(model, attn, weight)
    return _CACHE[key]


def _embedding_weight(model: nn.Module) -> Optional[torch.Tensor]:
    """The input embedding's weight, read without ZeRO-3's gather (None without one)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return None if emb is None else peek_parameter(emb, "weight")


def _probe(model: nn.Module, attn: str, weight: Optional[torch.Tensor]) -> Tuple[bool, str]:
    name = type(model).__name__
    own_code = type(model).__module__.startswith("transformers.")
    if weight is None or weight.device.type == "meta" or weight.numel() == 0 \
            or hasattr(weight, "ds_id"):
        if own_code and attn in ("sdpa", "eager"):
            return True, ""
        return False, (f"{name} with attention {attn!r} cannot be checked here (its weights are "
                       "not materialised in this process)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    ids = (torch.arange(5) * 7 + 3) % max(int(vocab), 2)   # any 5 valid ids
    device = weight.device
    x = ids[None].to(device)
    pos = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = last_hidden_state(model, x, None, position_ids=pos).float()   # [1, 5, H]
            alone = last_hidden_state(model, x[:, 3:], None).float()              # [1, 2, H]
    except Exception as exc:  # noqa: BLE001 - any failure means: do not pack this model
        return False, (f"{name} with attention {attn!r} failed on a packed row "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    finally:
        model.train(was_training)
    tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    err = float((packed[0, 3:] - alone[0]).abs().max())
    scale = float(alone.abs().max()) + 1e-6
    if not err <= tol * scale:
        return False, (f"{name} with attention {attn!r} lets packed sequences attend to each "
                       f"other (a probe differs by {err / scale:.2g} relative)")
    return True, ""
