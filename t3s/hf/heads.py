"""How a Hugging Face causal LM turns its last hidden states into logits.

One description of the LM head, shared by `t3s.patch` (the fused training
loss) and `t3s.profile` (exact forward-only log-probs):

* `lm_head` returns an `LMHead`: the output embedding
  (``model.get_output_embeddings()``, weight [V, H], optional bias [V]) and
  what the model does to its output, ``logits = softcap(logit_scale * z)``
  with ``z = h @ W.T + b``, restricted to the first ``vocab_size`` columns.
  The map is measured by a probe forward (``verify=True``) rather than read
  from config field names; without the probe it is the config's hypothesis.
* `last_hidden_state` runs the model's own forward (every input passed
  through) and records what the output embedding receives (`t3s.hf.tap`'s
  head tap), i.e. exactly what the model would project, after whatever final
  norm or scaling the architecture applies. The projection itself is skipped:
  no [B, T, V] logits are computed.

Shapes: B batch, T sequence length, H hidden size, V vocabulary size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .tap import head_tap, single_hidden

__all__ = ["LMHead", "lm_head", "last_hidden_state", "output_embedding", "is_dtensor",
           "peek_parameter"]

@dataclass(frozen=True)
class LMHead:
    """A causal LM's logit map: ``softcap(logit_scale * (h @ W.T + b))[..., :vocab_size]``.

    module: the output embedding; ``weight`` [V, H] and ``bias`` [V] (or None)
        are read from it (`tensors` gives them ready for a kernel).
    logit_scale: the multiplier applied before the softcap (Cohere's
        ``logit_scale``, Granite's ``1 / logits_scaling``, ...; 1.0 for most).
    softcap: the final logit softcap (Gemma 2/3's ``final_logit_softcapping``
        when the model really applies it), or None.
    vocab_size: number of head rows that enter the softmax when the model
        slices padded vocabulary rows off its logits, else None (all V rows).
    verified: True when a probe forward measured the map; False when it is the
        config's hypothesis (``verify=False``, or weights not materialised).
    """

    module: nn.Module
    logit_scale: float
    softcap: Optional[float]
    vocab_size: Optional[int]
    verified: bool

    @property
    def weight(self) -> torch.Tensor:
        """The output embedding's weight [V, H], as stored (possibly sharded)."""
        return self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The output embedding's bias [V], or None."""
        return getattr(self.module, "bias", None)

    def tensors(self, *, hidden_size: Optional[int] = None,
                gather: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight [V', H], bias [V'] or None) as full local tensors, V' = ``vocab_size or V``.

        ``gather=True`` gathers a DTensor (FSDP2 / tensor parallel) with
        ``full_tensor()``, a collective every rank must join; otherwise a DTensor
        raises `RuntimeError`, as does a ZeRO-3 partition (0 local elements)
        in every case. ``hidden_size`` checks that the weight is [V, hidden_size].
        """
        weight = _full_tensor(self.weight, "weight", hidden_size, gather)
        bias = self.bias
        if bias is not None:
            bias = _full_tensor(bias, "bias", None, gather)
        if self.vocab_size is not None and self.vocab_size < weight.shape[0]:
            weight = weight[: self.vocab_size]
            bias = None if bias is None else bias[: self.vocab_size]
        return weight, bias


def lm_head(model: nn.Module, *, verify: bool = True,
            logit_scale: Optional[float] = None) -> LMHead:
    """Describe ``model``'s LM head: its output embedding and logit map.

    Works for any Hugging Face ``*ForCausalLM`` (or multimodal
    ``*ForConditionalGeneration``) whose logits are its output embedding (a
    linear map, tied or not, with or without bias) applied to the decoder's
    hidden states, optionally followed by a scalar scale and a final softcap.

    With ``verify=True`` a probe forward (8 tokens, eval mode, no grad; the
    modules' training flags are restored) checks that the output embedding is
    ``F.linear(h, W, b)`` and fits the model's post-processing of its output
    to ``softcap(scale * z)``. The softcap is ``config.final_logit_softcapping``
    when the model really applies it; ``scale`` is measured. The probe is
    skipped with a warning when the weights are not materialised (meta
    device, ZeRO-3 partitions, DTensors). Without the probe, the map is the
    config's hypothesis: ``final_logit_softcapping``, and a scale from
    ``logit_scale`` (multiplied) and ``logits_scaling`` (divided).

    Args:
        model: a Hugging Face causal LM.
        verify: run the probe (one forward of 8 tokens).
        logit_scale: the scale, when known; with ``verify`` it is checked
            instead of measured.

    Raises:
        ValueError: the model has no output embedding with a 2-D weight.
        NotImplementedError: the probe found logits that are not
            ``softcap(scale * (h @ W.T + b))``.
        RuntimeError: the probe forward itself failed.
    """
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    module = output_embedding(model)
    config = getattr(model, "config", None)
    softcap = _config_value(config, "final_logit_softcapping")
    scale = _config_scale(config) if logit_scale is None else float(logit_scale)
    if verify:
        probed = _probe_logit_map(model, module, softcap, logit_scale, scale)
        if probed is not None:
            scale, vocab_size, softcap = probed
            return LMHead(module, scale, softcap, vocab_size, verified=True)
    return LMHead(module, scale, softcap, None, verified=False)


def last_hidden_state(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None,
                      **forward_kwargs) -> torch.Tensor:
    """[B, T, H] hidden states that the output embedding maps to logits.

    Runs ``model(input_ids=..., attention_mask=..., use_cache=False,
    **forward_kwargs)`` with the output embedding's `t3s.hf.tap.HeadTap` (installed for
    the call unless `t3s.patch` installed one) recording its input and
    returning an empty [B, T, 0] tensor: the model's own forward
    decides what reaches the head (final norm, multimodal wrappers, packed
    ``position_ids``, ...) and no logits are computed.
    """
    module = output_embedding(model)
    with head_tap(module) as tap, tap.recording(compute_logits=False):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
              **forward_kwargs)
        hidden = list(tap.hidden)
    return single_hidden(hidden, type(model).__name__)


# --------------------------------------------------------------------------------------
# The probe: what does the model do to the head's output?
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _probe_logit_map(model, head, softcap, given_scale, fallback_scale):
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
            warnings.warn(f"t3s: {name} weights are not materialised (meta device, ZeRO-3 "
                          "partition or DTensor); skipping the logit-map probe and assuming "
                          f"logit_scale={fallback_scale}, softcap={softcap} (from the config)",
                          stacklevel=5)
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
        with head_tap(head) as tap, tap.recording(compute_logits=True, replacement=ramp):
            try:
                out = model.forward(input_ids=ids, use_cache=False)
            except Exception as exc:  # the model's own failure, not the probe's verdict
                raise RuntimeError(
                    f"t3s: the probe forward of {name} on 8 tokens failed ({exc!r}); pass "
                    "verify=False (and logit_scale= if the model scales its logits)") from exc
            hidden_seen, head_logits = list(tap.hidden), tap.logits
    finally:
        for m, mode in modes.items():
            m.training = mode
    hidden = single_hidden(hidden_seen, name)
    logits = getattr(out, "logits", None) if not isinstance(out, tuple) else out[0]
    if not isinstance(logits, torch.Tensor):
        raise NotImplementedError(f"{name}.forward returned no logits; t3s cannot read its head")

    low = weight.dtype in (torch.float16, torch.bfloat16)
    tol = 2e-2 if low else 1e-4
    # 1) The head is a plain linear map.
    bias = getattr(head, "bias", None)
    linear = F.linear(hidden, weight, bias).float()
    head_out = head_logits.float()
    err = (head_out - linear).abs().max().item()
    if not err <= tol * (linear.abs().max().item() + 1.0):
        raise NotImplementedError(
            f"{name}: the output embedding {type(head).__name__} is not F.linear(h, weight, bias) "
            f"(max abs difference {err:.3g}); t3s cannot compute its logits from the hidden states")
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


def output_embedding(model: nn.Module) -> nn.Module:
    """``model.get_output_embeddings()``, checked to have a 2-D weight [V, H]."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding "
                         "(get_output_embeddings() is None); t3s needs a causal LM head")
    weight = peek_parameter(head, "weight")
    # FSDP1 / ZeRO-3 shards are 1-D (or empty) outside the head's call: the loss then runs
    # inside that call, where the weight is whole (`t3s.hf.patch`).
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        raise ValueError(f"{type(model).__name__}'s output embedding {type(head).__name__} has no "
                         "2-D weight [V, H]")
    return head


