"""TRL: `T3STrainerMixin` on ``trl.SFTTrainer`` (`sft_trainer_class`, ``T3SSFTTrainer``), and
`trl_dataset`, which carries a selection into a plain ``trl.SFTTrainer``.

The class is built on first use, so that importing `t3s.trainer` does not
import TRL (an optional dependency).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from ..artifact import SelectionArtifact
from ..data.collate import mask_is_01
from ..data.table import IGNORE_INDEX
from .mixin import T3STrainerMixin

__all__ = ["sft_trainer_class", "trl_dataset"]

# The class, once built: every call returns the same class object (isinstance checks,
# pickling by qualified name).
_SFT_CLASS = None


def sft_trainer_class():
    """``T3SSFTTrainer``: `T3STrainerMixin` on ``trl.SFTTrainer`` (built on first use).

    The t3s mixin's `compute_loss` replaces SFTTrainer's (TRL's own fused head
    stays installed but unused for the loss); it logs `METRICS`, which include
    TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``. ``loss_type``
    'nll' or 'dft' (DFT: the kernels' ``token_scaling``, composed with the loss
    masks). Datasets that
    are not ``datasets.Dataset`` (a `t3s.TraceDataset`, a list of example
    dicts) are converted with ``datasets.Dataset.from_list``, as TRL requires.
    When the training data is already tokenized (examples carry
    ``input_ids``), TRL's dataset preparation is skipped
    (``dataset_kwargs={"skip_prepare_dataset": True}`` is set): it would
    truncate ``input_ids`` and ``labels`` but not ``loss_mask``, and TRL's
    packing would lose ``example_id``. Loss masks and trajectory keys need a
    t3s collator (the default when ``data_collator`` is None); for
    padding-free batches pass ``data_collator=t3s.PackedCollator()``.

    Raises ImportError (with the install command) when trl is missing.
    """
    global _SFT_CLASS
    if _SFT_CLASS is not None:
        return _SFT_CLASS
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError("T3SSFTTrainer needs TRL: pip install trl") from exc

    class T3SSFTTrainer(T3STrainerMixin, SFTTrainer):
        __doc__ = sft_trainer_class.__doc__

        def __init__(self, model=None, args=None, data_collator=None, train_dataset=None,
                     eval_dataset=None, processing_class=None, **kwargs):
            train_dataset = _as_hf_dataset(train_dataset)
            if isinstance(eval_dataset, Mapping):
                eval_dataset = {k: _as_hf_dataset(v) for k, v in eval_dataset.items()}
            else:
                eval_dataset = _as_hf_dataset(eval_dataset)
            if hasattr(args, "dataset_kwargs") and _is_tokenized(train_dataset):
                dk = dict(getattr(args, "dataset_kwargs", None) or {})
                if not dk.get("skip_prepare_dataset"):
                    dk["skip_prepare_dataset"] = True
                    args.dataset_kwargs = dk
            super().__init__(model=model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)
            if getattr(self.args, "loss_type", "nll") not in ("nll", "dft"):
                raise ValueError(f"loss_type={self.args.loss_type!r} is not supported by t3s's "
                                 "fused loss; use 'nll' or 'dft' (token_scaling in the kernel)")

    T3SSFTTrainer.__module__ = __name__.rpartition(".")[0]  # t3s.trainer, where users import it
    T3SSFTTrainer.__qualname__ = "T3SSFTTrainer"
    _SFT_CLASS = T3SSFTTrainer
    return T3SSFTTrainer


def _as_hf_dataset(dataset):
    """A ``datasets.Dataset`` for TRL: t3s datasets and lists of example dicts are converted
    (tensors become lists); ``datasets`` objects and None pass through."""
    if dataset is None:
        return None
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - trl depends on datasets
        raise ImportError("T3SSFTTrainer needs datasets: pip install datasets") from exc
    if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return dataset  # let TRL say what it accepts

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return value

    return datasets.Dataset.from_list([{k: plain(v) for k, v in dataset[i].items()}
                                       for i in range(len(dataset))])


def _is_tokenized(dataset) -> bool:
    if dataset is None:
        return False
    names = getattr(dataset, "column_names", None)
    if isinstance(names, (list, tuple)):
        return "input_ids" in names
    try:
        first = dataset[0]
    except Exception:  # iterable datasets, custom containers
        return False
    return isinstance(first, Mapping) and "input_ids" in first


def trl_dataset(examples: Iterable[Mapping[str, Any]],
                selection: Union[SelectionArtifact, str, os.PathLike, Mapping[int, torch.Tensor],
                                 None] = None, *, tokenizer=None):
    """A tokenized ``datasets.Dataset`` on which a plain ``trl.SFTTrainer`` trains T3S's objective.

    The selection's dropped tokens (the anchors) become -100 labels, so TRL's
    own loss (on t3s's kernels after ``t3s.patch(model)``) leaves them out,
    exactly as ``T3SSFTTrainer`` with the same loss masks does: same tokens,
    same normaliser (the count of kept labelled tokens).

    Args:
        examples: t3s examples (`t3s.TraceDataset`, or dicts with ``input_ids`` [L],
            ``labels`` [L] and ``example_id``).
        selection: a `t3s.SelectionArtifact`, the path of its Parquet file, or
            example_id -> loss mask [L] aligned with
            ``labels``. None keeps every labelled token. Only 0/1 masks fold into
            labels; float weights need ``T3SSFTTrainer`` (ValueError).
        tokenizer: checked against the artifact's tokenizer signature when given.

    Returns:
        ``datasets.Dataset`` with ``input_ids``, ``labels`` and ``example_id``
        (for `t3s.TrajectoryCallback`; TRL's collator ignores it). TRL uses the
        labels as they are, so the prompt stays masked as in the examples.
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - trl depends on datasets
        raise ImportError("trl_dataset needs datasets: pip install datasets") from exc
    examples = list(examples)
    masks = _selection_masks(selection, examples, tokenizer)
    rows = []
    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"]).long()
        labels = torch.as_tensor(ex["labels"]).long().clone()
        eid = int(ex["example_id"])
        mask = masks.get(eid) if masks is not None else None
        if masks is not None and mask is None:
            raise ValueError(f"the selection has no mask for example_id {eid}")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.shape != labels.shape:
                raise ValueError(f"the mask of example {eid} has shape {tuple(mask.shape)} but its "
                                 f"labels have shape {tuple(labels.shape)}")
            if not mask_is_01(mask):
                raise ValueError(
                    f"the mask of example {eid} holds weights other than 0 and 1, which labels "
                    "cannot carry; train with t3s.trainer.T3SSFTTrainer and the masks as "
                    "loss_masks of t3s.PaddedCollator")
            labels[mask == 0] = IGNORE_INDEX
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "example_id": eid})
    return datasets.Dataset.from_list(rows)


def _selection_masks(selection, examples, tokenizer) -> Optional[Mapping[int, torch.Tensor]]:
    if selection is None:
        return None
    if isinstance(selection, Mapping):
        return selection
    if not isinstance(selection, SelectionArtifact):
        selection = SelectionArtifact.load(os.fspath(selection))
    if tokenizer is not None:
        selection.check(tokenizer=tokenizer)
    return selection.loss_masks(examples)
