"""Exact confidences: c_t(theta) = log p_theta(y_t | y_<t, x) by a forward-only pass.

`profile` runs a Hugging Face ``*ForCausalLM`` (anything with
``get_output_embeddings()``) over the data at one checkpoint, and computes each
response token's log-prob with `t3s_kernels.target_logprobs` on the last hidden
state and the lm_head weight: the N x V logits are never materialised. The
hidden states and the logit map come from `t3s.hf.heads` (`last_hidden_state`,
`lm_head`), the same description `t3s.patch` trains with. The result is a
per-token table in the trajectory-store schema of `t3s.trajectory.shards` (step,
example_id, position, logprob), written to a store (resumable) or returned.

`t3s.delta` turns such tables (and the training trajectory) into Δc.

Token keys follow the shared convention: (example_id, position) with position
the index of the target token in the example's input_ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from t3s_kernels import target_logprobs

from ._util import to_numpy
from .data.keys import batch_positions, token_keys
from .hf.heads import LMHead, last_hidden_state, lm_head
from .trajectory.queries import first_visit
from .trajectory.manifest import MANIFEST_NAME
from .trajectory.reader import TrajectoryReader
from .trajectory.shards import PathLike, trajectory_schema
from .trajectory.writer import TrajectoryWriter

__all__ = ["profile"]

Example = Tuple[int, np.ndarray, np.ndarray]  # (example_id, input_ids [L], labels [L])


# --------------------------------------------------------------------------- model access
def _logprobs(model, head: LMHead, weight, bias, input_ids, attention_mask, labels, *,
              want_entropy, ignore_index, backend, position_ids=None):
    """log p(labels[:, i+1]) from hidden[:, i]: float32 [B, T-1] (+ entropy).

    weight [V, H], bias [V] or None: ``head.tensors(gather=True)``, read once per profile.
    position_ids [1, T] restarting at 0 per sequence: a packed row (no attention_mask).
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}
    hidden = last_hidden_state(model, input_ids, attention_mask, **extra)[:, :-1]
    if hidden.device != weight.device:
        hidden = hidden.to(weight.device)
    if head.logit_scale != 1.0:
        hidden = hidden * head.logit_scale
        bias = None if bias is None else bias * head.logit_scale
    targets = labels[:, 1:].to(weight.device)
    out = target_logprobs(hidden, weight, targets, bias=bias, softcap=head.softcap,
                          return_entropy=want_entropy, ignore_index=ignore_index,
                          backend=backend)
    if want_entropy:
        return out.logprobs, out.entropy
    return out, None


def _verify(model, head: LMHead, weight, bias, ids: np.ndarray, *, n_tokens: int,
            atol: float, backend) -> float:
    """Max |ours - log_softmax(model logits)| on a prefix; ValueError above atol."""
    length = min(len(ids), n_tokens)
    if length < 2:
        return 0.0
    device = _input_device(model)
    x = torch.as_tensor(ids[:length], dtype=torch.long, device=device)[None]
    logits = model(input_ids=x, use_cache=False).logits.float()
    ref = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, x[0, 1:, None].to(logits.device))
    ours, _ = _logprobs(model, head, weight, bias, x, None, x, want_entropy=False,
                        ignore_index=-100, backend=backend)
    err = float((ours[0].to(ref.device) - ref[:, 0]).abs().max())
    if not err <= atol:
        raise ValueError(
            f"profile: log-probs from the last hidden state and lm_head differ from the model's "
            f"own logits by {err:.3g} (> {atol:g}). {type(model).__name__} transforms its "
            "logits in a way t3s does not know; pass verify=False to skip this check")
    return err


def _input_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------- data
def _is_batch(item: Mapping) -> bool:
    x = item["input_ids"]
    ndim = x.dim() if isinstance(x, torch.Tensor) else np.ndim(x)
    return ndim == 2