def peek_parameter(module: nn.Module, name: str):
    """``getattr(module, name, None)``, minus DeepSpeed ZeRO-3's gather-on-access.

    Inside a ZeRO-3 engine's forward, reading a partitioned parameter through its
    module's ``_parameters`` all-gathers it and registers it as an external
    parameter of the running module, whole through that module's forward and
    backward: read before the head's call, the head would stay whole for the
    model's entire forward and backward. Same lookup order as ``nn.Module``.
    """
    if torch.compiler.is_compiling():  # traced as is; ZeRO-3 skips its gather then too
        return getattr(module, name, None)
    try:
        return object.__getattribute__(module, name)  # instance dict, class descriptors
    except AttributeError:
        pass
    params = module.__dict__.get("_parameters")
    if isinstance(params, dict) and name in params:
        return dict.get(params, name)  # not a subclass's __getitem__
    return getattr(module, name, None)


def _is_materialised(t: torch.Tensor) -> bool:
    if t.device.type == "meta" or t.numel() == 0:
        return False
    return not is_dtensor(t)


def is_dtensor(t) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (FSDP2 / tensor-parallel parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _full_tensor(t: torch.Tensor, what: str, hidden_size: Optional[int],
                 gather: bool = False) -> torch.Tensor:
    """The head's parameter as a full local tensor, or a clear error."""
    if is_dtensor(t):
        if gather:
            # An autograd-aware all-gather. Its backward turns the replicated gradient
            # into the parameter's own sharding with an averaging reduce-scatter: each
            # data-parallel rank's gradient is partial, and FSDP2 averages over ranks
            # (tensor-parallel ranks hold the same gradient, so averaging keeps it).
            from torch.distributed.tensor import Partial
            t = t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
        else:
            raise RuntimeError(
                f"the output embedding {what} is a DTensor (FSDP2 / tensor parallel) when the "
                "fused loss runs; t3s needs the whole [V, H] weight there. Leave the output "
                "embedding in the root FSDP unit (do not fully_shard it separately; "
                "fully_shard(model) last keeps root parameters gathered from forward to "
                "backward) or do not tensor-parallelise it")
    if t.numel() == 0:
        raise RuntimeError(
            f"the output embedding {what} is partitioned (DeepSpeed ZeRO-3: {t.numel()} local "
            "elements) when t3s reads it; t3s needs the whole [V, H] weight. Register it "
            "with the root module so it is gathered around the model's forward and backward: "
            "deepspeed.zero.register_external_parameter(model, "
            "model.get_output_embeddings().weight), or train the head outside ZeRO-3")
    if hidden_size is not None and (t.dim() != 2 or t.shape[1] != hidden_size):
        raise RuntimeError(f"the output embedding {what} has shape {tuple(t.shape)}, expected "
                           f"[V, {hidden_size}]")
    return t


def _config_value(config, name: str) -> Optional[float]:
    """A truthy numeric field of ``config`` or of its text sub-config, as float."""
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
        value = getattr(c, name, None)
        if value:
            return float(value)
    return None


def _config_scale(config) -> float:
    """The config's logit scale: ``logit_scale`` (Cohere) / ``logits_scaling`` (Granite)."""
    scale = _config_value(config, "logit_scale") or 1.0
    divisor = _config_value(config, "logits_scaling")
    return scale / divisor if divisor else scale


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
