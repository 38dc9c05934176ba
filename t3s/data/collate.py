"""Batching: `PaddedCollator` (one example per row) and `PackedCollator` (padding-free).

Legend: ``B`` examples in a batch, ``L`` tokens of one example, ``L'`` the
padded length, ``N`` tokens of a packed row. Both collators carry each
example's ``loss_mask`` (aligned with ``labels``) and ``example_id``, so the
batch can be mapped back to token keys (`t3s.data.token_keys`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..hf import is_patched
from .table import IGNORE_INDEX

__all__ = ["PaddedCollator", "PackedCollator", "pack_indices", "pad_token_id",
           "patched_model", "check_mask_reaches_loss", "mask_is_01"]


def patched_model(model) -> Optional[torch.nn.Module]:
    """The `t3s.patch`-ed module inside ``model``, or None when there is none.

    Looks through the wrappers a training run puts around a model: DDP /
    ``torch.compile`` (``.module`` / ``._orig_mod``) and PEFT
    (``get_base_model()``).
    """
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if is_patched(model):
            return model
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else None
        for name in ("module", "_orig_mod"):
            if inner is None or inner is model:
                inner = getattr(model, name, None)
        model = inner if isinstance(inner, torch.nn.Module) else None
    return None


def check_mask_reaches_loss(model, where: str = "this batch") -> None:
    """ValueError unless ``model`` (or the module inside its wrappers) is `t3s.patch`-ed.

    A Hugging Face model that is not patched takes ``loss_mask`` into its
    ``**kwargs`` and ignores it: every token would be trained, silently.
    """
    if patched_model(model) is None:
        raise ValueError(
            f"{where} carries a loss_mask but {type(model).__name__} is not patched by t3s, so "
            "its loss would ignore the mask silently; call t3s.patch(model) before training "
            "(t3s.trainer.T3STrainer does it for you)")


def mask_is_01(mask: torch.Tensor) -> bool:
    """Whether ``mask`` only keeps (1) or drops (0) tokens, so labels can carry it."""
    return mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())


def _fold(labels: torch.Tensor, mask: torch.Tensor, fold: Optional[bool], label_pad_id: int) -> None:
    """``labels[mask == 0] = label_pad_id`` (in place) when ``fold`` is True, or None (auto)
    and the mask is 0/1: then a count of ``labels != -100`` is the kept count."""
    if fold or (fold is None and mask_is_01(mask)):
        labels[mask == 0] = label_pad_id


def _where(ex: Mapping[str, Any], i: int) -> str:
    return f"example {ex['example_id']}" if "example_id" in ex else f"example at index {i}"


def _as_row(value: Any, key: str, where: str, dtype: torch.dtype) -> torch.Tensor:
    """One example's column as a 1-D tensor of ``dtype``."""
    t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"{where}: {key} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{where}: {key} must be real, got {t.dtype}")
    return t.to(dtype)


# HF's Trainer drops the dataset columns its model's forward does not name, example_id too.
_DROPPED_HINT = (" (in a Hugging Face Trainer: its column filter drops example_id; add "
                 "callbacks=[t3s.LossMaskCallback()], which keeps it, or pass "
                 "TrainingArguments(remove_unused_columns=False))")


