"""Bidirectional masked LMs as diffusion language models: one adapter for all of them.

Legend: B sequences, L length, H hidden size, V vocabulary size.

`MaskedLMAdapter` wraps any Hugging Face model with bidirectional attention and
a masked-LM head (``BertForMaskedLM``, ``ModernBertForMaskedLM``, LLaDA-style
models, ...): a model whose logits are one linear map of its final hidden
states, ``logits = h @ W.T + b`` (`t3s.hf.lm_head` checks the map, scale and
softcap included, with a probe forward). The adapter gives

* ``hidden_states(input_ids, attention_mask)``: [B, L, H], what the output
  embedding receives (the model's own forward; no logits are computed), for the
  fused diffusion loss (`t3s.dllm.loss`);
* ``head_tensors()``: the head's (weight [V, H], bias [V] or None), scale and
  softcap applied so that ``F.linear(h, W, b)`` are the logits;
* ``logits(input_ids, attention_mask)``: [B, L, V] float32, for generation;
* ``mask_token_id``: the token that marks a masked position.

``verify=True`` (the default) also checks that attention is bidirectional: a
probe forward changes the last token and requires the first position's hidden
state to change. A causal LM fails it with a clear message (the diffusion
objective predicts masked tokens from both sides).

`load_masked_lm` loads such a model from a local directory (safetensors only,
``AutoModelForMaskedLM``). `load_llada` loads a LLaDA-style model (LLaDA-8B,
LLaDA-2.0; they ship their own modelling code, so ``trust_remote_code=True``
must be passed explicitly after reading that code; it is never turned on
implicitly). Their mask token comes from the argument, the tokenizer's
``mask_token_id`` or the config's ``mask_token_id``, in that order; LLaDA-8B's
is 126336 (pass ``mask_token_id=126336`` when its files do not name it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..hf.heads import LMHead, last_hidden_state, lm_head

__all__ = ["MaskedLMAdapter", "load_masked_lm", "load_llada", "load_diffusion_lm", "resolve_mask_token_id"]


def resolve_mask_token_id(model, tokenizer=None, mask_token_id: Optional[int] = None) -> int:
    """The mask token: ``mask_token_id`` if given, else the tokenizer's, else the config's.

    Raises ValueError when none names one (a diffusion LM cannot be trained
    without it)."""
    if mask_token_id is None and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError(f"{type(model).__name__} has no mask token (neither the tokenizer nor the "
                         "config names one); pass mask_token_id=")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    return int(mask_token_id)


class MaskedLMAdapter:
    """A bidirectional masked LM seen as a diffusion LM (see the module docstring).

    model: the Hugging Face model. tokenizer: its tokenizer (for the mask token).
    mask_token_id: overrides the tokenizer's / config's mask token.
    verify: probe the logit map (`t3s.hf.lm_head`) and bidirectional attention.
    """

    def __init__(self, model: torch.nn.Module, *, tokenizer=None, mask_token_id: Optional[int] = None,
                 verify: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.mask_token_id = resolve_mask_token_id(model, tokenizer, mask_token_id)
        self.head: LMHead = lm_head(model, verify=verify)
        V = self.head.vocab_size or self.head.weight.shape[0]
        if self.mask_token_id >= V:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the head's vocabulary "
                             f"of {V} tokens")
        if verify:
            self.check_bidirectional()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L, H]: what the output embedding receives (no logits are computed)."""
        return last_hidden_state(self.model, input_ids, attention_mask)

    def head_tensors(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight [V, H], bias [V] or None) with the logit scale folded in, so that
        ``F.linear(h, weight, bias)`` are the logits before any softcap."""
        weight, bias = self.head.tensors()
        s = self.head.logit_scale
        if s != 1.0:
            weight = weight * s
            bias = None if bias is None else bias * s
        return weight, bias

    @property
    def softcap(self) -> Optional[float]:
        return self.head.softcap

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """[B, L, V] float32 logits (the model's own forward; for generation)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out[0]
        V = self.head.vocab_size
        return (logits[..., :V] if V else logits).float()

    @torch.no_grad()
    def check_bidirectional(self) -> None:
        """ValueError unless the first position's hidden state depends on the last token."""
        V = self.head.vocab_size or self.head.weight.shape[0]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (1, 8), generator=g)
        ids[ids == self.mask_token_id] = (self.mask_token_id + 1) % V
        other = ids.clone()
        other[0, -1] = (ids[0, -1] + 1) % V
        if other[0, -1] == self.mask_token_id:
            other[0, -1] = (other[0, -1] + 1) % V
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            both = torch.cat([ids, other]).to(self.device)
            h = self.hidden_states(both, torch.ones_like(both)).float()
        finally:
            for m, mode in modes.items():
                m.training = mode
        scale = float(h[:, 0].abs().max()) + 1e-12
        if float((h[0, 0] - h[1, 0]).abs().max()) <= 1e-6 * scale:
            raise ValueError(f"{type(self.model).__name__} attends causally (the first position does "
                             "not see the last token); a diffusion LM needs bidirectional "
                             "attention (e.g. a *ForMaskedLM or a LLaDA-style model)")

    def __repr__(self) -> str:
        return (f"MaskedLMAdapter({type(self.model).__name__}, mask_token_id={self.mask_token_id}, "
                f"vocab={self.head.weight.shape[0]})")


