"""Iterative unmasking generation for masked-diffusion LMs (LLaDA's sampler).

Legend: B prompts in a group, P prompt length, G = ``gen_length`` new positions,
K = G / ``block_length`` blocks.

The answer starts as G mask tokens after the prompt. The blocks are filled left
to right (semi-autoregressive); each block gets ``steps / K`` steps, and each
step predicts every masked position of the sequence at once, then commits the
``n_s`` predictions of the current block with the highest confidence
(``remasking="low_confidence"``: p(argmax); ``"random"``: a random order) and
leaves the rest masked (the "remasked" low-confidence ones). The ``n`` masked
positions of a block are spread over its steps as evenly as possible (the first
``n mod steps`` steps commit one more). Committed tokens never change, so a row
is finished as soon as it holds an ``eos_token_id`` whose preceding positions
are all committed; generation stops when every row is (or after ``steps``).
Decoding is greedy (``temperature=0``) or samples the prediction with Gumbel
noise at ``temperature``.

Prompts are grouped by length so that no batch is padded (bidirectional
attention would otherwise see the padding, and absolute positions would shift).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["REMASKING", "check_schedule", "diffusion_generate"]

REMASKING = ("low_confidence", "random")


def check_schedule(gen_length: int, steps: int, block_length: int) -> int:
    """Steps per block, after checking that G is a multiple of the block length and
    ``steps`` a multiple of the number of blocks (ValueError otherwise)."""
    for name, v in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"gen_length / block_length = {blocks}")
    return steps // blocks


def _transfer_counts(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] tokens to commit per step: n // steps each, the remainder on the first steps."""
    base = n_masked // steps
    rem = n_masked % steps
    counts = base[:, None].expand(-1, steps).clone()
    counts += (torch.arange(steps, device=n_masked.device)[None, :] < rem[:, None]).long()
    return counts


def _finished(gen: torch.Tensor, mask_id: int, eos_id: Optional[int]) -> torch.Tensor:
    """[B] True where the answer is final: an EOS with every earlier position committed."""
    if eos_id is None:
        return torch.zeros(gen.shape[0], dtype=torch.bool, device=gen.device)
    open_ = (gen == mask_id).long().cumsum(1)        # masked positions up to each column
    return ((gen == eos_id) & (open_ == 0)).any(1)


@torch.no_grad()
def _generate_group(adapter, prompts: torch.Tensor, *, gen_length: int, steps_per_block: int,
                    block_length: int, temperature: float, remasking: str,
                    eos_token_id: Optional[int], generator: Optional[torch.Generator]):
    mask_id = adapter.mask_token_id
    B, P = prompts.shape
    device = prompts.device
    x = torch.cat([prompts, torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], 1)
    attention = torch.ones_like(x)
    used = 0
    for k in range(gen_length // block_length):
        lo, hi = P + k * block_length, P + (k + 1) * block_length
        counts = _transfer_counts((x[:, lo:hi] == mask_id).sum(1), steps_per_block)
        for s in range(steps_per_block):
            if bool(_finished(x[:, P:], mask_id, eos_token_id).all()):
                return x[:, P:], used
            masked = x == mask_id
            logits = adapter.logits(x, attention)
            logits[..., mask_id] = -float("inf")          # a prediction is never the mask itself
            used += 1
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator, device="cpu").to(device)
                noisy = logits / temperature - torch.log(-torch.log(u.clamp_min(1e-20)))
                pred = noisy.argmax(-1)
            else:
                pred = logits.argmax(-1)
            if remasking == "low_confidence":
                conf = torch.softmax(logits, -1).gather(-1, pred[..., None]).squeeze(-1)
            else:
                conf = torch.rand(pred.shape, generator=generator, device="cpu").to(device)
            conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
            conf[:, hi:] = -float("inf")                  # only the current block is committed
            n = counts[:, s]
            if not bool((n > 0).any()):
                continue
            order = conf.argsort(1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(x.shape[1], device=device).expand(B, -1))
            commit = (rank < n[:, None]) & masked
            x = torch.where(commit, pred, x)
    return x[:, P:], used


@torch.no_grad()
def diffusion_generate(adapter, prompts: Sequence[Sequence[int]], *, gen_length: int, steps: int,
                       block_length: int, eos_token_id: Optional[int] = None,
                       temperature: float = 0.0, remasking: str = "low_confidence",
                       batch_size: int = 64, seed: int = 0,
                       return_stats: bool = False):
    """Generate an answer for each token-id prompt (see the module docstring).

    adapter: a `t3s.dllm.MaskedLMAdapter`. prompts: token-id lists (no mask
    token). Returns the new tokens per prompt, cut before the first
    ``eos_token_id`` (every block is filled by its last step, so no mask token
    remains before the cut). With
    ``return_stats``, also ``{"forwards": model calls, "finished_early":
    prompts whose generation stopped before the last step}``. The model is put
    in eval mode and restored afterwards.
    """
    steps_per_block = check_schedule(gen_length, steps, block_length)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mask_id = adapter.mask_token_id
    groups: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if mask_id in p:
            raise ValueError(f"prompt {i} contains the mask token {mask_id}")
        groups.setdefault(len(p), []).append(i)
    model = adapter.model
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out: List[Optional[List[int]]] = [None] * len(prompts)
    forwards, early = 0, 0
    try:
        for _, idx_all in sorted(groups.items()):
            for start in range(0, len(idx_all), batch_size):
                idx = idx_all[start:start + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=adapter.device)
                gen, used = _generate_group(adapter, ids, gen_length=gen_length,
                                            steps_per_block=steps_per_block,
                                            block_length=block_length, temperature=temperature,
                                            remasking=remasking, eos_token_id=eos_token_id,
                                            generator=generator)
                forwards += used
                early += len(idx) if used < steps else 0
                for row, i in zip(gen.tolist(), idx):
                    if eos_token_id is not None and eos_token_id in row:
                        row = row[:row.index(eos_token_id)]
                    out[i] = row
    finally:
        if was_training:
            model.train()
    return (out, {"forwards": forwards, "finished_early": early}) if return_stats else out