def _unpack_batch(batch: Mapping) -> List[Example]:
    """Split a padded or packed batch into its examples (padding removed).

    The layouts are those of `t3s.data.token_keys`, read by the same parser
    (`t3s.data.batch_positions`).
    """
    ids, labels = np.atleast_2d(to_numpy(batch["input_ids"])), np.atleast_2d(to_numpy(batch["labels"]))
    if labels.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and labels {labels.shape} differ in shape")
    eids = batch["example_ids"] if "example_ids" in batch else batch["example_id"]
    seq, _, am, eids = batch_positions(ids.shape, eids, batch.get("position_ids"),
                                        batch.get("attention_mask"))
    keep = seq >= 0 if am is None else (seq >= 0) & am
    seq, ids, labels = seq[keep], ids[keep], labels[keep]  # row-major: seq is non-decreasing
    bounds = np.searchsorted(seq, np.arange(len(eids) + 1))
    return [(int(eid), ids[a:b], labels[a:b]) for eid, a, b in zip(eids, bounds[:-1], bounds[1:])]


def _iter_examples(data: Iterable) -> Iterator[Example]:
    for item in data:
        if not isinstance(item, Mapping):
            raise TypeError(f"profile expects dict-like examples or batches, got {type(item)}")
        if "labels" not in item:
            raise ValueError("each example / batch needs 'labels' (Hugging Face convention: "
                             "-100 outside the response)")
        if _is_batch(item):
            yield from _unpack_batch(item)
        else:
            if "example_id" not in item:
                raise ValueError("each example needs an 'example_id'")
            ids, lab = to_numpy(item["input_ids"]).reshape(-1), to_numpy(item["labels"]).reshape(-1)
            if ids.shape != lab.shape:
                raise ValueError(f"input_ids {ids.shape} and labels {lab.shape} differ in length")
            yield int(item["example_id"]), ids, lab


def _batches(examples: List[Example], batch_size: int, max_tokens: Optional[int],
             packed: bool = False) -> Iterator[List[Example]]:
    """Longest first; at most batch_size examples and (if set) max_tokens tokens: padded
    ones (rows x longest), or the sum of the lengths when ``packed``."""
    examples = sorted(examples, key=lambda e: -len(e[1]))
    batch: List[Example] = []
    for ex in examples:
        if packed:
            tokens = sum(len(e[1]) for e in batch) + len(ex[1])
        else:
            tokens = max([len(e[1]) for e in batch] + [len(ex[1])]) * (len(batch) + 1)
        if batch and (len(batch) >= batch_size
                      or (max_tokens is not None and tokens > max_tokens)):
            yield batch
            batch = []
        batch.append(ex)
    if batch:
        yield batch


