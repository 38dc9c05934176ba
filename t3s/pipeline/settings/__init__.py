"""The settings of a T3S run: the options, YAML files, and the run's identity.

`OPTIONS` lists every setting (a YAML key and a ``--flag``); `normalize_config`
turns values from flags, a YAML file (`load_yaml`) or a stored ``config.json``
into the full, checked settings. `identity` is the part of the settings that
names a run: the hashed options, with each path replaced by the fingerprint of
what it names (`fingerprint_path`: data files by content; model and tokenizer
directories by their files' names, sizes and content, each file's digest cached by
`digests`), so a changed data file or re-saved weights count as a changed setting.

The modules, by role: `options` (`OPTIONS`, `DEFAULTS`, `UsageError`), `rules` (the
rule, baseline and arm names and parameters), `normalize` (typing and checking a
config), `fingerprints` (the run's identity), `digests` (cached file digests) and
`yaml_io` (YAML files).
"""

from .fingerprints import describe_change, fingerprint_path, identity, path_fingerprints
from .normalize import check_keys, normalize_config, settings_from
from .options import (
    DEFAULTS,
    HASHED_ONLY_OFF_DEFAULT,
    OPTIONS,
    PATH_KEYS,
    Option,
    UsageError,
)
from .rules import (
    BASELINE_OBJECTIVES,
    RULE_ALIASES,
    arm_params,
    baseline_loss_options,
    canonical_rule,
    check_rule_params,
    mask_rule,
    params_over_defaults,
    rule_params,
)
from .yaml_io import dump_yaml, load_yaml

__all__ = [
    "UsageError",
    "params_over_defaults",
    "Option",
    "OPTIONS",
    "DEFAULTS",
    "HASHED_ONLY_OFF_DEFAULT",
    "RULE_ALIASES",
    "BASELINE_OBJECTIVES",
    "baseline_loss_options",
    "mask_rule",
    "PATH_KEYS",
    "canonical_rule",
    "check_keys",
    "settings_from",
    "normalize_config",
    "rule_params",
    "arm_params",
    "check_rule_params",
    "fingerprint_path",
    "path_fingerprints",
    "identity",
    "describe_change",
    "load_yaml",
    "dump_yaml",
]