def _loss_masks(examples: Sequence[Mapping[str, Any]], loss_masks: Optional[Mapping[int, Any]],
                lengths: Sequence[int]) -> Optional[List[torch.Tensor]]:
    """Each example's ``[L]`` loss mask, or None when no example has one.

    From ``loss_masks[example_id]`` when the mapping is given (every example
    needs an entry), else from the example's own ``loss_mask``; an example
    without one keeps all its tokens (ones). The masks are bool when all are
    bool, else float32 (0/1 integers and weights keep their values).
    """
    raw = []
    for i, ex in enumerate(examples):
        if loss_masks is not None:
            if "example_id" not in ex:
                raise ValueError(f"{_where(ex, i)} has no example_id to look up in loss_masks"
                                 f"{_DROPPED_HINT}")
            eid = int(ex["example_id"])
            if eid not in loss_masks:
                raise ValueError(f"no loss_mask for example {eid}")
            raw.append(loss_masks[eid])
        else:
            raw.append(ex.get("loss_mask"))
    if all(m is None for m in raw):
        return None
    masks = [None if m is None else (m.detach().cpu() if isinstance(m, torch.Tensor)
                                     else torch.as_tensor(m)) for m in raw]
    dtype = torch.bool if all(m is None or m.dtype == torch.bool for m in masks) else torch.float32
    out = []
    for i, (ex, m, n) in enumerate(zip(examples, masks, lengths)):
        if m is None:
            out.append(torch.ones(n, dtype=dtype))
            continue
        if m.dim() != 1 or m.numel() != n:
            raise ValueError(f"loss_mask for {_where(ex, i)} has shape {tuple(m.shape)} but labels "
                             f"have length {n}; masks must be aligned with labels")
        out.append(m.to(dtype))
    return out


