"""Hugging Face integration: one generic fused-loss patch for any ``*ForCausalLM``.

`patch` swaps a model's ``forward`` (on the instance, undone by `unpatch`) for
one that computes the training loss with `t3s.masked_ce` straight from the
hidden states, so the [B, T, V] logits are never materialised, and that
accepts a per-token ``loss_mask``. `t3s.data.PaddedCollator` pads batches
that carry such masks; `count_loss_items` gives the matching
``num_items_in_batch``.

How the patch stays generic (one code path for Llama, Qwen2/3, Mistral,
Gemma/Gemma2, GPT-2, Phi, Cohere, Granite, multimodal wrappers, ...):

* The model's own forward still runs, with every input passed through
  (``attention_mask``, ``position_ids`` of packed batches, ``past_key_values`` /
  ``cache``, ``use_cache``, pixel inputs, ...). Only the output embedding
  (``model.get_output_embeddings()``) is intercepted, by a `t3s.hf.tap.HeadTap`
  installed once at patch time: during a loss call it records the hidden
  states it receives, i.e. exactly what the model would project, after
  whatever final norm or scaling the architecture applies (as in
  `t3s.hf.heads.last_hidden_state`), and skips the projection.
* Nothing is swapped per call, so ``torch.compile(model)`` (and HF's
  ``TrainingArguments(torch_compile=True)``) traces the patched forward; the
  loss runs in t3s_kernels' custom ops.
* What the model does to the logits *after* the output embedding is measured
  once, at patch time, by `t3s.hf.heads.lm_head`'s probe (``verify=True``): the
  probe feeds known values through the model's post-processing and fits
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

Sharded heads (FSDP2 / tensor parallel / ZeRO-3): the fused loss runs inside the
model's forward but outside the output embedding's own forward, and needs the
whole [V, H] head weight there. A head in the root ``fully_shard(model)`` unit is
unsharded from the root's forward to its backward and used as it is. A head that
is still a DTensor when the loss runs (its own FSDP2 unit, resharded after its
forward) is gathered with ``full_tensor`` inside the loss: an autograd-aware
all-gather whose backward reduce-scatters (averages) the gradient back to the
shards, as FSDP2 does for every other parameter. Engines that gather the weight in
the head module's own hooks (FSDP1 with the head in its own unit, DeepSpeed ZeRO-3)
leave a 1-D or empty shard outside that call: then the loss is computed inside the
head's call (`t3s.hf.tap.HeadTap` with a ``loss_fn``), and the head's empty output
feeds the loss so that the engine's backward hooks re-gather the weight first. A ZeRO-3
parameter always takes that path, and is inspected before the call with
`t3s.hf.heads.peek_parameter`, which skips ZeRO-3's gather-on-access: otherwise the
head would be registered as an external parameter of the whole model, kept whole
through its entire forward and backward.
"""

from __future__ import annotations

import dataclasses
import inspect
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from t3s_kernels.backends import check_backend_name

from ..loss import masked_ce
from .guards import PATCH_ATTR, check_causal_lm, describe_forward, install_guard, remove_guards
from .heads import LMHead, is_dtensor, lm_head, output_embedding, peek_parameter
from .arguments import mask_dtype, patched_signature, positional_to_keywords
from .labels import check_mask_shape, check_targets, shift_for_causal_lm
from .liger import apply_liger
from .tap import HeadTap, single_hidden
from .trl_head import (TRL_HEAD_KWARG, install_trl_hook, output_class, remove_trl_hooks,
                       resolve, trl_fields, trl_forward, warn_loss_options_unused)

__all__ = ["patch", "unpatch", "is_patched", "PatchInfo", "PatchedForward"]

# Loss options `patch` passes on to `masked_ce`; the others are set per call.
_LOSS_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "z_loss", "filter_eps",
                 "accum_dtype", "buffer_bytes", "token_scaling")


