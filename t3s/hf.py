"""Hugging Face integration: one generic fused-loss patch for any ``*ForCausalLM``.

`patch` swaps a model's ``forward`` (on the instance, undone by `unpatch`) for
one that computes the training loss with `t3s.masked_ce` straight from the
hidden states, so the [B, T, V] logits are never materialised, and that
accepts a per-token ``loss_mask``. `T3SCollator` pads batches that carry such
masks; `count_loss_items` gives the matching ``num_items_in_batch``.

How the patch stays generic (one code path for Llama, Qwen2/3, Mistral,
Gemma/Gemma2, GPT-2, Phi, Cohere, Granite, multimodal wrappers, ...):

* The model's own forward still runs, with every input passed through
  (``attention_mask``, ``position_ids`` of packed batches, ``past_key_values`` /
  ``cache``, ``use_cache``, pixel inputs, ...). Only the output embedding
  (``model.get_output_embeddings()``) is intercepted for the duration of the
  call: it records the hidden states it receives, i.e. exactly what the model
  would project, after whatever final norm or scaling the architecture applies.
* What the model does to the logits *after* the output embedding is measured
  once, at patch time, by a probe (``verify=True``): the probe feeds known
  values through the model's post-processing and fits
  ``logits = softcap(scale * z)``, with ``softcap`` taken from
  ``config.final_logit_softcapping`` (Gemma 2/3) when the model really applies
  it, and ``scale`` measured (Cohere's
  ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's
  ``lm_head_multiplier``, ...). Any other transform is refused with
  `NotImplementedError` rather than trained on silently.

Shapes: B batch, T sequence length, H hidden size, V vocabulary size.
Position convention (as in HF's ``ForCausalLMLoss``): the hidden state at
position i predicts ``labels[:, i + 1]``; ``loss_mask`` is aligned with
``labels`` and shifted the same way.

Sharded heads (FSDP / ZeRO-3): the fused loss runs inside the model's forward
but outside the output embedding's own forward, and needs the whole [V, H]
head weight there. A plain ``fully_shard(model)`` root keeps its own
parameters (the head, when it is not wrapped separately) unsharded from the
root's forward to its backward, so that layout works. A head that is still a
DTensor, or a ZeRO-3 partition (0 elements), when the loss runs raises a
`RuntimeError` that says what to do; nothing is gathered behind the user's back.
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .loss import masked_ce

__all__ = ["patch", "unpatch", "is_patched", "PatchInfo", "T3SCollator", "count_loss_items",
           "shift_for_causal_lm"]

_PATCH_ATTR = "_t3s_patch"
_MISSING = object()
# Loss options `patch` passes on to `masked_ce`; the others are set per call.
_LOSS_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "z_loss", "filter_eps",
                 "accum_dtype", "buffer_bytes")
_EXTRA_KWARGS = ("loss_mask", "return_token_stats", "t3s_fused_loss")


@dataclass
class PatchInfo:
    """What `patch` installed on a model (stored as ``model._t3s_patch``).

    forward: the forward that was active before patching (bound); the patched
        forward calls it.
    previous_forward: the instance attribute ``forward`` before patching (e.g. a
        wrapper installed by accelerate), or a sentinel when the class forward
        was in use; `unpatch` restores it.
    logit_scale: the multiplier applied to ``h @ W.T + b`` before the softcap
        (measured by the probe, or given by the user).
    softcap: the final logit softcap: ``config.final_logit_softcapping`` when the
        probe confirms the model applies it (or without the probe), else None.
    vocab_size: number of head rows that enter the softmax (a model that slices
        padded vocabulary rows off its logits keeps only these).
    """

    forward: Callable
    previous_forward: Any
    patched_forward: Callable
    backend: Optional[str]
    loss_options: Dict[str, Any]
    logit_scale: float
    softcap: Optional[float]
    vocab_size: Optional[int]
    verified: bool
    liger_applied: bool = False
    param_names: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def patch(
    model: nn.Module,
    *,
    backend: Optional[str] = None,
    verify: bool = True,
    logit_scale: Optional[float] = None,
    compose_liger: bool = False,
    **loss_options,
) -> nn.Module:
    """Give ``model`` a fused, maskable causal-LM loss. Returns the same model.

    Works for any Hugging Face ``*ForCausalLM`` (or multimodal
    ``*ForConditionalGeneration``) whose logits are its output embedding
    (``model.get_output_embeddings()``, a linear map, tied or not, with or
    without bias) applied to the decoder's hidden states, optionally followed
    by a scalar scale and Gemma's ``final_logit_softcapping``.

    The patched forward takes the model's usual arguments plus:

    * ``loss_mask`` [B, T] bool or float, aligned with ``labels`` (same shape,
      shifted with it): 1 keeps a token, 0 drops it from the loss (it stays in
      the input), other values weight it. Int 0/1 tensors are accepted.
    * ``return_token_stats=True``: attach ``output.token_stats``, a
      `t3s.TokenStats` whose fields are [B, T]; the entry at position i belongs
      to the target ``labels[:, i + 1]`` (predicted from the hidden state at i).
      The last position and dropped or ignored tokens hold NaN.
    * ``t3s_fused_loss``: None (default) returns ``logits=None`` while
      ``model.training`` and the logits otherwise; True never returns logits
      when labels are given; False always returns them.
    * ``num_items_in_batch`` (passed by HF's Trainer) becomes the loss
      ``normalizer``, so gradient accumulation is exact as in HF's
      ``ForCausalLMLoss``. With a ``loss_mask``, the matching value is the total
      kept weight, see `count_loss_items`.
    * ``shift_labels`` (as in HF): already shifted targets [B, T]; then
      ``loss_mask`` must be aligned with ``shift_labels`` and is not shifted.

    Whenever labels are given the loss is t3s's (mean over kept tokens, or the
    ``normalizer``), in training and in evaluation alike. Without labels the
    original forward runs untouched (generation, ``logits_to_keep``).
    ``logits_to_keep`` / ``num_logits_to_keep`` must be 0 when labels are given.
    Under autocast the head runs in the autocast dtype, as ``nn.Linear`` would.
    With PEFT, patch the base model (``peft_model.get_base_model()``); an
    adapter on the output embedding itself is refused by the probe.

    Args:
        model: a Hugging Face causal LM.
        backend: kernel backend for the loss: None (automatic), 'triton' or 'torch'.
        verify: run a probe forward (8 tokens, eval mode, no grad) now to check
            that the model's logits are ``softcap(scale * (h @ W.T + b))`` and to
            measure ``scale``. Skipped with a warning when the weights are not
            materialised (meta device, ZeRO-3 partitions, DTensors).
        logit_scale: the scalar multiplier on the head's output; measured when
            None and ``verify`` is on, else 1.0. When given with ``verify``, it is
            checked.
        compose_liger: first apply liger-kernel's RMSNorm / RoPE / SwiGLU patches
            for the model type (not its losses: the loss stays t3s's). Needs
            ``pip install liger-kernel``. Liger patches module-level functions of
            the model type; `unpatch` does not undo them.
        **loss_options: passed to `t3s.masked_ce`: ``ignore_index`` (default
            -100), ``reduction`` ('mean' or 'sum'), ``label_smoothing``,
            ``z_loss``, ``filter_eps``, ``accum_dtype``, ``buffer_bytes``.

    Raises:
        ValueError: the model is already patched, has no output embedding, or an
            option is invalid.
        NotImplementedError: the probe found logits t3s cannot reproduce.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched by t3s; call t3s.unpatch(model) first")
    unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown loss option(s) {unknown}; supported: {list(_LOSS_OPTIONS)}")
    if loss_options.get("reduction", "mean") not in ("mean", "sum"):
        raise ValueError(
            "reduction must be 'mean' or 'sum' for a model loss; per-token values are in "
            "output.token_stats (return_token_stats=True)")
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    head = _output_embedding(model)
    if compose_liger:
        liger_applied = _apply_liger(model)
    else:
        liger_applied = False

    forward = model.forward
    previous = model.__dict__.get("forward", _MISSING)
    softcap = _final_softcap(getattr(model, "config", None))
    scale, vocab_size, verified = (1.0 if logit_scale is None else float(logit_scale)), None, False
    if verify:
        probed = _probe_logit_map(model, forward, head, softcap, logit_scale)
        if probed is not None:
            scale, vocab_size, softcap = probed
            verified = True

    sig = inspect.signature(forward)
    param_names = [p.name for p in sig.parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    info = PatchInfo(forward=forward, previous_forward=previous, patched_forward=None,
                     backend=backend, loss_options=dict(loss_options), logit_scale=scale,
                     softcap=softcap, vocab_size=vocab_size, verified=verified,
                     liger_applied=liger_applied, param_names=param_names)

    def t3s_forward(self, *args, **kwargs):
        return _patched_forward(self, self.__dict__[_PATCH_ATTR], args, kwargs)

    t3s_forward.__signature__ = _patched_signature(sig)
    t3s_forward.__doc__ = (f"{type(model).__name__}.forward patched by t3s (fused masked loss; "
                           f"see t3s.hf.patch).\n\n{forward.__doc__ or ''}")
    bound = types.MethodType(t3s_forward, model)
    info.patched_forward = bound
    model.__dict__[_PATCH_ATTR] = info
    model.forward = bound
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: restore the forward that was active before. Returns the model.

    Raises `RuntimeError` if something wrapped the forward after `patch` (unwrap
    that first), and `ValueError` if the model is not patched.
    """
    info = model.__dict__.get(_PATCH_ATTR)
    if info is None:
        raise ValueError("model is not patched by t3s")
    current = model.__dict__.get("forward", _MISSING)
    if current is not info.patched_forward:
        raise RuntimeError(
            "model.forward was replaced after t3s.patch (e.g. by accelerate.prepare or another "
            "patch); undo that wrapper first, then call t3s.unpatch")
    if info.previous_forward is _MISSING:
        del model.forward
    else:
        model.forward = info.previous_forward
    del model.__dict__[_PATCH_ATTR]
    return model


def is_patched(model: nn.Module) -> bool:
    """True when `patch` is active on ``model``."""
    return _PATCH_ATTR in getattr(model, "__dict__", {})


def shift_for_causal_lm(labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None, *,
                        ignore_index: int = -100):
    """HF's causal shift: returns (targets [B, T], mask [B, T] or None).

    ``targets[:, i] = labels[:, i + 1]`` and the last position is ``ignore_index``
    (mask 0), exactly as ``ForCausalLMLoss`` pads and shifts, so the hidden
    states need no slicing.
    """
    targets = _shift_left(labels, ignore_index)
    mask = None if loss_mask is None else _shift_left(loss_mask, 0)
    return targets, mask


def count_loss_items(labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None, *,
                     ignore_index: int = -100, shifted: bool = False) -> torch.Tensor:
    """The ``num_items_in_batch`` that makes accumulated masked losses exact.

    Sums the weight of every token that enters the loss: labels not equal to
    ``ignore_index``, times ``loss_mask`` when given, after the causal shift
    (``shifted=True`` when ``labels`` are already shifted targets). Sum this over
    the micro-batches of one optimizer step (and over ranks under DDP) and pass
    it as ``num_items_in_batch``. HF's Trainer counts ``labels != -100`` and
    knows nothing of ``loss_mask``: with a mask, either pass this value yourself
    or let `T3SCollator` fold the mask's zeros into the labels
    (``fold_mask_into_labels=True``), which makes the Trainer's count exact for
    0/1 masks.
    """
    if loss_mask is not None:
        _check_mask(loss_mask, labels, "labels")
    if not shifted:
        labels, loss_mask = shift_for_causal_lm(labels, loss_mask, ignore_index=ignore_index)
    keep = (labels != ignore_index).float()
    if loss_mask is not None:
        keep = keep * loss_mask.to(device=keep.device).float()
    return keep.sum()


@dataclass
class T3SCollator:
    """Pad a list of tokenized examples into a batch, masks included.

    Each feature is a mapping with ``input_ids`` (list or 1-D tensor) and
    optionally ``labels`` (default: a copy of ``input_ids``), ``attention_mask``
    (default: ones), ``loss_mask`` (bool / float per token, aligned with
    ``labels``; 1 keeps a token, 0 drops it) and ``position_ids``. Any other key
    is collated with ``torch.utils.data.default_collate`` (e.g. an example id).

    Returns a dict of [B, T] tensors: ``input_ids`` (padded with
    ``pad_token_id``), ``labels`` (``label_pad_id`` at padding, and where a
    given ``attention_mask`` is 0 when labels were defaulted), ``attention_mask``
    (0 at padding), ``position_ids`` (0 at padding) when any example has them,
    and ``loss_mask`` (float32, 0 at padding; examples without one get ones)
    when any example has one.

    ``fold_mask_into_labels=True`` also sets ``labels`` to ``label_pad_id``
    wherever ``loss_mask`` is 0. The loss is unchanged (those tokens are dropped
    either way), but then HF's Trainer, which derives ``num_items_in_batch``
    from the labels alone, counts exactly the kept tokens of a 0/1 mask, so
    gradient accumulation averages over kept tokens (T3S's 'mean').
    """

    pad_token_id: int = 0
    label_pad_id: int = -100
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = None
    fold_mask_into_labels: bool = False

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if len(features) == 0:
            raise ValueError("cannot collate an empty list of features")
        ids = [_as_1d(f["input_ids"], "input_ids", i, torch.long) for i, f in enumerate(features)]
        lengths = [x.numel() for x in ids]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def column(key, dtype, default, pad):
            rows = []
            for i, f in enumerate(features):
                value = f.get(key)
                x = default(ids[i]) if value is None else _as_1d(value, key, i, dtype)
                if x.numel() != lengths[i]:
                    raise ValueError(f"example {i}: {key} has {x.numel()} entries but input_ids "
                                     f"has {lengths[i]}")
                rows.append(self._pad(x, T, pad))
            return torch.stack(rows)

        batch = {
            "input_ids": column("input_ids", torch.long, None, self.pad_token_id),
            "labels": column("labels", torch.long, lambda x: x.clone(), self.label_pad_id),
            "attention_mask": column("attention_mask", torch.long, torch.ones_like, 0),
        }
        for i, f in enumerate(features):  # defaulted labels: no targets where attention is 0
            if f.get("labels") is None and f.get("attention_mask") is not None:
                batch["labels"][i][batch["attention_mask"][i] == 0] = self.label_pad_id
        if any(f.get("position_ids") is not None for f in features):
            batch["position_ids"] = column(
                "position_ids", torch.long, lambda x: torch.arange(x.numel()), 0)
        if any(f.get("loss_mask") is not None for f in features):
            batch["loss_mask"] = column(
                "loss_mask", torch.float32, lambda x: torch.ones(x.numel()), 0.0)
            if self.fold_mask_into_labels:
                batch["labels"][batch["loss_mask"] == 0] = self.label_pad_id
        known = set(batch) | {"loss_mask", "position_ids"}
        for key in features[0]:
            if key not in known:
                batch[key] = torch.utils.data.default_collate([f[key] for f in features])
        return batch

    def _pad(self, x: torch.Tensor, T: int, value) -> torch.Tensor:
        pad = x.new_full((T - x.numel(),), value)
        return torch.cat([x, pad] if self.padding_side == "right" else [pad, x])


# --------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------


def _patched_forward(model: nn.Module, info: PatchInfo, args: tuple, kwargs: dict):
    loss_mask = kwargs.pop("loss_mask", None)
    return_token_stats = bool(kwargs.pop("return_token_stats", False))
    fused = kwargs.pop("t3s_fused_loss", None)
    if args and info.param_names:
        kwargs, args = _positional_to_keywords(info.param_names, args, kwargs), ()
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        if loss_mask is not None or return_token_stats:
            raise ValueError("loss_mask and return_token_stats need labels")
        return info.forward(*args, **kwargs)

    num_items = kwargs.pop("num_items_in_batch", None)
    for key in ("logits_to_keep", "num_logits_to_keep"):
        keep = kwargs.get(key)
        if keep is not None and not (isinstance(keep, int) and keep == 0):
            raise ValueError(f"{key} must be 0 when labels are given: the loss needs every "
                             "position (no logits are materialised anyway during training)")
    # The output is rebuilt field by field, so ask for a ModelOutput and convert back.
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
    if not return_dict:
        kwargs["return_dict"] = True
    skip_logits = model.training if fused is None else bool(fused)
    ignore_index = info.loss_options.get("ignore_index", -100)

    head = _output_embedding(model)
    with _HeadCapture(head, compute_logits=not skip_logits) as capture:
        out = info.forward(*args, **kwargs)
    hidden = capture.single_hidden(type(model).__name__)
    if not isinstance(out, Mapping) or not hasattr(out, "to_tuple"):
        raise TypeError(f"{type(model).__name__}.forward returned {type(out).__name__}, not a "
                        "ModelOutput; t3s.patch needs return_dict=True outputs")

    if shift_labels is not None:
        targets = shift_labels
        if loss_mask is not None:
            _check_mask(loss_mask, targets, "shift_labels")
        mask = loss_mask
    else:
        if loss_mask is not None:
            _check_mask(loss_mask, labels, "labels")
        targets, mask = shift_for_causal_lm(labels, loss_mask, ignore_index=ignore_index)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"labels give targets of shape {tuple(targets.shape)} but the model "
                         f"produced hidden states of shape {tuple(hidden.shape[:-1])}")

    result = _fused_loss(info, head, hidden, targets.to(hidden.device),
                         None if mask is None else _mask_dtype(mask).to(hidden.device),
                         num_items, return_token_stats)
    loss, stats = result if return_token_stats else (result, None)
    loss = _add_router_aux_loss(model, out, loss)

    fields = dict(out.items())
    fields["loss"] = loss
    fields["logits"] = None if skip_logits else fields.get("logits")
    new = type(out)(**fields)
    if stats is not None:
        new["token_stats"] = stats
    return new if return_dict else new.to_tuple()


def _add_router_aux_loss(model: nn.Module, out, loss: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts models add their load-balancing loss when labels are given.

    The original forward ran without labels, so it computed ``out.aux_loss``
    (when ``output_router_logits``) but did not add it; do it here, with the
    model's own coefficient, as HF does.
    """
    aux = out.get("aux_loss")
    if aux is None:
        return loss
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(model, "aux_loss_coef", None)
    if coef is None:
        raise NotImplementedError(
            f"{type(model).__name__} returned an aux_loss but has no router_aux_loss_coef; "
            "t3s does not know how to combine it with the loss (pass output_router_logits=False)")
    return loss + coef * aux.to(loss.device)


def _fused_loss(info: PatchInfo, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                mask: Optional[torch.Tensor], num_items, return_stats: bool):
    """masked_ce on the captured hidden states [B, T, H] with the head's weight [V, H]."""
    weight = _full_tensor(head.weight, "weight", hidden.shape[-1])
    bias = getattr(head, "bias", None)
    if bias is not None:
        bias = _full_tensor(bias, "bias", None)
    if info.vocab_size is not None and info.vocab_size < weight.shape[0]:
        weight = weight[: info.vocab_size]
        bias = None if bias is None else bias[: info.vocab_size]
    if hidden.device != weight.device:  # e.g. a head on another GPU under device_map
        hidden = hidden.to(weight.device)
        targets = targets.to(weight.device)
        mask = None if mask is None else mask.to(weight.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if info.logit_scale != 1.0:
        hidden = hidden * info.logit_scale
        bias = None if bias is None else bias * info.logit_scale
    # An accumulation step whose tokens are all dropped has num_items == 0: give 0, not 0/0.
    tiny = torch.finfo(torch.float32).tiny
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(hidden.device, torch.float32).clamp_min(tiny)
    elif num_items is not None and num_items == 0:
        num_items = tiny
    with torch.autocast(device_type, enabled=False):
        return masked_ce(hidden, weight, targets, mask, bias=bias, softcap=info.softcap,
                         normalizer=num_items, return_stats=return_stats, backend=info.backend,
                         **info.loss_options)


class _HeadCapture:
    """Within the block, the output embedding records its input.

    With ``compute_logits=False`` it returns an empty [..., 0] tensor instead of
    projecting, so no logits are computed; element-wise post-processing (scale,
    softcap) runs on the empty tensor at no cost. With a ``replacement``
    callable, it returns ``replacement(hidden)`` (used by the probe).
    """

    def __init__(self, head: nn.Module, *, compute_logits: bool, replacement=None):
        self.head = head
        self.compute_logits = compute_logits
        self.replacement = replacement
        self.hidden: List[torch.Tensor] = []
        self.logits: Optional[torch.Tensor] = None

    def __enter__(self):
        self.previous = self.head.__dict__.get("forward", _MISSING)
        self.original = self.head.forward
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc):
        if self.previous is _MISSING:
            del self.head.forward
        else:
            self.head.forward = self.previous
        return False

    def _forward(self, hidden, *args, **kwargs):
        self.hidden.append(hidden)
        if self.replacement is not None:
            self.logits = self.original(hidden, *args, **kwargs)
            return self.replacement(hidden)
        if self.compute_logits:
            return self.original(hidden, *args, **kwargs)
        return hidden.new_empty(hidden.shape[:-1] + (0,))

    def single_hidden(self, model_name: str) -> torch.Tensor:
        if len(self.hidden) != 1:
            raise NotImplementedError(
                f"{model_name} called its output embedding {len(self.hidden)} times in one forward "
                "(expected once); t3s.patch supports models whose logits are one projection of "
                "the final hidden states")
        return self.hidden[0]


# --------------------------------------------------------------------------------------
# Patch-time probe: what does the model do to the head's output?
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _probe_logit_map(model, forward, head, softcap, given_scale):
    """Run 8 tokens through the model to measure its logit map.

    Returns (scale, vocab_size or None, softcap or None), or None when skipped.

    The output embedding is intercepted twice over: its real output on the
    probe's hidden states is compared with ``F.linear(h, W, b)`` (a LoRA or
    quantized head would differ), and it returns known values z (a ramp over
    ±L) so the model's post-processing f is observed directly, independent of
    the weights. f must be ``softcap(scale * z)``.
    """
    name = type(model).__name__
    weight = head.weight
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weight = getattr(emb, "weight", None)
    for t in (weight, emb_weight):
        if not isinstance(t, torch.Tensor) or not _is_materialised(t):
            warnings.warn(f"t3s.patch: {name} weights are not materialised (meta device, "
                          "ZeRO-3 partition or DTensor); skipping the logit-map probe and "
                          f"assuming logit_scale={given_scale or 1.0}", stacklevel=3)
            return None
    V = weight.shape[0]
    # text tokens only: image / video / audio placeholder ids would ask for pixel inputs
    allowed = torch.ones(min(V, emb_weight.shape[0]), dtype=torch.bool)
    special = [i for i in _special_token_ids(getattr(model, "config", None)) if i < allowed.numel()]
    allowed[special] = False
    candidates = allowed.nonzero().squeeze(1) if allowed.any() else torch.arange(allowed.numel())
    generator = torch.Generator().manual_seed(0)
    pick = torch.randint(0, candidates.numel(), (1, 8), generator=generator)
    ids = candidates[pick].to(emb_weight.device)
    L = 3.0 * softcap if softcap else 30.0

    def ramp(hidden):
        z = torch.linspace(-L, L, V, device=hidden.device, dtype=torch.float32)
        return z.to(weight.dtype).expand(*hidden.shape[:-1], V).clone()

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _HeadCapture(head, compute_logits=True, replacement=ramp) as capture:
            try:
                out = forward(input_ids=ids, use_cache=False)
            except Exception as exc:  # the model's own failure, not the probe's verdict
                raise RuntimeError(
                    f"t3s.patch: the probe forward of {name} on 8 tokens failed ({exc!r}); pass "
                    "verify=False (and logit_scale= if the model scales its logits)") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    hidden = capture.single_hidden(name)
    logits = getattr(out, "logits", None) if not isinstance(out, tuple) else out[0]
    if not isinstance(logits, torch.Tensor):
        raise NotImplementedError(f"{name}.forward returned no logits; cannot patch it")

    low = weight.dtype in (torch.float16, torch.bfloat16)
    tol = 2e-2 if low else 1e-4
    # 1) The head is a plain linear map.
    bias = getattr(head, "bias", None)
    linear = F.linear(hidden, weight, bias).float()
    head_out = capture.logits.float()
    err = (head_out - linear).abs().max().item()
    if not err <= tol * (linear.abs().max().item() + 1.0):
        raise NotImplementedError(
            f"{name}: the output embedding {type(head).__name__} is not F.linear(h, weight, bias) "
            f"(max abs difference {err:.3g}); t3s cannot fuse its loss")
    # 2) The post-processing is softcap(scale * z), possibly over the first V' columns only.
    #    The config's softcap is a hypothesis, not a fact: a model may not apply it
    #    (Gemma3ForConditionalGeneration does not), and then neither does t3s.
    f = logits.float().reshape(-1, logits.shape[-1])
    Vout = f.shape[-1]
    if Vout > V:
        raise NotImplementedError(f"{name}: logits have {Vout} columns but the output embedding "
                                  f"has {V} rows")
    z = ramp(hidden).float().reshape(-1, V)[:, :Vout]
    bound = tol * (f.abs().max().item() + 1.0)
    tried = []
    for cap in ([softcap, None] if softcap else [None]):
        scale, err = _fit_logit_map(f, z, cap, given_scale, tol)
        if err <= bound:
            return scale, (Vout if Vout < V else None), cap
        tried.append(f"softcap={cap}, scale={scale:.6g}: max error {err:.3g}")
    raise NotImplementedError(
        f"{name} post-processes its logits in a way t3s cannot reproduce (it supports "
        f"softcap(scale * (h @ W.T + b)) with a scalar scale and the config's "
        f"final_logit_softcapping); tried " + "; ".join(tried))


def _fit_logit_map(f: torch.Tensor, z: torch.Tensor, cap: Optional[float],
                   given_scale: Optional[float], tol: float):
    """Least-squares s for f ~ cap * tanh(s * z / cap) (f ~ s * z without cap): (s, max error)."""
    if cap:
        ok = f.abs() < 0.9 * cap  # where tanh is safely invertible
        pre = cap * torch.atanh((f / cap).clamp(-1 + 1e-6, 1 - 1e-6))
    else:
        ok = torch.ones_like(f, dtype=torch.bool)
        pre = f
    if given_scale is not None:
        scale = float(given_scale)
    else:
        denom = (z * z * ok).sum().item()
        scale = (pre * z * ok).sum().item() / denom if denom > 0 else float("nan")
        if abs(scale - 1.0) <= tol:
            scale = 1.0
    if not math.isfinite(scale):
        return scale, float("inf")
    expected = scale * z
    if cap:
        expected = cap * torch.tanh(expected / cap)
    return scale, (f - expected).abs().max().item()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _output_embedding(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding "
                         "(get_output_embeddings() is None); t3s.patch needs a causal LM head")
    weight = getattr(head, "weight", None)
    # A ZeRO-3 partition is 1-D and empty here; `_full_tensor` refuses it when the loss runs.
    if not isinstance(weight, torch.Tensor) or (weight.dim() != 2 and _is_materialised(weight)):
        raise ValueError(f"{type(model).__name__}'s output embedding {type(head).__name__} has no "
                         "2-D weight [V, H]")
    return head


def _is_materialised(t: torch.Tensor) -> bool:
    if t.device.type == "meta" or t.numel() == 0:
        return False
    return not _is_dtensor(t)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _full_tensor(t: torch.Tensor, what: str, hidden_size: Optional[int]) -> torch.Tensor:
    """The head's parameter as a full local tensor, or a clear error."""
    if _is_dtensor(t):
        raise RuntimeError(
            f"the output embedding {what} is a DTensor (FSDP2 / tensor parallel) when the fused "
            "loss runs; t3s needs the whole [V, H] weight there. Leave the output embedding in "
            "the root FSDP unit (do not fully_shard it separately; fully_shard(model) last keeps "
            "root parameters gathered from forward to backward) or do not tensor-parallelise it")
    if t.numel() == 0:
        raise RuntimeError(
            f"the output embedding {what} is partitioned (DeepSpeed ZeRO-3: {t.numel()} local "
            "elements) when the fused loss runs; t3s needs the whole [V, H] weight. Register it "
            "with the root module so it is gathered around the model's forward and backward: "
            "deepspeed.zero.register_external_parameter(model, "
            "model.get_output_embeddings().weight), or train the head outside ZeRO-3")
    if hidden_size is not None and (t.dim() != 2 or t.shape[1] != hidden_size):
        raise RuntimeError(f"the output embedding {what} has shape {tuple(t.shape)}, expected "
                           f"[V, {hidden_size}]")
    return t


def _final_softcap(config) -> Optional[float]:
    if config is None:
        return None
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except Exception:  # pragma: no cover - exotic configs
            pass
    for c in configs:
        cap = getattr(c, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


def _special_token_ids(config) -> List[int]:
    """Integer ``*token_id`` / ``*token_index`` values of a config and its sub-configs."""
    found: List[int] = []
    seen = set()
    stack = [config]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        for key, value in getattr(c, "__dict__", {}).items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                values = value if isinstance(value, (list, tuple)) else [value]
                found += [v for v in values if isinstance(v, int) and not isinstance(v, bool)
                          and v >= 0]
            elif hasattr(value, "to_dict") and hasattr(value, "__dict__"):
                stack.append(value)
    return found


def _patched_signature(sig: inspect.Signature) -> inspect.Signature:
    """The original signature plus t3s's keyword-only arguments (and ``self``).

    HF's Trainer reads it: ``loss_mask`` must be listed so dataset columns of
    that name are kept, and ``**kwargs`` so ``num_items_in_batch`` is passed.
    """
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    var_kw = None
    for p in sig.parameters.values():
        if p.kind == P.VAR_KEYWORD:
            var_kw = p
        elif p.name not in _EXTRA_KWARGS:
            params.append(p)
    params += [P("loss_mask", P.KEYWORD_ONLY, default=None),
               P("return_token_stats", P.KEYWORD_ONLY, default=False),
               P("t3s_fused_loss", P.KEYWORD_ONLY, default=None)]
    params.append(var_kw or P("kwargs", P.VAR_KEYWORD))
    return sig.replace(parameters=params)


def _positional_to_keywords(names: List[str], args: tuple, kwargs: dict) -> dict:
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {len(names)} positional arguments, got {len(args)}")
    out = dict(kwargs)
    for name, value in zip(names, args):
        if name in out:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        out[name] = value
    return out


def _shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    pad = x.new_full(x.shape[:-1] + (1,), fill)
    return torch.cat([x[..., 1:], pad], dim=-1)


def _check_mask(loss_mask, labels: torch.Tensor, name: str) -> None:
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a tensor, got {type(loss_mask).__name__}")
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)} but {name} has shape "
                         f"{tuple(labels.shape)}; it must be aligned with {name}")


def _mask_dtype(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    if mask.is_complex():
        raise TypeError(f"loss_mask must be bool, float or 0/1 integers, got {mask.dtype}")
    return mask.float()


def _as_1d(value, key: str, index: int, dtype) -> torch.Tensor:
    t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"example {index}: {key} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"example {index}: {key} must be real, got {t.dtype}")
    return t.to(dtype)


# --------------------------------------------------------------------------------------
# liger-kernel composition
# --------------------------------------------------------------------------------------


def _apply_liger(model: nn.Module) -> bool:
    """Apply liger-kernel's non-loss kernels for the model type; the loss stays t3s's."""
    try:
        from liger_kernel.transformers import monkey_patch as liger
    except ImportError as exc:
        raise ImportError(
            "compose_liger=True needs liger-kernel: pip install liger-kernel") from exc
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
