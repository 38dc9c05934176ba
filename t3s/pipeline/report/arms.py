"""The extra arms (the ``arms`` setting) in a run's report: their numbers and their words.

The report (`metrics`, `markdown`, `build`) asks this module for the arms' metrics (`arm_metrics`:
``<name>_acc`` on the headline set, ``arms``, their curves), their row labels
(`arm_label`), the names the statements use (`arm_name`) and what each arm did
(`arm_description`). An arm is named by its rule (``dft``, ``rho1``, ``static``,
``random``, ``entropy``, ``logit_grad``, ``kl``, ...; `t3s.pipeline.arms`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import rundir
from ..rundir import read_json

__all__ = ["arm_names", "arm_metrics", "arm_label", "arm_name", "arm_description", "arm_color"]

#: the arms' curves: matplotlib's tab10 without the pilot's red, T3S's blue and the
#: baseline's grey (`t3s.pipeline.report.plots`)
_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")

_SAME = ("as many as T3S keeps, so that it differs from T3S only in which tokens it "
         "leaves out")
#: arm -> (row label, name in the statements, what it trained on)
_ARMS: Dict[str, Tuple[str, str, str]] = {
    "dft": ("DFT (every token, loss × stop-grad p)", "DFT",
            "every trace token, each token's loss times its own stop-gradient probability "
            "(TRL's `loss_type=\"dft\"`)."),
    "rho1": ("Rho-1 (same budget)", "Rho-1",
             "the tokens with the largest excess loss L(θ0) − L(the pilot's final model), "
             f"{_SAME}."),
    "static": ("static confidence (same budget: drops the most confident at θ0)",
               "the static-confidence rule",
               f"every trace token but the ones θ0 was most confident in, keeping {_SAME}."),
    "random": ("random (same budget)", "the random mask",
               f"randomly chosen trace tokens, {_SAME}."),
    "entropy": ("entropy-change rule (drops tokens whose entropy fell θ0 → θb)",
                "the entropy-change rule",
                "every trace token but the ones whose predictive entropy fell from θ0 to "
                "the bottleneck θb (the entropy analogue of the anchors)."),
    "logit_grad": ("logit-gradient rule (drops tokens whose logit-gradient norm fell θ0 → θb)",
                   "the logit-gradient rule",
                   "every trace token but the ones whose logit-gradient norm fell from θ0 to "
                   "θb (the tokens the pilot was fitting)."),
    "kl": ("KL rule (same budget: drops the largest KL(θb‖θ0))", "the KL rule",
           f"every trace token but the ones whose prediction moved most from θ0 to θb "
           f"(KL(θb‖θ0)), keeping {_SAME}."),
    "inverse_anchor": ("inverse anchor (the anchors only)", "the inverse-anchor rule",
                       "the anchors only (Δc > 0), the tokens T3S leaves out."),
    "anchor": ("anchor rule (Δc > 0 left out)", "the anchor rule",
               "every trace token but the anchors (Δc > 0)."),
}


def arm_names(arms_dir: Optional[Path]) -> List[str]:
    """The arms the current arms stage trained (its ``stage.json``), in order."""
    if arms_dir is None or not (arms_dir / rundir.RECORD_FILE).is_file():
        return []
    return list(read_json(arms_dir / rundir.RECORD_FILE).get("summary") or {})


def arm_metrics(names: List[str], results_arms: Mapping[str, Any],
                histories: Mapping[str, Mapping[str, Any]], source: Optional[str],
                heldout_n: Optional[int]) -> Tuple[Dict[str, Any], Dict[str, Optional[int]]]:
    """({``<name>_acc`` per arm, "arms": names, "arms_heldout_acc": {name: {step: acc}}},
    {name: n}): the accuracy of each arm on the headline set (``results_arms``: the eval
    stage's results there) when the eval stage ran (``source`` "eval"), else at its last
    held-out evaluation during training (``histories``: `report.stage_history` of each
    arm's directory; ``heldout_n`` problems)."""
    values: Dict[str, Any] = {"arms": list(names)}
    n: Dict[str, Optional[int]] = {}
    for name in names:
        held = (histories.get(name) or {}).get("heldout_acc") or {}
        if source == "eval":
            res = results_arms.get(name) or {}
            values[f"{name}_acc"], n[name] = res.get("accuracy"), res.get("n")
        else:
            values[f"{name}_acc"] = held[max(held)] if held and source else None
            n[name] = heldout_n
    values["arms_heldout_acc"] = {
        name: {str(k): v for k, v in sorted(((histories.get(name) or {}).get("heldout_acc")
                                             or {}).items())} for name in names}
    return values, n


def arm_label(name: str) -> str:
    """The results table's row label of an arm."""
    return _ARMS[name][0] if name in _ARMS else f"`{name}` rule"


def arm_name(name: str) -> str:
    """An arm as the statements name it ("DFT", "the KL rule", ...)."""
    return _ARMS[name][1] if name in _ARMS else f"the `{name}` rule"


def arm_description(name: str, steps: Any) -> str:
    """What an arm did, for the report's introduction."""
    what = _ARMS[name][2] if name in _ARMS else f"the mask of the `{name}` rule."
    return f"retrained from θ0 for {steps} steps, like T3S, on {what}"


def arm_color(index: int) -> str:
    """The colour of the ``index``-th arm's curves in the shock figure."""
    return _COLORS[index % len(_COLORS)]
