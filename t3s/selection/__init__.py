"""Token selection rules: T3S and the baselines a user compares it with.

Every function takes and returns `TokenTable`s (keys ``(example_id, position)``
plus value columns; see `t3s.data`). Legend: T = number of tokens.

* Inputs: confidences c_t = log p(y_t | y_<t, x) (column ``c`` by default, any
  single column otherwise), confidence changes Δc_t (column ``delta``), per-token
  losses (column ``loss``; loss = −c).
* Loss-mask rules return a table with the input's keys (same row order) and a
  bool column ``loss_mask`` [T]: True (1) keeps a token in the loss, False (0)
  drops it. The token stays in the input either way.
* `forced_mask` is different: it returns a bool column ``forced`` [T] that marks
  the tokens a diffusion LM must *mask (corrupt) and reconstruct*; it is not a
  loss mask.

* Trajectory-signal rules (`entropy_change_mask`, `logit_grad_change_mask`,
  `kl_mask`) read the per-token signals of `t3s.analysis.trajectory_signals`
  (columns ``delta_entropy``, ``delta_logit_grad``, ``kl``; `SIGNAL_COLUMNS`).

Tie-breaking in the budgeted rules is by key order (example_id, then
position), so results do not depend on the row order of the input.

Plain tensors. Every rule (and `confidence_change`) also takes a torch tensor
or a numpy array of any shape S instead of a table (e.g. ``token_stats`` fields
[B, T], or a flat [T] vector) and returns the same type and shape: a bool [S]
mask (a tensor on the input's device) from the mask rules and `forced_mask`,
a float Δc [S] from `confidence_change`. An array is read as a table whose
"example" is the index along the first dimension (a 0-D or 1-D array is one
example) and whose key order is the row-major (flat) order, so
``per_example=True`` works per row and ties break by flat index. Several array
inputs of one call must have the same shape. NaN values are refused, as in
tables: select the finite entries first (``x[torch.isfinite(x)]``).

Modules: `inputs` (tables, tensors and arrays as rule inputs; key order,
budgets), `rules` (the rules and baselines above), `registry` (`RULES`,
`apply_rule`: the rules by name) and `summary` (`SelectionSummary`,
`summarize`). Import the names of `__all__` from `t3s.selection` itself.
"""

from .inputs import Tokens  # the input type of the rules (not in __all__, as before)
from .registry import RULES, apply_rule
from .rules import (SIGNAL_COLUMNS, anchor_mask, confidence_change, entropy_change_mask, forced_mask,
                    full_mask, inverse_anchor_mask, kl_mask, logit_grad_change_mask,
                    prob_threshold_mask, random_mask, rho1_mask, static_confidence_mask)
from .summary import SelectionSummary, summarize

__all__ = [
    "confidence_change",
    "anchor_mask",
    "inverse_anchor_mask",
    "random_mask",
    "static_confidence_mask",
    "rho1_mask",
    "prob_threshold_mask",
    "entropy_change_mask",
    "logit_grad_change_mask",
    "kl_mask",
    "SIGNAL_COLUMNS",
    "forced_mask",
    "full_mask",
    "apply_rule",
    "RULES",
    "SelectionSummary",
    "summarize",
]
