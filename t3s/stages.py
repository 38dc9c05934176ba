"""Deprecated: the stages of a run moved to `t3s.pipeline.stages`.

This module re-exports their public names for one release.
"""

from .pipeline.stages import (ARMS, FORCED_MSG, NEEDS_MODEL, NEEDS_TRAIN, STAGE_NAMES, STAGES,
                              bottleneck_step, eval_sets)

__all__ = ["STAGES", "STAGE_NAMES", "NEEDS_MODEL", "NEEDS_TRAIN", "ARMS", "FORCED_MSG",
           "eval_sets", "bottleneck_step"]
