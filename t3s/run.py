"""Deprecated: the run settings, run directory and stage engine moved to `t3s.pipeline`.

This module re-exports their public names for one release; import from
`t3s.pipeline.settings`, `.rundir`, `.engine`, `.loaders` and `.stages` instead.
"""

from .pipeline.engine import Stage, StageContext, run_stages, stage_hash, stage_status
from .pipeline.loaders import (DATA_WHAT, check_jsonl, check_model_dir, load_data, load_model,
                               load_tokenizer, resolve_device, warnings_as_log)
from .pipeline.rundir import (CONFIG_FILE, LEDGER_FILE, LEDGER_FORMAT, LOCK_FILE, PARTIAL_PREFIX,
                              RECORD_FILE, RUN_FORMAT, VERSION, RunDir, RunDirError)
from .pipeline.settings import (DEFAULTS, OPTIONS, PATH_KEYS, RULE_ALIASES, Option, UsageError,
                                canonical_rule, check_keys, check_rule_params, fingerprint_path,
                                identity, normalize_config, rule_params, settings_from)
from .pipeline.stages import ARMS, NEEDS_MODEL, NEEDS_TRAIN, STAGE_NAMES, STAGES, eval_sets

__all__ = [
    "OPTIONS", "Option", "DEFAULTS", "RULE_ALIASES", "PATH_KEYS", "UsageError",
    "normalize_config", "settings_from", "check_keys", "canonical_rule", "rule_params",
    "check_rule_params", "fingerprint_path", "identity",
    "RunDir", "RunDirError", "CONFIG_FILE", "LEDGER_FILE", "RECORD_FILE", "LOCK_FILE",
    "PARTIAL_PREFIX", "RUN_FORMAT", "LEDGER_FORMAT", "VERSION",
    "Stage", "StageContext", "stage_hash", "stage_status", "run_stages",
    "STAGES", "STAGE_NAMES", "NEEDS_MODEL", "NEEDS_TRAIN", "ARMS", "eval_sets",
    "DATA_WHAT", "resolve_device", "check_model_dir", "check_jsonl", "load_model",
    "load_tokenizer", "load_data", "warnings_as_log",
]