def pad_token_id(tokenizer, model=None) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token, else the same two
    from ``model.config``, else 0.

    ``tokenizer`` may be a processor wrapping one (``.tokenizer``) or None; a list
    of ids (several eos tokens) gives its first. Padding is masked out (attention,
    labels), so any valid id works; the pad / eos token keeps generation tidy.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap one
    for source in (tok, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


class PaddedCollator:
    """Pads a list of examples into a batch, one example per row.

    Each example is a mapping with ``input_ids`` [L] (list or 1-D tensor) and
    optionally ``labels`` [L] (default: a copy of ``input_ids``, with
    ``label_pad_id`` where a given ``attention_mask`` is 0), ``attention_mask``
    [L] (default: ones), ``position_ids`` [L], ``loss_mask`` [L] (aligned with
    ``labels``; 1 keeps a token, 0 drops it, other values weight it) and
    ``example_id``.

    Returns [B, L'] tensors, L' the longest example rounded up to
    ``pad_to_multiple_of``: ``input_ids`` (``pad_token_id`` on padding),
    ``attention_mask`` (0 on padding), ``labels`` (``label_pad_id`` on
    padding); ``example_id`` [B] int64 when the examples have ids;
    ``position_ids`` (0 on padding) when any example has them, the others
    getting ``0..L-1``; and ``loss_mask`` (0 on padding) when masks are
    available: from ``loss_masks`` (example_id -> [L] tensor aligned with
    labels; every example needs one) when given, else from the examples' own
    ``loss_mask`` (an example without one gets ones). The mask is bool when all
    masks are bool, else float32. A mask whose length differs from its labels
    raises ValueError. Other keys of the examples are dropped, except those
    named in ``extra_keys`` (collated with ``torch.utils.data.default_collate``).
    Pop ``example_id`` before calling a model; a `t3s.patch`-ed model takes
    ``loss_mask``.

    ``padding_side="left"`` pads at the start of each row (token keys then need
    the ``attention_mask``, see `token_keys`).

    ``fold_mask_into_labels`` sets ``labels`` to ``label_pad_id`` wherever
    ``loss_mask`` is 0. The loss is unchanged (those tokens are dropped either
    way), but HF's Trainer, which derives ``num_items_in_batch`` from the labels
    alone, then counts exactly the kept tokens of a 0/1 mask, so gradient
    accumulation averages over kept tokens (T3S's 'mean'); see
    `t3s.hf.count_loss_items`. None (the default) folds when the batch's mask
    is 0/1 (bool, or only 0s and 1s) and leaves weighted masks alone: no label
    count can equal a sum of weights. `t3s.trainer.T3STrainer` counts the kept
    weight itself and turns the default off (its ``t3s/kept_fraction`` metric
    needs the labels); with a plain ``Trainer`` and weights,
    `t3s.TrajectoryCallback` corrects the normaliser (see there). True folds the
    zeros of any mask, False never folds.

    ``model``: the model the batches are for. When given, a batch with a
    ``loss_mask`` raises ValueError if the model is not `t3s.patch`-ed
    (`check_mask_reaches_loss`): an unpatched model ignores the mask silently.
    """

    def __init__(self, pad_token_id: int, *, loss_masks: Optional[Mapping[int, Any]] = None,
                 pad_to_multiple_of: Optional[int] = None, label_pad_id: int = IGNORE_INDEX,
                 padding_side: str = "right", fold_mask_into_labels: Optional[bool] = None,
                 extra_keys: Sequence[str] = (), model: Optional[torch.nn.Module] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (e.g. tokenizer.pad_token_id or eos_token_id)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.loss_masks = loss_masks
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = int(label_pad_id)
        self.padding_side = padding_side
        self.fold_mask_into_labels = fold_mask_into_labels
        self.extra_keys = tuple(extra_keys)
        self.model = model

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        ids = [_as_row(ex["input_ids"], "input_ids", _where(ex, i), torch.long)
               for i, ex in enumerate(examples)]
        lens = [x.numel() for x in ids]
        L = max(lens)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m

        def column(key, dtype, default, pad):
            out = torch.full((len(examples), L), pad, dtype=dtype)
            for i, (ex, n) in enumerate(zip(examples, lens)):
                value = ex.get(key)
                row = default(i) if value is None else _as_row(value, key, _where(ex, i), dtype)
                if row.numel() != n:
                    raise ValueError(f"{_where(ex, i)}: {key} has {row.numel()} entries but "
                                     f"input_ids has {n}")
                self._place(out, i, row)
            return out

        out = {"input_ids": column("input_ids", torch.long, None, self.pad_token_id),
               "attention_mask": column("attention_mask", torch.long,
                                        lambda i: torch.ones(lens[i], dtype=torch.long), 0)}
        labels = column("labels", torch.long, lambda i: ids[i], self.label_pad_id)
        for i, ex in enumerate(examples):  # defaulted labels: no targets where attention is 0
            if ex.get("labels") is None and ex.get("attention_mask") is not None:
                labels[i][out["attention_mask"][i] == 0] = self.label_pad_id
        out["labels"] = labels
        has_id = ["example_id" in ex for ex in examples]
        if any(has_id):
            if not all(has_id):
                raise ValueError("some examples have an example_id and some do not")
            out["example_id"] = torch.tensor([int(ex["example_id"]) for ex in examples],
                                             dtype=torch.long)
        if any(ex.get("position_ids") is not None for ex in examples):
            out["position_ids"] = column("position_ids", torch.long,
                                         lambda i: torch.arange(lens[i]), 0)
        masks = _loss_masks(examples, self.loss_masks, lens)
        if masks is not None:
            loss_mask = torch.zeros((len(examples), L), dtype=masks[0].dtype)
            for i, m in enumerate(masks):
                self._place(loss_mask, i, m)
            out["loss_mask"] = loss_mask
            if self.model is not None:
                check_mask_reaches_loss(self.model, "the PaddedCollator's batch")
            _fold(labels, loss_mask, self.fold_mask_into_labels, self.label_pad_id)
        for key in self.extra_keys:
            out[key] = torch.utils.data.default_collate([ex[key] for ex in examples])
        return out

    def _place(self, out: torch.Tensor, i: int, row: torch.Tensor) -> None:
        n = row.numel()
        if self.padding_side == "right":
            out[i, :n] = row
        else:
            out[i, out.shape[1] - n:] = row


class PackedCollator:
    """Concatenates examples into one padding-free row.

    Returns ``input_ids`` [1, N], ``labels`` [1, N], ``position_ids`` [1, N]
    (restarting at 0 for every example, which is how Hugging Face models find
    the sequence boundaries in padding-free mode), ``example_id`` [E] int64
    (one per non-empty example, in order),
    and ``loss_mask`` [1, N] when masks are available (see `PaddedCollator`).
    The first label of each example is set to ``-100`` so that no token is
    predicted across a boundary. With ``return_flash_attn_kwargs=True`` the batch
    also carries ``cu_seq_lens_q/k`` [B+1] int32 and ``max_length_q/k``.
    `packed_keys` maps every packed position back to its key.

    The batch also carries ``use_cache=False`` and no ``attention_mask``: only then
    do Hugging Face models build the block-diagonal causal mask from the restarting
    ``position_ids`` for sdpa and eager attention (transformers 5.x); with a cache
    (a model's default ``use_cache=True``) every sequence would attend to the ones
    packed before it.

    ``fold_mask_into_labels`` and ``model``: as for `PaddedCollator` (by
    default 0/1 masks are folded into the labels, so HF's Trainer counts the
    kept tokens).

    ``labels`` default to a copy of ``input_ids``, as in `PaddedCollator`. An
    example of length 0 adds no token, so it has no sequence start to key by and
    is left out of ``example_id`` (it has no target either way: a padded row of
    only padding has none); a batch of only empty examples raises ValueError. A
    length-1 example is one sequence start with no target.
    """

    def __init__(self, *, loss_masks: Optional[Mapping[int, Any]] = None,
                 return_flash_attn_kwargs: bool = False,
                 fold_mask_into_labels: Optional[bool] = None,
                 model: Optional[torch.nn.Module] = None):
        self.loss_masks = loss_masks
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.fold_mask_into_labels = fold_mask_into_labels
        self.model = model

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        ids, labs, pos = [], [], []
        for i, ex in enumerate(examples):
            if "example_id" not in ex:
                raise ValueError(f"{_where(ex, i)} has no example_id, which a packed batch needs "
                                 f"to map tokens back to examples{_DROPPED_HINT}")
            x = _as_row(ex["input_ids"], "input_ids", _where(ex, i), torch.long)
            y = (x.clone() if ex.get("labels") is None
                 else _as_row(ex["labels"], "labels", _where(ex, i), torch.long).clone())
            if x.numel() != y.numel():
                raise ValueError(f"example {ex['example_id']}: input_ids and labels must be of "
                                 "equal length")
            if x.numel():
                y[0] = IGNORE_INDEX  # nothing of the sequence before may predict it
            ids.append(x)
            labs.append(y)
            pos.append(torch.arange(x.numel(), dtype=torch.long))
        kept = [i for i, x in enumerate(ids) if x.numel()]
        if not kept:
            raise ValueError("every example of the batch is empty: nothing to pack")
        out: Dict[str, Any] = {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labs)[None],
            "position_ids": torch.cat(pos)[None],
            # one id per sequence start (position 0): empty examples have none
            "example_id": torch.tensor([int(examples[i]["example_id"]) for i in kept],
                                       dtype=torch.long),
            "use_cache": False,  # see the docstring: sequences must not see each other
        }
        masks = _loss_masks(examples, self.loss_masks, [t.numel() for t in labs])
        if masks is not None:
            lm = torch.cat(masks)
            offsets = np.cumsum([0] + [t.numel() for t in ids[:-1]])
            starts = [int(offsets[i]) for i in kept]  # empty examples start nothing
            lm[torch.as_tensor(starts, dtype=torch.long)] = 0
            out["loss_mask"] = lm[None]
            if self.model is not None:
                check_mask_reaches_loss(self.model, "the PackedCollator's batch")
            _fold(out["labels"], out["loss_mask"], self.fold_mask_into_labels, IGNORE_INDEX)
        if self.return_flash_attn_kwargs:
            lens = torch.tensor([ids[i].numel() for i in kept])
            cu = torch.zeros(len(kept) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0)
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(),
                       max_length_q=int(lens.max()), max_length_k=int(lens.max()))
        return out


def pack_indices(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Greedy in-order grouping of example indices into packs of at most
    ``max_tokens`` tokens; an example longer than ``max_tokens`` gets a pack of
    its own."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    packs: List[List[int]] = []
    cur: List[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        packs.append(cur)
    return packs
