"""The selection rules by name: `RULES` and `apply_rule`, for re-applying a rule to a
stored table (an artifact's columns) with the rule's parameters.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from ..data import TokenTable
from .rules import (SIGNAL_COLUMNS, anchor_mask, entropy_change_mask, forced_mask, full_mask,
                    inverse_anchor_mask, kl_mask, logit_grad_change_mask, prob_threshold_mask,
                    random_mask, rho1_mask, static_confidence_mask)

__all__ = ["RULES", "apply_rule"]


def _need_columns(rule: str, t: TokenTable, *names: str) -> None:
    """ValueError naming the first of ``names`` that the table lacks."""
    for name in names:
        if name not in t:
            raise ValueError(f"rule {rule!r} needs a {name!r} column; columns: {t.names}")


def _rule_rho1(t: TokenTable, *, keep_fraction: float, batch=None, **kw) -> TokenTable:
    _need_columns("rho1", t, "loss_theta", "loss_ref")
    return rho1_mask(t.select("loss_theta"), t.select("loss_ref"), keep_fraction, batch=batch, **kw)


def _rule_static(t: TokenTable, *, fraction: float = 0.2, which: str = "top",
                 column: str = "c0") -> TokenTable:
    return static_confidence_mask(t, fraction, which, column=column)


def _rule_signal(rule: str, mask_fn) -> Callable[..., TokenTable]:
    """A `RULES` entry reading the column ``SIGNAL_COLUMNS[rule]`` with ``mask_fn``."""
    def apply(t: TokenTable, **params) -> TokenTable:
        _need_columns(rule, t, SIGNAL_COLUMNS[rule])
        return mask_fn(t, column=SIGNAL_COLUMNS[rule], **params)
    return apply


def _rule_kl(t: TokenTable, *, fraction: Optional[float] = None,
             budget: Optional[int] = None) -> TokenTable:
    if fraction is None and budget is None:
        fraction = 0.2   # the static rule's default share *(choice)*
    return _rule_signal("kl", kl_mask)(t, fraction=fraction, budget=budget)


def _rule_prob(t: TokenTable, *, threshold, direction: str = "higher", column: str = "c0") -> TokenTable:
    return prob_threshold_mask(t, threshold, direction, column=column)


#: rule name -> function(table, **params) -> mask table. The table holds the stored
#: columns (``delta``, and ``c0``/``cb``, ``loss_theta``/``loss_ref`` or the
#: `SIGNAL_COLUMNS` when present); a rule missing its column raises ValueError.
RULES: Dict[str, Callable[..., TokenTable]] = {
    "anchor": lambda t, threshold=0.0: anchor_mask(t, threshold=threshold, column="delta"),
    "inverse_anchor": lambda t, threshold=0.0: inverse_anchor_mask(t, threshold=threshold, column="delta"),
    "sft": lambda t: full_mask(t),
    "random": lambda t, **kw: random_mask(t, **kw),
    "static": _rule_static,
    "prob_threshold": _rule_prob,
    "rho1": _rule_rho1,
    "entropy": _rule_signal("entropy", entropy_change_mask),
    "logit_grad": _rule_signal("logit_grad", logit_grad_change_mask),
    "kl": _rule_kl,
    "forced": lambda t, tau=0.2: forced_mask(t, tau, column="delta"),
}


def apply_rule(rule: str, table: TokenTable, **params) -> TokenTable:
    """Apply the rule named ``rule`` (a key of `RULES`) with ``params`` to ``table``.

    Returns the rule's output table (``loss_mask``, or ``forced`` for ``"forced"``).
    ``"random"`` with ``like="anchor"`` (or another rule name) draws the same
    budget as that rule would keep with default parameters.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")
    if rule == "random" and isinstance(params.get("like"), str):
        params = dict(params)
        params["like"] = apply_rule(params["like"], table)
    try:
        return RULES[rule](table, **params)
    except TypeError as e:
        raise ValueError(f"bad parameters for rule {rule!r}: {e}") from None
