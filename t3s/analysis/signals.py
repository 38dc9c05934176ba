"""Trajectory signals besides Δc: how each trace token's prediction changed from θ0 to θb.

`trajectory_signals` walks θ0 and θb over the same tokens (`t3s.analysis.static.token_logits`,
[chunk, V] logits at a time, never the whole batch) and gives per token:

* ``delta_conf``: Δc = log p_θb(y) − log p_θ0(y), T3S's own signal;
* ``delta_entropy``: H(p_θb) − H(p_θ0), the change in the predictive entropy;
* ``delta_logit_grad``: ‖(p_θb − e_y) ⊙ s'‖ − ‖(p_θ0 − e_y) ⊙ s'‖, the change in the
  norm of the token loss's gradient with respect to its logits (s' the softcap's
  derivative, 1 without one);
* ``kl``: KL(p_θb ‖ p_θ0) = Σ_v p_θb,v (log p_θb,v − log p_θ0,v), how far the whole
  distribution moved.

`signal_agreement` scores each against a token set (the Δc > 0 anchors): ROC AUC,
separability max(AUC, 1 − AUC), and the overlap (Jaccard) between the set and the
same number of tokens ranked first by the signal, in its better direction.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..hf.heads import lm_head
from .auc import roc_auc
from .static import sorted_by_key, token_logits

__all__ = ["TRAJECTORY_SIGNALS", "signal_agreement", "trajectory_signals"]

TRAJECTORY_SIGNALS = ("delta_conf", "delta_entropy", "delta_logit_grad", "kl")


@torch.no_grad()
def trajectory_signals(model_0: nn.Module, model_b: nn.Module,
                       examples: Sequence[Mapping[str, Any]], *, batch_size: int = 8,
                       chunk: int = 1024, pad_token_id: int = 0) -> Dict[str, np.ndarray]:
    """Per trace token of ``examples``: {"example_id" int64 [N], "position" int64 [N],
    and `TRAJECTORY_SIGNALS` float64 [N]}, sorted by (example_id, position).

    Both models are in memory at once (eval mode, restored after); their
    vocabularies must match.
    """
    if not examples:
        raise ValueError("no examples")
    heads = (lm_head(model_0), lm_head(model_b))
    if heads[0].vocab_size != heads[1].vocab_size:
        raise ValueError(f"θ0 and θb have different vocabularies ({heads[0].vocab_size} and "
                         f"{heads[1].vocab_size})")
    modes = [m.training for m in (model_0, model_b)]
    model_0.eval()
    model_b.eval()
    out: Dict[str, list] = {k: [] for k in ("example_id", "position", *TRAJECTORY_SIGNALS)}
    try:
        walks = [token_logits(m, examples, batch_size=batch_size, chunk=chunk,
                              pad_token_id=pad_token_id, head=h)
                 for m, h in zip((model_0, model_b), heads)]
        for t0, tb in zip(*walks):
            y = t0["target"]
            logp0 = torch.log_softmax(t0["logits"], dim=-1)
            logpb = torch.log_softmax(tb["logits"].to(logp0.device), dim=-1)
            p0, pb = logp0.exp(), logpb.exp()
            onehot = torch.nn.functional.one_hot(y, logp0.shape[-1]).float()
            grad0 = ((p0 - onehot) * t0["softcap_grad"]).norm(dim=-1)
            gradb = ((pb - onehot) * tb["softcap_grad"].to(pb.device)).norm(dim=-1)
            out["delta_conf"].append((logpb.gather(1, y[:, None]) -
                                      logp0.gather(1, y[:, None]))[:, 0].double().cpu())
            out["delta_entropy"].append(((p0 * logp0).sum(-1) - (pb * logpb).sum(-1))
                                        .double().cpu())
            out["delta_logit_grad"].append((gradb - grad0).double().cpu())
            out["kl"].append((pb * (logpb - logp0)).sum(-1).clamp_min(0).double().cpu())
            out["example_id"].append(t0["example_id"])
            out["position"].append(t0["position"])
    finally:
        for m, mode in zip((model_0, model_b), modes):
            m.train(mode)
    return sorted_by_key(out)


def signal_agreement(signals: Mapping[str, np.ndarray], member: np.ndarray,
                     names: Sequence[str] = TRAJECTORY_SIGNALS) -> Dict[str, Dict[str, Any]]:
    """{signal: {"auc", "separability", "overlap", "direction"}} against ``member`` [N] bool.

    ``overlap``: the Jaccard index of the set and the ``member.sum()`` tokens the
    signal ranks first in its better direction (``direction`` "high" when AUC >= 0.5,
    else "low"); None when the set or its complement is empty.
    """
    member = np.asarray(member, dtype=bool)
    k = int(member.sum())
    out = {}
    for name in names:
        values = np.asarray(signals[name], dtype=np.float64)
        auc = roc_auc(values, member)
        high = auc >= 0.5
        overlap = None
        if 0 < k < member.size:
            order = np.argsort(-values if high else values, kind="stable")
            top = np.zeros(member.size, dtype=bool)
            top[order[:k]] = True
            overlap = float((top & member).sum() / (top | member).sum())
        out[name] = {"auc": auc, "separability": max(auc, 1.0 - auc), "overlap": overlap,
                     "direction": "high" if high else "low"}
    return out
