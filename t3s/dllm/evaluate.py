"""Accuracy of a diffusion LM with the verifiers of the autoregressive path.

`diffusion_accuracy` is `t3s.training_accuracy` for a masked-diffusion LM: the
same fixed subset (`t3s.bottleneck.select_subset`), the same prompt tokens, the
same decoding of the new tokens (``skip_special_tokens=True``) and the same
verifiers (`t3s.verify`); only generation differs (`diffusion_generate`).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

import torch

from ..bottleneck import select_subset
from ..data import IGNORE_INDEX
from ..verify import Verifier, get_verifier
from .generate import diffusion_generate

__all__ = ["prompt_tokens", "diffusion_accuracy", "round_up"]


def prompt_tokens(ex: Mapping[str, Any]) -> List[int]:
    """The prompt token ids of a `t3s.data` example: ``input_ids[:prompt_length]``, else
    the ids before the first labelled position."""
    ids = torch.as_tensor(ex["input_ids"]).tolist()
    if "prompt_length" in ex:
        return ids[:int(ex["prompt_length"])]
    labels = torch.as_tensor(ex["labels"]).tolist()
    n = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    return ids[:n]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n."""
    return -(-int(n) // int(multiple)) * int(multiple)


def diffusion_accuracy(adapter, tokenizer, examples: Sequence[Mapping[str, Any]], *,
                       verifier: Union[str, Verifier, None] = "math",
                       subset_size: Optional[int] = None, gen_length: int = 64,
                       steps: Optional[int] = None, block_length: int = 32,
                       batch_size: int = 64, seed: int = 0, remasking: str = "low_confidence",
                       return_details: bool = False):
    """Fraction of ``examples`` (prompt, ``answer``) a diffusion LM answers correctly.

    adapter: a `t3s.dllm.MaskedLMAdapter`; tokenizer: its tokenizer (eos ends an
    answer); gen_length, block_length: see `diffusion_generate`; steps: default
    ``gen_length`` (one token per step). Returns the accuracy, or ``(accuracy,
    [{"example_id", "prediction", "answer", "correct"}])`` with ``return_details``.
    """
    verify_fn = get_verifier(verifier)
    subset = select_subset(list(examples), subset_size, seed)
    if not subset:
        raise ValueError("no examples to evaluate")
    steps = gen_length if steps is None else steps
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)   # BERT-style tokenizers end with [SEP]
    gens = diffusion_generate(adapter, [prompt_tokens(ex) for ex in subset], gen_length=gen_length,
                              steps=steps, block_length=block_length, eos_token_id=eos,
                              remasking=remasking, batch_size=batch_size, seed=seed)
    details = []
    for ex, toks in zip(subset, gens):
        pred = tokenizer.decode(toks, skip_special_tokens=True)
        details.append({"example_id": int(ex["example_id"]), "prediction": pred,
                        "answer": str(ex["answer"]), "correct": bool(verify_fn(pred, str(ex["answer"])))})
    acc = sum(d["correct"] for d in details) / len(details)
    return (acc, details) if return_details else acc
