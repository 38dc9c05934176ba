"""The rule, baseline and arm settings: rule names made canonical (`canonical_rule`),
the baselines that are an objective rather than a mask (`BASELINE_OBJECTIVES`), the
parameters `t3s.selection.apply_rule` gets (`rule_params`, `arm_params`) and their
check before any training (`check_rule_params`); a stage's ``*_params`` over its
defaults (`params_over_defaults`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ..._util import one_line
from .options import UsageError

__all__ = ["RULE_ALIASES", "BASELINE_OBJECTIVES", "canonical_rule", "params_over_defaults",
           "mask_rule", "baseline_loss_options", "rule_params", "arm_params",
           "check_rule_params"]

RULE_ALIASES = {"inverse": "inverse_anchor", "prob": "prob_threshold"}
# Baselines that are an objective rather than a mask: (the mask rule they train with, the
# `t3s.patch` loss options). dft: every trace token, each loss times stopgrad p(y_t).
BASELINE_OBJECTIVES = {"dft": ("sft", {"token_scaling": True})}


def canonical_rule(name: Optional[str], what: str = "rule") -> Optional[str]:
    """A rule name as `t3s.selection.RULES` spells it; None for 'none'."""
    from ...selection import RULES
    if name is None:
        return None
    name = str(name).strip()
    if name.lower() in ("none", "null", "off", ""):
        return None
    name = RULE_ALIASES.get(name, name)
    if name not in RULES:
        known = sorted(set(RULES) | set(RULE_ALIASES) | {"none"})
        raise UsageError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return name


def params_over_defaults(given: Optional[Mapping[str, Any]], defaults: Mapping[str, Any],
                         what: str) -> Dict[str, Any]:
    """A stage's ``*_params`` setting over its ``defaults``; UsageError naming the unknown
    keys (``what``: "analysis", "sensitivity") and the known ones."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UsageError(f"unknown {what} parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(defaults)}")
    return {**defaults, **given}


def mask_rule(rule: str) -> str:
    """The mask rule a baseline trains with (`BASELINE_OBJECTIVES`; else the rule itself)."""
    return BASELINE_OBJECTIVES[rule][0] if rule in BASELINE_OBJECTIVES else rule


def baseline_loss_options(rule: str) -> Dict[str, Any]:
    """The `t3s.patch` loss options of a baseline ({} for a mask rule)."""
    return dict(BASELINE_OBJECTIVES[rule][1]) if rule in BASELINE_OBJECTIVES else {}


def rule_params(cfg: Mapping[str, Any], which: str = "rule",
                budget: Optional[int] = None) -> Dict[str, Any]:
    """The parameters `t3s.selection.apply_rule` gets for ``cfg[which]``.

    ``random`` draws with ``seed`` = the run's seed, and keeps by default as
    many tokens as the main rule keeps (``budget``) *(choice)*. A rule name in
    ``like=`` is made canonical (`canonical_rule`).
    """
    rule = cfg[which]
    params = dict(cfg["rule_params"] if which == "rule" else cfg["baseline_params"])
    if rule == "random":
        params.setdefault("seed", cfg["seed"])
    if rule in _BUDGET_PARAMS and not any(k in params for k in _BUDGET_PARAMS[rule]):
        if budget is not None:
            params["budget"] = int(budget)
        elif which == "rule" and rule == "random":
            params["keep_fraction"] = 0.5
    if isinstance(params.get("like"), str):
        params["like"] = canonical_rule(params["like"], "rule in like=")
    return params


#: the rules that take a token budget, and the parameters that set one instead
_BUDGET_PARAMS = {"random": ("keep_fraction", "budget", "like"), "kl": ("fraction", "budget")}


def arm_params(cfg: Mapping[str, Any], arm: str, kept: int, n_tokens: int) -> Dict[str, Any]:
    """The parameters `t3s.selection.apply_rule` gets for ``arm`` (a name of ``arms``):
    its rule's defaults, except the budget of the budgeted rules.

    *(choice)* random, rho1, static and kl keep exactly ``kept`` of the ``n_tokens``
    trace tokens, as many as the rule's mask keeps, so that they differ from T3S only in
    which tokens they leave out: rho1 keeps the top kept/n_tokens by excess loss, static
    drops the 1 − kept/n_tokens most confident at θ0, kl drops the n_tokens − kept with
    the largest KL(θb‖θ0); random draws with the run's seed.
    """
    share = kept / n_tokens if n_tokens else 1.0
    return {"random": {"seed": cfg["seed"], "budget": int(kept)}, "kl": {"budget": int(kept)},
            "rho1": {"keep_fraction": share},
            "static": {"fraction": 1.0 - share, "which": "top"}}.get(arm, {})


def check_rule_params(cfg: Mapping[str, Any]) -> None:
    """Apply the rule, the baseline and every arm to a small made-up table, so that bad
    parameters fail before hours of training rather than after."""
    import numpy as np

    from ...data import TokenTable
    from ...selection import apply_rule
    n = 8
    t = TokenTable(np.zeros(n, np.int64), np.arange(1, n + 1, dtype=np.int32),
                   delta=np.linspace(-1, 1, n, dtype=np.float32),
                   c0=np.linspace(-3, -0.1, n, dtype=np.float32),
                   cb=np.linspace(-2, -0.2, n, dtype=np.float32),
                   loss_theta=np.linspace(0.1, 3, n, dtype=np.float32),
                   loss_ref=np.linspace(0.2, 2, n, dtype=np.float32),
                   delta_entropy=np.linspace(-1, 1, n, dtype=np.float32),
                   delta_logit_grad=np.linspace(1, -1, n, dtype=np.float32),
                   kl=np.linspace(0, 2, n, dtype=np.float32))
    for which in ("rule", "baseline"):
        rule = cfg[which]
        if rule == "none":
            if which == "rule" and cfg["rule_params"]:
                raise UsageError("rule_params given but rule is 'none'")
            if which == "baseline" and cfg["baseline_params"]:
                raise UsageError("baseline_params given but baseline is 'none'")
            continue
        params = rule_params(cfg, which, budget=n // 2)
        try:
            apply_rule(mask_rule(rule), t, **params)
        except UsageError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            flag = "--rule-param" if which == "rule" else "--baseline-param"
            raise UsageError(f"{one_line(e)} (given: {params}; set parameters with "
                             f"{flag} KEY=VALUE)") from None
    for arm in cfg.get("arms") or ():
        params = arm_params(cfg, arm, n // 2, n)
        try:
            apply_rule(mask_rule(arm), t, **params)
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"arm {arm!r}: {one_line(e)} (its parameters: {params})") from None
