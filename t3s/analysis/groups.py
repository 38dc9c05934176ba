"""Token groups and the padded batches the diagnostics run on.

A *group* is a set of trace tokens, given per example as a bool mask [L]
aligned with that example's ``labels`` (the layout of
`t3s.SelectionArtifact.loss_masks`); `groups_from_artifact` gives the
paper's two (the tokens the rule selects, i.e. the anchors under the anchor
rule, and the rest). `GroupBatch` holds a padded batch with one mask per group;
`make_batches` cuts a list of examples into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["Groups", "GroupBatch", "groups_from_artifact", "check_groups", "make_batches",
           "choose_examples"]

#: group name -> example_id -> bool mask [L] aligned with the example's labels
Groups = Dict[str, Dict[int, torch.Tensor]]

IGNORE_INDEX = -100


@dataclass
class GroupBatch:
    """A right-padded batch: input_ids / attention_mask / labels [B, T] and
    ``masks`` [G, B, T] bool (one per group, aligned with ``labels``; False on
    padding, the prompt and ignored labels)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    example_ids: List[int]

    def to(self, device) -> "GroupBatch":
        return GroupBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.labels.to(device), self.masks.to(device), self.example_ids)

    def counts(self) -> torch.Tensor:
        """Tokens of each group in the batch, as loss targets: int64 [G]."""
        return self.masks[:, :, 1:].sum(dim=(1, 2))


def _labels(ex: Mapping[str, Any]) -> torch.Tensor:
    return torch.as_tensor(ex["labels"]).reshape(-1).long()


def groups_from_artifact(artifact, examples: Iterable[Mapping[str, Any]], *,
                         names: Optional[Tuple[str, str]] = None, check: bool = True) -> Groups:
    """The tokens a `t3s.SelectionArtifact`'s rule selects and the other trace tokens.

    Selected: left out of the loss (loss-mask rules; the anchors under the anchor
    rule) or forced (``forced``). names: the two groups' names (default
    ``("anchors", "rest")`` under the anchor rule, else ``("selected", "rest")``).
    check: first verify the artifact against ``examples`` (pass False for a subset of
    data the artifact was already checked against: `t3s.SelectionArtifact.load`)."""
    examples = list(examples)
    masks = artifact.masks(examples, dtype=torch.bool, check=check)
    if names is None:
        names = ("anchors", "rest") if artifact.rule == "anchor" else ("selected", "rest")
    selected, rest = {}, {}
    for ex in examples:
        eid = int(ex["example_id"])
        trace = _labels(ex) != IGNORE_INDEX
        m = masks[eid].reshape(-1).bool() & trace
        chosen = (trace & ~m) if artifact.mask_column == "loss_mask" else m
        selected[eid], rest[eid] = chosen, trace & ~chosen
    return {names[0]: selected, names[1]: rest}


def check_groups(groups: Mapping[str, Mapping[int, torch.Tensor]],
                 examples: Sequence[Mapping[str, Any]], *, min_groups: int = 2,
                 max_groups: int = 4) -> List[str]:
    """The group names, after checking there are ``min_groups``–``max_groups`` of
    them, each with a bool mask of the right length for every example, each
    holding at least one trace token. ValueError otherwise."""
    names = list(groups)
    if not min_groups <= len(names) <= max_groups:
        raise ValueError(f"expected {min_groups} to {max_groups} token groups, got {len(names)}")
    if not examples:
        raise ValueError("no examples to analyse")
    for name in names:
        total = 0
        for ex in examples:
            eid = int(ex["example_id"])
            if eid not in groups[name]:
                raise ValueError(f"group {name!r} has no mask for example {eid}")
            m = torch.as_tensor(groups[name][eid])
            if m.dtype != torch.bool:
                raise TypeError(f"group {name!r}: masks must be bool, got {m.dtype}")
            if m.numel() != _labels(ex).numel():
                raise ValueError(f"group {name!r}, example {eid}: mask of {m.numel()} tokens "
                                 f"for {_labels(ex).numel()} labels")
            total += int((m.reshape(-1) & (_labels(ex) != IGNORE_INDEX)).sum())
        if total == 0:
            raise ValueError(f"group {name!r} holds no trace token of the examples analysed")
    return names


def choose_examples(examples: Sequence[Mapping[str, Any]], n: Optional[int],
                    seed: int = 0) -> List[Mapping[str, Any]]:
    """A fixed random subset of ``n`` examples (all when ``n`` is None or ≥ the
    number), in data order."""
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"the number of examples must be ≥ 1, got {n}")
    pick = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in pick]


def make_batches(examples: Sequence[Mapping[str, Any]], groups: Groups, *,
                 batch_size: int = 8, pad_token_id: int = 0) -> List[GroupBatch]:
    """Right-padded `GroupBatch` es of ``batch_size`` examples (checked by
    `check_groups`)."""
    names = check_groups(groups, examples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        length = max(_labels(ex).numel() for ex in chunk)
        ids = torch.full((len(chunk), length), int(pad_token_id), dtype=torch.long)
        attn = torch.zeros((len(chunk), length), dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        masks = torch.zeros((len(names), len(chunk), length), dtype=torch.bool)
        for i, ex in enumerate(chunk):
            lab = _labels(ex)
            n = lab.numel()
            ids[i, :n] = torch.as_tensor(ex["input_ids"]).reshape(-1).long()
            attn[i, :n] = 1
            labels[i, :n] = lab
            for g, name in enumerate(names):
                masks[g, i, :n] = torch.as_tensor(groups[name][int(ex["example_id"])]).reshape(-1) \
                    & (lab != IGNORE_INDEX)
        out.append(GroupBatch(ids, attn, labels, masks, [int(ex["example_id"]) for ex in chunk]))
    return out