@dataclass
class PatchInfo:
    """What `patch` installed on a model (stored as ``model._t3s_patch``).

    previous_forward: the instance attribute ``forward`` before patching (e.g. a
        wrapper installed by accelerate), or None when the class forward was in
        use; the patched forward calls it (else the class forward) and `unpatch`
        restores it. Nothing here is a bound method or a closure, so a patched
        model survives ``copy.deepcopy`` and pickling (`torch.save`).
    patched_forward: the `PatchedForward` installed as ``model.forward``.
    head: the model's logit map (`t3s.hf.heads.LMHead`: ``logit_scale``,
        ``softcap``, ``vocab_size``, ``verified``), measured at patch time. The
        head's weight is read from the model's output embedding at every call.
    """

    previous_forward: Optional[Callable]
    patched_forward: "PatchedForward"
    backend: Optional[str]
    loss_options: Dict[str, Any]
    head: LMHead
    liger_applied: bool = False
    param_names: List[str] = field(default_factory=list)
    # Why TRL's own head serves ``fused_lm_head=True`` calls (`t3s.hf.trl_head.resolve`).
    trl_fallback: Optional[str] = None
    trl_options_warned: bool = False


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
    * ``example_id`` [B]: accepted and dropped, so that HF's Trainer keeps the
      dataset column that t3s's collators and callbacks key tokens by.
    * ``token_scaling``: None (default: the patch's option) or a bool for this
      call: DFT, each token's loss times stopgrad p(y_t) (`t3s.masked_ce`).
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
        backend: kernel backend for the loss: None (automatic) or a registered name
            ('triton', 'torch'; `t3s_kernels.available_backends()`).
        verify: run a probe forward (8 tokens, eval mode, no grad) now to check
            that the model's logits are ``softcap(scale * (h @ W.T + b))`` and to
            measure ``scale`` (see `t3s.hf.heads.lm_head`). Skipped with a warning
            when the weights are not materialised (meta device, ZeRO-3
            partitions, DTensors).
        logit_scale: the scalar multiplier on the head's output; measured when
            None and ``verify`` is on, else read from the config (Cohere's
            ``logit_scale``, Granite's ``1 / logits_scaling``; 1.0 without
            them). When given with ``verify``, it is checked.
        compose_liger: first apply liger-kernel's RMSNorm / RoPE / SwiGLU patches
            for the model type (not its losses: the loss stays t3s's). Needs
            liger-kernel, the ``liger`` extra (``pip install 't3s[liger]'``).
            Liger patches module-level functions of the model type; `unpatch`
            does not undo them.
        **loss_options: passed to `t3s.masked_ce`: ``ignore_index`` (default
            -100), ``reduction`` ('mean' or 'sum'), ``label_smoothing``,
            ``z_loss``, ``filter_eps``, ``accum_dtype``, ``buffer_bytes``.

    Raises:
        ValueError: the model is not a causal LM (`check_causal_lm`: masked LMs,
            classifiers and encoder-decoders are refused), is already patched,
            has no output embedding, or an option is invalid.
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
    check_backend_name(backend)
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    output_embedding(model)  # refuse a model without a head before liger changes anything
    check_causal_lm(model)
    liger_applied = apply_liger(model) if compose_liger else False

    forward = model.forward
    previous = model.__dict__.get("forward")
    head = lm_head(model, verify=verify, logit_scale=logit_scale)

    sig = inspect.signature(forward)
    param_names = [p.name for p in sig.parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    patched = PatchedForward(model, patched_signature(sig),
                             f"{type(model).__name__}.forward patched by t3s (fused masked "
                             f"loss; see t3s.hf.patch).\n\n{forward.__doc__ or ''}")
    info = PatchInfo(previous_forward=previous, patched_forward=patched, backend=backend,
                     loss_options=dict(loss_options), head=head,
                     liger_applied=liger_applied, param_names=param_names)
    model.__dict__[PATCH_ATTR] = info
    model.forward = patched
    # Installed once here, not swapped in per call: a compiled forward must see the
    # head's attributes unchanged.
    HeadTap.install(head.module)
    install_guard(model)
    install_trl_hook(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: restore the forward that was active before. Returns the model.

    Raises `RuntimeError` if something wrapped the forward after `patch` (unwrap
    that first), and `ValueError` if the model is not patched.
    """
    info = model.__dict__.get(PATCH_ATTR)
    if info is None:
        raise ValueError("model is not patched by t3s")
    current = model.__dict__.get("forward")
    if current is not info.patched_forward:
        raise RuntimeError(
            f"model.forward was replaced after t3s.patch, by {describe_forward(current)} (e.g. "
            "accelerate.prepare, trl.SFTTrainer or another patch); undo that wrapper first, "
            "then call t3s.unpatch")
    if info.previous_forward is None:
        del model.forward
    else:
        model.forward = info.previous_forward
    del model.__dict__[PATCH_ATTR]
    remove_guards(model)
    remove_trl_hooks(model)
    for module in {id(m): m for m in (info.head.module, _current_head(model))}.values():
        if module is not None:
            HeadTap.uninstall(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when `patch` is active on ``model``."""
    return PATCH_ATTR in getattr(model, "__dict__", {})


# --------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------


class PatchedForward:
    """``model.forward`` after `patch`: a plain callable object holding the model.

    Not a closure or a bound method, so ``copy.deepcopy`` rebinds it to the copy
    and pickle restores it; `torch.compile` inlines its ``__call__``.
    ``__signature__`` is the original signature plus t3s's keyword arguments.
    """

    def __init__(self, model: nn.Module, signature: inspect.Signature, doc: str):
        self.model = model
        self.__signature__ = signature
        self.__doc__ = doc
        self.depth = 0  # > 0 while a call is in progress (read by `BypassGuard`)

    def __call__(self, *args, **kwargs):
        model = self.model
        self.depth += 1
        try:
            return _patched_forward(model, model.__dict__[PATCH_ATTR], args, kwargs)
        finally:
            self.depth -= 1


def _original_forward(model: nn.Module, info: PatchInfo) -> Callable:
    if info.previous_forward is not None:
        return info.previous_forward
    return functools.partial(type(model).forward, model)


def _patched_forward(model: nn.Module, info: PatchInfo, args: tuple, kwargs: dict):
    loss_mask = kwargs.pop("loss_mask", None)
    return_token_stats = bool(kwargs.pop("return_token_stats", False))
    fused = kwargs.pop("t3s_fused_loss", None)
    token_scaling = kwargs.pop("token_scaling", None)
    # Named in the signature so that HF's Trainer keeps the column (t3s's collators key
    # masks and recorded tokens by it); the model itself never sees it.
    kwargs.pop("example_id", None)
    trl = kwargs.pop(TRL_HEAD_KWARG, None)
    if kwargs.pop("fused_lm_head", False):
        # Reached here when the model's forward was called past its hooks, or when TRL's own
        # head must serve the call (`t3s.hf.trl_head.resolve` said why, once).
        trl = resolve(model)
        if trl is None:
            if trl_forward(model) is None:
                raise ValueError("fused_lm_head=True cannot be served: "
                                 f"{info.trl_fallback}, and TRL's fused head is not installed")
            return _original_forward(model, info)(*args, fused_lm_head=True, **kwargs)
    if args and info.param_names:
        kwargs, args = positional_to_keywords(info.param_names, args, kwargs), ()
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        if loss_mask is not None or return_token_stats or trl is not None:
            raise ValueError("loss_mask, return_token_stats and fused_lm_head need labels")
        return _original_forward(model, info)(*args, **kwargs)

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

    if trl is not None:
        if loss_mask is not None or return_token_stats or token_scaling is not None:
            raise ValueError("fused_lm_head=True returns TRL's per-token outputs; loss_mask, "
                             "return_token_stats and token_scaling belong to t3s's own loss "
                             "(call without fused_lm_head, or fold the mask into labels as -100)")
        warn_loss_options_unused(info)
        kwargs["use_cache"] = False  # as TRL's head does
        skip_logits = True
    elif shift_labels is not None:
        targets = shift_labels
        if loss_mask is not None:
            check_mask_shape(loss_mask, targets, "shift_labels")
        mask = loss_mask
    else:
        if loss_mask is not None:
            check_mask_shape(loss_mask, labels, "labels")
        targets, mask = shift_for_causal_lm(labels, loss_mask, ignore_index=ignore_index)

    head = info.head
    tapped = _tapped_module(output_embedding(model))
    if tapped is not head.module:  # replaced since patching (e.g. resize_token_embeddings)
        head = dataclasses.replace(head, module=tapped)
    tap = HeadTap.of(tapped) or HeadTap.install(tapped)

    def loss_of(hidden: torch.Tensor):
        check_targets(targets, hidden)
        return _fused_loss(info, head, hidden, targets.to(hidden.device),
                           None if mask is None else mask_dtype(mask).to(hidden.device),
                           num_items, return_token_stats, token_scaling)

    def trl_of(hidden: torch.Tensor):
        return trl_fields(info, head, hidden, labels, shift_labels, num_items, trl)

    compute = loss_of if trl is None else trl_of
    # A head whose weight is whole only during its own call (FSDP1 / ZeRO-3 gather it in
    # module hooks) gets its loss computed inside that call; otherwise after the forward.
    inside = not _whole_outside_call(peek_parameter(tapped, "weight"))
    tap.begin(compute_logits=not skip_logits, loss_fn=compute if inside else None)
    try:
        out = _original_forward(model, info)(*args, **kwargs)
        inner = tap.loss_result
    finally:
        seen = tap.end()
    hidden = single_hidden(seen, type(model).__name__)
    if not isinstance(out, Mapping) or not hasattr(out, "to_tuple"):
        raise TypeError(f"{type(model).__name__}.forward returned {type(out).__name__}, not a "
                        "ModelOutput; t3s.patch needs return_dict=True outputs")
    result = inner if inside else compute(hidden)
    carrier = out.get("logits") if inside else None
    if isinstance(carrier, torch.Tensor) and carrier.requires_grad:
        # The head's (empty) output leads to what is differentiated, so the engine's backward
        # hooks on that output (re-gathering the weight) run before the kernels' backward.
        zero = carrier.sum()
        if trl is not None:
            result = dict(result, log_probs=result["log_probs"] + zero.to(torch.float32))
        elif return_token_stats:
            result = (result[0] + zero.to(result[0].dtype), result[1])
        else:
            result = result + zero.to(result.dtype)

    if trl is not None:
        result["loss"] = _add_router_aux_loss(model, out, result["loss"])
        new = output_class()(**result, aux_loss=out.get("aux_loss"))
        return new if return_dict else new.to_tuple()
    loss, stats = result if return_token_stats else (result, None)
    loss = _add_router_aux_loss(model, out, loss)

    fields = dict(out.items())
    fields["loss"] = loss
    fields["logits"] = None if skip_logits else fields.get("logits")
    if stats is None:
        new = type(out)(**fields)
    else:
        # a field of its own: engines that rebuild the output from its items (DDP with
        # find_unused_parameters) call the output class with every key
        new = _with_token_stats(type(out))(**fields, token_stats=stats)
    return new if return_dict else new.to_tuple()


_STATS_OUTPUTS: Dict[type, type] = {}


def _with_token_stats(output_type: type) -> type:
    """``output_type`` (a `ModelOutput` dataclass) with a ``token_stats`` field added."""
    cls = _STATS_OUTPUTS.get(output_type)
    if cls is None:
        cls = dataclasses.make_dataclass(
            output_type.__name__, [("token_stats", Optional[Any], None)], bases=(output_type,),
            namespace={"__module__": output_type.__module__,
                       "__doc__": f"{output_type.__name__} with t3s's token_stats."})
        _STATS_OUTPUTS[output_type] = cls
    return cls


def _tapped_module(module: nn.Module) -> nn.Module:
    """The module that holds the `HeadTap`: the head itself, or the head inside an engine's
    wrapper (FSDP1 wraps the output embedding in a module of its own)."""
    return next((m for m in module.modules() if HeadTap.of(m) is not None), module)


def _whole_outside_call(weight) -> bool:
    """True when the head's weight is usable after its call: a full [V, H] tensor or a
    DTensor (gathered in the loss). False for FSDP1 shards (1-D or empty) and for every
    DeepSpeed ZeRO-3 parameter (``ds_id``): whether one is whole before the head's call
    (persistent, prefetched) says nothing about the moment the loss runs."""
    if hasattr(weight, "ds_id"):
        return False
    return isinstance(weight, torch.Tensor) and (
        (weight.dim() == 2 and weight.numel() > 0) or is_dtensor(weight))


def _current_head(model: nn.Module) -> Optional[nn.Module]:
    try:
        return output_embedding(model)
    except ValueError:
        return None


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


def _fused_loss(info: PatchInfo, head: LMHead, hidden: torch.Tensor, targets: torch.Tensor,
                mask: Optional[torch.Tensor], num_items, return_stats: bool,
                token_scaling: Optional[bool] = None):
    """masked_ce on the captured hidden states [B, T, H] with the head's weight [V, H]."""
    weight, bias = head.tensors(hidden_size=hidden.shape[-1], gather=True)
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
    if head.logit_scale != 1.0:
        hidden = hidden * head.logit_scale
        bias = None if bias is None else bias * head.logit_scale
    # An accumulation step whose tokens are all dropped has num_items == 0: give 0, not 0/0.
    tiny = torch.finfo(torch.float32).tiny
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(hidden.device, torch.float32).clamp_min(tiny)
    elif num_items is not None and num_items == 0:
        num_items = tiny
    options = dict(info.loss_options)
    if token_scaling is not None:
        options["token_scaling"] = token_scaling
    with torch.autocast(device_type, enabled=False):
        return masked_ce(hidden, weight, targets, mask, bias=bias, softcap=head.softcap,
                         normalizer=num_items, return_stats=return_stats, backend=info.backend,
                         **options)
