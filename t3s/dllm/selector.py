"""An autoregressive selector's artifact applied to a diffusion LM's data.

T3S for diffusion LMs takes Δc from an autoregressive model that shares the
diffusion model's tokenizer: the pilot SFT, the bottleneck and Δc run on the AR
model (``t3s run`` / the method API), and the resulting `t3s.SelectionArtifact`
is applied to the diffusion model's training data. Token keys ``(example_id,
position)`` name the same tokens for both models because the examples are
tokenized identically; position p is the token x_p itself, which the diffusion
model predicts at p when it is masked.

`forced_masks` checks the artifact against the diffusion side (the tokenizer
fingerprint must match: a different tokenizer is refused with what differs;
the examples must be the ones the artifact was made from) and returns the
forced set per example, re-deriving it as S = {Δc < −τ} from the stored Δc when
the artifact holds another rule (τ from the artifact, default 0.2).
`random_forced_masks` draws a random set of the same size, the same-budget
baseline.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from ..artifact import SelectionArtifact
from ..data import TokenTable

__all__ = ["DEFAULT_TAU", "forced_artifact", "forced_masks", "random_forced_masks",
           "forced_fraction_of"]

#: τ of the forced set when neither the artifact nor the caller gives one
DEFAULT_TAU = 0.2


def forced_artifact(artifact: Union[SelectionArtifact, str, os.PathLike], *,
                    tau: Optional[float] = None) -> SelectionArtifact:
    """The artifact with rule ``forced``: as is when it already is one (and ``tau`` is None
    or equal to its τ), else re-derived from its Δc with ``tau`` (default: the
    artifact's τ, else `DEFAULT_TAU`)."""
    art = artifact if isinstance(artifact, SelectionArtifact) else SelectionArtifact.load(artifact)
    stored = art.metadata.get("tau")
    if art.rule == "forced" and (tau is None or (stored is not None and float(tau) == float(stored))):
        return art
    if tau is None:
        tau = float(stored) if art.rule == "forced" and stored is not None else DEFAULT_TAU
    return art.reapply("forced", tau=float(tau))


def forced_masks(artifact: Union[SelectionArtifact, str, os.PathLike],
                 examples: Iterable[Mapping[str, Any]], tokenizer, *,
                 tau: Optional[float] = None) -> Dict[int, torch.Tensor]:
    """example_id -> forced [L] bool, aligned with each example's ``labels`` (False on
    the prompt), from an AR selector's artifact.

    tokenizer: the diffusion model's tokenizer; its fingerprint must equal the
    selector's (ValueError naming what differs otherwise). examples: the
    diffusion model's training examples (`t3s.data` dicts), which must be the
    ones the artifact was made from (ValueError otherwise).
    """
    if tokenizer is None:
        raise ValueError("forced_masks needs the diffusion model's tokenizer to check that the "
                         "selector shares it")
    examples = list(examples)
    art = artifact if isinstance(artifact, SelectionArtifact) else SelectionArtifact.load(artifact)
    try:
        art.check(tokenizer=tokenizer)
    except ValueError as e:
        raise ValueError("the autoregressive selector and the diffusion model do not share a "
                         f"tokenizer, so its Δc names other tokens ({e}); T3S for diffusion LMs "
                         "needs a selector with the diffusion model's tokenizer") from None
    art = forced_artifact(art, tau=tau)
    return art.masks(examples, dtype=torch.bool, check=True)


def random_forced_masks(like: Mapping[int, torch.Tensor], examples: Iterable[Mapping[str, Any]], *,
                        seed: int = 0) -> Dict[int, torch.Tensor]:
    """A random forced set with as many tokens as ``like`` (example_id -> [L] bool), drawn
    uniformly over every response token of ``examples`` with ``seed`` (independent of
    example order). Returns example_id -> [L] bool."""
    examples = list(examples)
    keys = TokenTable.from_examples(examples).sorted()
    count = int(sum(int(m.sum()) for m in like.values()))
    if count > len(keys):
        raise ValueError(f"like has {count} forced tokens but the data has {len(keys)} response tokens")
    pick = np.zeros(len(keys), dtype=bool)
    pick[np.random.default_rng(seed).permutation(len(keys))[:count]] = True
    table = TokenTable(keys.example_id, keys.position, {"forced": pick})
    return table.to_loss_masks(examples, "forced", dtype=torch.bool)


def forced_fraction_of(masks: Mapping[int, torch.Tensor], examples: Iterable[Mapping[str, Any]]) -> float:
    """Forced tokens / response tokens over ``examples`` (0.0 without response tokens)."""
    from ..data import IGNORE_INDEX
    total = forced = 0
    for ex in examples:
        labels = torch.as_tensor(ex["labels"])
        total += int((labels != IGNORE_INDEX).sum())
        forced += int(masks[int(ex["example_id"])].sum())
    return forced / total if total else 0.0