def _collate(batch: List[Example], pad_token_id: int, ignore_index: int):
    width = max(len(e[1]) for e in batch)
    ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    lab = np.full((len(batch), width), ignore_index, dtype=np.int64)
    am = np.zeros((len(batch), width), dtype=np.int64)
    for r, (_, x, y) in enumerate(batch):
        ids[r, :len(x)], lab[r, :len(y)], am[r, :len(x)] = x, y, 1
    eids = np.array([e[0] for e in batch], dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(lab), torch.from_numpy(am), eids


def _collate_packed(batch: List[Example]):
    """One padding-free row: (input_ids [1, N], labels [1, N], position_ids [1, N]
    restarting at 0 per example, example ids [E] of the non-empty examples), or None
    when every example is empty. Targets never cross a boundary: `token_keys` reads
    the sequences off the positions."""
    batch = [e for e in batch if len(e[1])]
    if not batch:
        return None
    ids = torch.from_numpy(np.concatenate([e[1] for e in batch]).astype(np.int64))[None]
    lab = torch.from_numpy(np.concatenate([e[2] for e in batch]).astype(np.int64))[None]
    pos = torch.cat([torch.arange(len(e[1])) for e in batch])[None]
    return ids, lab, pos, np.array([e[0] for e in batch], dtype=np.int64)


# --------------------------------------------------------------------------- profile
@torch.no_grad()
def profile(
    model,
    data: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    store_dir: Optional[PathLike] = None,
    dataset_fingerprint: Optional[str] = None,
    tokenizer_fingerprint: str = "",
    model_id: str = "",
    step: int = 0,
    rank: Optional[int] = None,
    resume: bool = True,
    return_entropy: bool = False,
    ignore_index: int = -100,
    pad_token_id: Optional[int] = None,
    sort_window: int = 64,
    verify: bool = True,
    verify_atol: Optional[float] = None,
    backend: Optional[str] = None,
    progress: bool = True,
    fsync: bool = False,
    split_across_ranks: bool = False,
    packing: bool = False,
) -> pa.Table:
    """Forward-only pass computing c_t = log p(y_t) for every response token.

    Args:
        model: a causal LM (Hugging Face ``*ForCausalLM``) at the checkpoint to
            profile. It is put in eval mode for the pass (and restored).
        data: an iterable of examples ``{"example_id", "input_ids" [L],
            "labels" [L]}`` (labels -100 outside the response), or of batches
            ``{"input_ids" [B, T], "labels", "example_ids", optional
            "attention_mask", "position_ids"}``. Batches are split into their
            examples (packed ones by ``position_ids``) and re-batched (right
            padding, or one packed row with ``packing``), so a caller's packing
            never lets sequences attend to each other.
        batch_size: examples per forward pass. max_tokens: also cap
            rows x padded length (the summed lengths with ``packing``) per pass.
        store_dir: write the rows to this trajectory store (rank shard `rank`),
            one record per forward pass. Then `dataset_fingerprint` is required.
        tokenizer_fingerprint, model_id: recorded in a new store's manifest.
        step: the value of the ``step`` column (e.g. 0 for theta_0, b for
            theta_b); one store can hold several checkpoints.
        resume: skip examples that already have rows at `step` in the store
            (any rank). False profiles everything again and appends; the new
            rows then win over the old ones in the returned table and in the
            store's queries (the row written last wins at equal steps).
        return_entropy: also compute the entropy column (the store then has an
            ``entropy`` extra column).
        pad_token_id: id used for padding (default: the config's, else 0; its
            value does not matter as padding is masked).
        sort_window: examples are read in windows of sort_window x batch_size
            and sorted by length within each, to limit padding.
        verify: measure the model's logit map (scale, softcap) with one probe
            forward of 8 tokens (`t3s.hf.heads.lm_head`, as `t3s.patch` does), and
            check once, on a prefix of the first example, that the result equals
            ``log_softmax(model(input_ids).logits)`` (within `verify_atol`: 1e-3
            for float32 models, 0.25 otherwise). False: take the logit map from
            the config (``final_logit_softcapping``, ``logit_scale``,
            ``logits_scaling``) and check nothing.
        backend: kernel backend for `t3s_kernels.target_logprobs`.
        progress: show a tqdm bar. fsync: passed to the store writer.
        packing: run each batch as one padding-free row ([1, N], ``position_ids``
            restarting at 0 per example, no attention mask), which the model's
            attention must keep apart (`t3s.hf.packing.packing_support` checks a
            model; flash_attention_2 and transformers' sdpa / eager masks do). The
            log-probs equal the padded pass's within floating-point rounding.
            max_tokens then caps the sum of the lengths.
        split_across_ranks: under ``torch.distributed`` with more than one
            rank, each rank profiles its share of the examples
            (`t3s.dist.rank_share` of the iteration order) into its own shard
            (`rank` is then the process's rank) and every rank returns the
            whole table: each token key is computed and written exactly once.
            Every rank must call this together, on the same data, with an
            unsharded model (a sharded one runs each forward collectively:
            use the default, every rank on every example).

    Returns:
        A pyarrow table (step, example_id, position, logprob[, entropy]) with one
        row per profiled token at `step`, sorted by key. With a store, it holds
        every token at `step` in the store, including those of earlier runs.

    Under FSDP every rank must call this together (the lm_head weight is
    gathered once; each forward pass is collective) and should receive the
    same number of batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from . import dist
    split = bool(split_across_ranks) and dist.world_size() > 1
    if split:
        if dist.is_sharded(model):
            raise ValueError("split_across_ranks needs an unsharded model (each rank runs its own "
                             "examples); a sharded (FSDP) model must see every example on every "
                             "rank: pass split_across_ranks=False")
        if rank is not None and int(rank) != dist.rank():
            raise ValueError(f"split_across_ranks writes this process's shard (rank "
                             f"{dist.rank()}), not rank={rank}")
        rank = dist.rank()
        everything = list(_iter_examples(data))
        data = [everything[i] for i in dist.rank_share(len(everything))]
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    # The logit map is measured (or read from the config) and the head gathered once per call.
    head = lm_head(model, verify=verify)
    weight, bias = head.tensors(gather=True)
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    extra = ("entropy",) if return_entropy else ()
    schema = trajectory_schema(extra)
    writer = done = None
    if store_dir is not None:
        if not dataset_fingerprint:
            raise ValueError("dataset_fingerprint is required when writing to a store")
        done = np.zeros(0, dtype=np.int64)
        if resume and (Path(store_dir) / MANIFEST_NAME).is_file():
            table = TrajectoryReader(store_dir, dataset_fingerprint=dataset_fingerprint,
                                     tokenizer_fingerprint=tokenizer_fingerprint).read()
            at_step = table.filter(pc.equal(table["step"], pa.scalar(step, pa.int32())))
            done = np.unique(at_step.column("example_id").to_numpy())
        if split:
            dist.barrier()  # every rank has read the store before any rank appends to it
        writer = TrajectoryWriter(
            store_dir, dataset_fingerprint=dataset_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint, model_id=model_id, rank=rank,
            extra_columns=extra, fsync=fsync, mode="append", metadata={"kind": "exact"})
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else int(pad_token_id)

    device = _input_device(model)
    if verify_atol is None:
        verify_atol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 0.25
    total = len(data) if hasattr(data, "__len__") else None
    examples = iter(data) if split else _iter_examples(data)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="ex", desc=f"profile step {step}",
                   disable=not progress or not dist.is_main())
    except ImportError:  # pragma: no cover
        bar = None
    results: List[pa.RecordBatch] = []
    was_training = model.training
    model.eval()
    verified = not verify
    try:
        for todo in _windows(examples, max(1, sort_window) * batch_size):
            if done is not None and done.size:
                skip = np.isin([e[0] for e in todo], done)
                if bar is not None:
                    bar.update(int(skip.sum()))
                todo = [e for e, s in zip(todo, skip) if not s]
            for batch in _batches(todo, batch_size, max_tokens, packing):
                if not verified:
                    _verify(model, head, weight, bias, batch[0][1], n_tokens=32,
                            atol=verify_atol, backend=backend)
                    verified = True
                if packing:
                    packed = _collate_packed(batch)
                    if packed is None:   # only empty examples: no token to profile
                        if bar is not None:
                            bar.update(len(batch))
                        continue
                    ids, lab, pid, eids = packed
                    am = None
                else:
                    ids, lab, am, eids = _collate(batch, pad_token_id, ignore_index)
                    pid = None
                lp, ent = _logprobs(model, head, weight, bias, ids.to(device),
                                    None if am is None else am.to(device), lab,
                                    want_entropy=return_entropy, ignore_index=ignore_index,
                                    backend=backend,
                                    position_ids=None if pid is None else pid.to(device))
                rows, cols, key_eid, key_pos = token_keys(lab, eids, attention_mask=am,
                                                          position_ids=pid,
                                                          ignore_index=ignore_index)
                lp = lp.cpu().numpy()[rows, cols]
                cols_extra = {"entropy": ent.cpu().numpy()[rows, cols]} if return_entropy else {}
                if writer is not None:
                    writer.append(step, key_eid, key_pos, lp, **cols_extra)
                else:
                    results.append(pa.record_batch(
                        [pa.array(np.full(len(lp), step, np.int32)), pa.array(key_eid),
                         pa.array(key_pos), pa.array(lp.astype(np.float32))]
                        + [pa.array(v.astype(np.float32)) for v in cols_extra.values()],
                        schema=schema))
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if split:
        dist.barrier()  # every shard is sealed before any rank reads the store
    if writer is not None:
        table = TrajectoryReader(store_dir, dataset_fingerprint=dataset_fingerprint).read()
        table = table.filter(pc.equal(table["step"], pa.scalar(step, pa.int32())))
    else:
        parts = dist.gather_objects(results) if split else [results]
        table = pa.Table.from_batches([b for part in parts for b in part], schema=schema)
    return first_visit(table)


def _windows(it: Iterator[Example], size: int) -> Iterator[List[Example]]:
    """The examples in lists of `size` (the last one shorter)."""
    window: List[Example] = []
    for ex in it:
        window.append(ex)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
