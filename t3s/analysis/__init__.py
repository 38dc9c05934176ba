"""The paper's diagnostics of Imitation Shock, as functions of a model and token groups.

* `t3s.analysis.shock`: loss and accuracy per step with the bottleneck
  (`shock_curves`), and the share of trace tokens still below their θ0
  confidence at each recorded step (`below_initial`).
* `t3s.analysis.groups`: token groups (anchors vs the rest from a
  `t3s.SelectionArtifact`, or any 2–4 masks) and padded batches carrying them.
* `t3s.analysis.gradients`: per-group losses and gradients with the fused masked
  loss, over a parameter subset (e.g. the last k layers plus the head); norm
  ratio and cosine (`gradient_stats`).
* `t3s.analysis.transfer`: the loss-transfer matrix (k SGD steps on one group,
  the loss change of every group).
* `t3s.analysis.static` / `t3s.analysis.auc`: confidence, entropy and head-gradient
  norm at one model, and their ROC AUC against a token set.
* `t3s.analysis.anchors`: what anchors are: the anchor fraction by token class,
  position in the trace and θ0 confidence (`anchor_profile`).
* `t3s.analysis.signals`: how each token's prediction changed from θ0 to θb besides
  Δc (entropy, logit-gradient norm, KL), and their agreement with a token set.
* `t3s.analysis.figures`: the figures.

`t3s analyze RUN_DIR` (`t3s.pipeline.diagnostics`) runs all of them on a run directory.
"""

from .anchors import TOKEN_CLASSES, anchor_profile, token_class
from .auc import roc_auc, roc_curve
from .gradients import (
    cosine,
    describe_subset,
    gradient_stats,
    group_gradients,
    group_losses,
    parameter_subset,
)
from .groups import GroupBatch, Groups, check_groups, choose_examples, groups_from_artifact, make_batches
from .shock import below_initial, shock_curves
from .signals import TRAJECTORY_SIGNALS, signal_agreement, trajectory_signals
from .static import SIGNALS, member_of, static_auc, static_signals
from .transfer import transfer_matrix

__all__ = ["TOKEN_CLASSES", "anchor_profile", "token_class", "roc_auc", "roc_curve", "cosine", "describe_subset", "gradient_stats",
           "group_gradients", "group_losses", "parameter_subset", "GroupBatch", "Groups",
           "check_groups", "choose_examples", "groups_from_artifact", "make_batches",
           "below_initial", "shock_curves", "SIGNALS", "member_of", "static_auc",
           "static_signals", "transfer_matrix", "TRAJECTORY_SIGNALS", "signal_agreement",
           "trajectory_signals"]
