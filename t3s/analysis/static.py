"""Static signals: what one model alone says about each trace token, and how well that
recovers a token set (the anchors).

`static_signals` runs the model forward (no gradients) over the examples and
gives, per trace token t with label y and logits z (after the model's logit map,
`t3s.LMHead`):

* ``confidence``: log p(y) (the c_t(θ0) of Δc when the model is θ0);
* ``entropy``: −Σ_v p_v log p_v of the predictive distribution;
* ``grad_norm``: ‖∂ℓ_t/∂W‖ of the token's loss ℓ_t = −log p(y) with respect to the
  output head's weight W [V, H], which is exactly ‖(p − e_y) ⊙ z'‖ · ‖h‖ (z' the
  derivative of the softcap, 1 without one; h the head's input, times the logit
  scale).

Logits are formed for ``chunk`` tokens at a time ([chunk, V] float32), never for
the whole batch. `static_auc` scores each signal against a token set with
`t3s.analysis.auc.roc_auc`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..hf.heads import last_hidden_state, lm_head
from .auc import roc_auc
from .groups import IGNORE_INDEX

__all__ = ["SIGNALS", "static_signals", "static_auc", "member_of", "sorted_by_key", "token_logits"]

#: the static signals, in the order of the outputs
SIGNALS = ("confidence", "entropy", "grad_norm")


def _pad(chunk, pad_token_id: int):
    length = max(len(ex["labels"]) for ex in chunk)
    ids = torch.full((len(chunk), length), int(pad_token_id), dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, ex in enumerate(chunk):
        lab = torch.as_tensor(ex["labels"]).reshape(-1).long()
        ids[i, :lab.numel()] = torch.as_tensor(ex["input_ids"]).reshape(-1).long()
        attn[i, :lab.numel()] = 1
        labels[i, :lab.numel()] = lab
    return ids, attn, labels


def token_logits(model: nn.Module, examples: Sequence[Mapping[str, Any]], *,
                 batch_size: int = 8, chunk: int = 1024, pad_token_id: int = 0,
                 head=None) -> Iterator[Dict[str, torch.Tensor]]:
    """The logits of every trace token of ``examples``, ``chunk`` tokens at a time.

    Yields {"example_id" [n], "position" [n] (index into the labels), "target" [n],
    "hidden" [n, H] (the head's input times the logit scale, float32), "logits"
    [n, V] (after the model's logit map, float32), "softcap_grad" [n, V] (the
    softcap's derivative; ones without one)}. Call under ``torch.no_grad()`` with
    the model in eval mode. ``head``: the model's `t3s.LMHead` (measured when None).
    Two models walked with the same arguments yield the same tokens in the same order.
    """
    head = lm_head(model) if head is None else head
    weight, bias = head.tensors()
    device = weight.device
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start:start + batch_size])
        ids, attn, labels = _pad(batch, pad_token_id)
        hidden = last_hidden_state(model, ids.to(device), attn.to(device))[:, :-1]
        targets = labels[:, 1:]
        rows, cols = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
        h = hidden[rows.to(device), cols.to(device)].float() * head.logit_scale
        y = targets[rows, cols].to(device)
        eids = torch.tensor([int(ex["example_id"]) for ex in batch])[rows]
        for s in range(0, h.shape[0], chunk):
            hs = h[s:s + chunk]
            z = hs @ weight.float().T
            if bias is not None:
                z = z + bias.float() * head.logit_scale
            dcap = torch.ones_like(z)
            if head.softcap is not None:
                t = torch.tanh(z / head.softcap)
                z, dcap = head.softcap * t, 1 - t * t
            yield {"example_id": eids[s:s + chunk], "position": (cols + 1)[s:s + chunk],
                   "target": y[s:s + chunk], "hidden": hs, "logits": z, "softcap_grad": dcap}


@torch.no_grad()
def static_signals(model: nn.Module, examples: Sequence[Mapping[str, Any]], *,
                   batch_size: int = 8, chunk: int = 1024, pad_token_id: int = 0,
                   ) -> Dict[str, np.ndarray]:
    """Per trace token of ``examples``: {"example_id" int64 [N], "position" int64 [N]
    (index into the example's labels), "confidence", "entropy", "grad_norm" float64
    [N]}, sorted by (example_id, position)."""
    if not examples:
        raise ValueError("no examples")
    was_training = model.training
    model.eval()
    out: Dict[str, list] = {k: [] for k in ("example_id", "position", *SIGNALS)}
    try:
        for tk in token_logits(model, examples, batch_size=batch_size, chunk=chunk,
                               pad_token_id=pad_token_id):
            z, ys = tk["logits"], tk["target"]
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            onehot = torch.nn.functional.one_hot(ys, z.shape[-1]).float()
            out["confidence"].append(logp.gather(1, ys[:, None])[:, 0].double().cpu())
            out["entropy"].append((-(p * logp).sum(-1)).double().cpu())
            gz = ((p - onehot) * tk["softcap_grad"]).norm(dim=-1)
            out["grad_norm"].append((gz * tk["hidden"].norm(dim=-1)).double().cpu())
            out["example_id"].append(tk["example_id"])
            out["position"].append(tk["position"])
    finally:
        model.train(was_training)
    return sorted_by_key(out)


def sorted_by_key(out: Mapping[str, list]) -> Dict[str, np.ndarray]:
    """Concatenated per-chunk lists, sorted by (example_id, position)."""
    res = {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in out.items()}
    order = np.lexsort((res["position"], res["example_id"]))
    return {k: v[order] for k, v in res.items()}


def static_auc(signals: Mapping[str, np.ndarray], member: np.ndarray,
               names: Sequence[str] = SIGNALS) -> Dict[str, Dict[str, float]]:
    """{signal: {"auc": AUC of the signal (higher = in the set), "separability":
    max(AUC, 1 − AUC)}} against ``member`` [N] bool (aligned with ``signals``)."""
    out = {}
    for name in names:
        auc = roc_auc(signals[name], member)
        out[name] = {"auc": auc, "separability": max(auc, 1.0 - auc)}
    return out


def member_of(signals: Mapping[str, np.ndarray], groups_mask: Mapping[int, torch.Tensor],
              ) -> np.ndarray:
    """bool [N]: whether each token of ``signals`` is in the group given by per-example
    masks (example_id -> bool [L] aligned with labels)."""
    eids, pos = signals["example_id"], signals["position"]
    out = np.zeros(eids.size, dtype=bool)
    for eid in np.unique(eids):
        sel = np.flatnonzero(eids == eid)
        m = torch.as_tensor(groups_mask[int(eid)]).reshape(-1).numpy()
        out[sel] = m[pos[sel]]
    return out

