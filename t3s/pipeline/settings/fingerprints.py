"""The run's identity: `identity` is the part of the settings that names a run, the
hashed options with each path replaced by the fingerprint of what it names
(`fingerprint_path`: data files by content; model and tokenizer directories by their
files' names and sizes plus the content of those under 64 MiB), so a changed data file
counts as a changed setting.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Mapping, Optional

from ..._util import sha256_file
from .options import OPTIONS, PATH_KEYS

__all__ = ["fingerprint_path", "path_fingerprints", "identity", "describe_change"]

_HASH_CONTENT_LIMIT = 64 << 20


def fingerprint_path(path: Optional[str]) -> Optional[str]:
    """sha256 identifying a data file (its content) or a model directory (its
    top-level files' names and sizes, and the content of those under 64 MiB).
    None for None or a path that does not exist."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        if size <= _HASH_CONTENT_LIMIT:
            h.update(sha256_file(full).encode())
    return h.hexdigest()


def identity(cfg: Mapping[str, Any], fingerprints: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """The hashed settings: paths replaced by the fingerprints of what they name
    (a tokenizer left at the model's counts as the model)."""
    out = {}
    for o in OPTIONS:
        if not o.hashed:
            continue
        if o.kind == "path":
            out[o.name] = None if cfg.get(o.name) is None else {"sha256": fingerprints.get(o.name)}
        else:
            out[o.name] = cfg.get(o.name)
    return out


def describe_change(key: str, old: Any, new: Any) -> str:
    """One changed identity entry, as error messages show it."""
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
        return f"{key} (contents differ)"
    return f"{key} ({old!r} -> {new!r})"


def path_fingerprints(cfg: Mapping[str, Any],
                      stored: Optional[Mapping[str, Any]] = None) -> Dict[str, Optional[str]]:
    """`fingerprint_path` of every path setting (`PATH_KEYS`). A path that is gone
    but unchanged since ``stored`` (a run's ``config.json``) keeps its stored
    fingerprint; the stages that need the file will say it is missing."""
    old_cfg = (stored or {}).get("config") or {}
    old_fp = (stored or {}).get("fingerprints") or {}
    out = {}
    for key in PATH_KEYS:
        fp = fingerprint_path(cfg[key])
        if fp is None and cfg[key] is not None and old_cfg.get(key) == cfg[key]:
            fp = old_fp.get(key)
        out[key] = fp
    return out
