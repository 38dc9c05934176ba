"""The settings as a YAML file: read (`load_yaml`) and written (`dump_yaml`)."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

from .options import OPTIONS, UsageError

__all__ = ["load_yaml", "dump_yaml"]


def load_yaml(path: str) -> Dict[str, Any]:
    """The settings in a YAML file (a mapping; unknown keys are errors)."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path}{where}: not valid YAML "
                         f"({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a mapping of settings, got "
                         f"{type(data).__name__}")
    return data


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    """The settings as YAML, in the order of `OPTIONS`."""
    import yaml
    ordered = {o.name: cfg[o.name] for o in OPTIONS}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