def _check_local_dir(path: Union[str, os.PathLike], trust_remote_code: bool) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; diffusion models load from a local "
                                "Hugging Face directory (download it first)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{path} has no .safetensors weights (pickle weights are not loaded: "
                         "unpickling can run code)")
    auto_map = json.loads(cfg.read_text(encoding="utf-8")).get("auto_map")
    if auto_map and not trust_remote_code:
        raise ValueError(f"{path} needs its own Python code (config.json has auto_map: "
                         f"{', '.join(sorted(auto_map))}); read it, then pass "
                         "trust_remote_code=True (--trust-remote-code)")
    return path


def load_masked_lm(path: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False, mask_token_id: Optional[int] = None,
                   verify: bool = True):
    """(`MaskedLMAdapter`, tokenizer) of a ``*ForMaskedLM`` in a local directory."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    path = _check_local_dir(path, trust_remote_code)
    model = AutoModelForMaskedLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return MaskedLMAdapter(model, tokenizer=tok, mask_token_id=mask_token_id, verify=verify), tok


def load_llada(path: Union[str, os.PathLike], *, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.bfloat16, mask_token_id: Optional[int] = None,
               verify: bool = True):
    """(`MaskedLMAdapter`, tokenizer) of a LLaDA-style diffusion LM in a local directory.

    LLaDA checkpoints register their classes through ``auto_map`` (LLaDA-8B:
    ``AutoModel``; LLaDA-2.0: ``AutoModelForCausalLM`` although attention is
    bidirectional), so the class is taken from ``auto_map`` in that order, then
    from ``AutoModelForMaskedLM``. Their code runs only with
    ``trust_remote_code=True``; without it a directory that needs it is refused
    (ValueError) before anything is imported. The head must be a module call of
    the output embedding (``get_output_embeddings()``), which `MaskedLMAdapter`
    checks with its probe; the probe also checks bidirectional attention.
    """
    import transformers
    path = _check_local_dir(path, trust_remote_code)
    auto_map = json.loads((path / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    order = [n for n in ("AutoModelForMaskedLM", "AutoModel", "AutoModelForCausalLM") if n in auto_map]
    order = order or ["AutoModelForMaskedLM"]
    kw = dict(dtype=dtype, use_safetensors=True, local_files_only=True,
              trust_remote_code=trust_remote_code)
    model = getattr(transformers, order[0]).from_pretrained(path, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    return MaskedLMAdapter(model, tokenizer=tok, mask_token_id=mask_token_id, verify=verify), tok


def load_diffusion_lm(path: Union[str, os.PathLike], *, trust_remote_code: bool = False,
                      dtype: torch.dtype = torch.float32, mask_token_id: Optional[int] = None,
                      verify: bool = True):
    """(`MaskedLMAdapter`, tokenizer) of a local diffusion LM: `load_llada` when its
    config registers its own classes (``auto_map``), else `load_masked_lm`."""
    path = _check_local_dir(path, trust_remote_code)
    auto_map = json.loads((path / "config.json").read_text(encoding="utf-8")).get("auto_map")
    load = load_llada if auto_map else load_masked_lm
    return load(path, trust_remote_code=trust_remote_code, dtype=dtype, mask_token_id=mask_token_id,
                verify=verify)
