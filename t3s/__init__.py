"""t3s: Training-Trajectory-Aware Token Selection (arXiv 2601.10348).

The method, in the order a run uses it:

1. data       `TraceDataset`, `read_traces`, collators; token keys (example_id, position)
2. pilot SFT  `patch` (fused masked loss for any HF *ForCausalLM), `TrajectoryRecorder`
              (per-token log-probs at every step, from the loss pass), `training_accuracy`
              and `BottleneckTracker` (generated answers checked by a verifier)
3. bottleneck `find_bottleneck`
4. Δc         `profile` (exact forward-only passes), `online_delta` / `exact_delta`,
              `confidence_change`
5. selection  `anchor_mask` (AR rule: drop Δc > 0), `forced_mask` (diffusion rule:
              Δc < -τ), baselines; `SelectionArtifact` stores Δc + mask + metadata
6. retrain    `masked_ce` / the patched model with the artifact's `loss_mask`
              `rrt` for the weight-arithmetic baseline; `student_loss_masks` when a
              smaller selector's artifact trains another student (`t3s.cross_model`)

The kernels live in `t3s_kernels`. Modules: `t3s.data` (package), `t3s.trajectory`
(store, queries, recorder), `t3s.bottleneck`, `t3s.profiling`, `t3s.delta`,
`t3s.selection`, `t3s.artifact`, `t3s.weights` (RRT), `t3s.trainer` (package;
imported on first use), `t3s.hf` (patch, heads, labels, guards) / `t3s.loss` (the patched loss),
`t3s.verify`, `t3s.generation` (the generation interface: sampling settings, engines,
avg@k), `t3s.dllm` (diffusion LMs; package, imported on first use).
"""

from t3s_kernels import TokenStats, linear_cross_entropy, target_logprobs

from .artifact import SelectionArtifact, dataset_fingerprint, load_artifact, tokenizer_fingerprint
from .bottleneck import (BottleneckTracker, answer_agreement, find_bottleneck, training_accuracy,
                         verifier_free_bottleneck)
from .cross_model import check_student, first_token_difference, student_loss_masks
from .data import (
    PackedCollator,
    PaddedCollator,
    TokenTable,
    TraceDataset,
    dataset_keys,
    example_keys,
    packed_keys,
    read_traces,
    token_keys,
    tokenize_trace,
)
from .delta import Agreement, compare_deltas, exact_delta, online_delta
from .hf import LMHead, count_loss_items, is_patched, lm_head, patch, unpatch
from .loss import masked_ce
from .profiling import profile
from .selection import (
    anchor_mask,
    apply_rule,
    confidence_change,
    entropy_change_mask,
    forced_mask,
    inverse_anchor_mask,
    kl_mask,
    logit_grad_change_mask,
    prob_threshold_mask,
    random_mask,
    rho1_mask,
    static_confidence_mask,
    summarize,
)
from .trajectory import StoreManifest, TrajectoryReader, TrajectoryRecorder, TrajectoryWriter
from .verify import exact_match, get_verifier, math_verify_match
from .weights import rrt, save_rrt

_TRAINER_NAMES = ("T3STrainerMixin", "T3STrainer", "T3SSFTTrainer", "sft_trainer_class",
                  "AccuracyCallback", "TrajectoryCallback", "LossMaskCallback",
                  "read_accuracy_history", "trl_dataset")

__all__ = [
    "Agreement", "BottleneckTracker", "LMHead", "lm_head", "PackedCollator", "PaddedCollator", "SelectionArtifact",
    "StoreManifest", "TokenStats", "TokenTable", "TraceDataset", "TrajectoryReader",
    "TrajectoryRecorder", "TrajectoryWriter", "anchor_mask", "apply_rule", "compare_deltas",
    "confidence_change", "count_loss_items", "entropy_change_mask", "kl_mask",
    "logit_grad_change_mask", "dataset_fingerprint", "dataset_keys",
    "exact_delta", "exact_match", "example_keys", "find_bottleneck", "forced_mask",
    "get_verifier", "inverse_anchor_mask", "is_patched", "linear_cross_entropy",
    "load_artifact", "masked_ce", "math_verify_match", "online_delta", "packed_keys", "patch",
    "prob_threshold_mask", "profile", "random_mask", "read_traces", "rho1_mask", "rrt",
    "save_rrt", "static_confidence_mask", "summarize", "target_logprobs", "token_keys",
    "tokenize_trace", "tokenizer_fingerprint", "training_accuracy", "unpatch",
    "answer_agreement", "verifier_free_bottleneck",
    "check_student", "first_token_difference", "student_loss_masks",
    *_TRAINER_NAMES,
]
__version__ = "0.1.0"

# The trainer layer imports transformers (seconds); load it on first use.


def __getattr__(name):
    if name == "dllm":
        import importlib

        return importlib.import_module(".dllm", __name__)
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 't3s' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_TRAINER_NAMES))
