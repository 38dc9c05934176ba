"""The run's identity: `identity` is the part of the settings that names a run, the
hashed options with each path replaced by the fingerprint of what it names
(`fingerprint_path`: data files by their content; model and tokenizer directories by
their files' names, sizes and content), so a changed data file or a model re-saved at
the same path with other weights counts as a changed setting.

Every byte is hashed, the weights included: a fine-tune of the same architecture keeps
every file's name and size, so anything less would let stages built from the old
weights pass as current. The digests are cached per file
(`t3s.pipeline.settings.digests`), so only a file that changed is read again.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Mapping, Optional

from .digests import file_sha256, file_sha256s
from .options import OPTIONS, PATH_KEYS

__all__ = ["fingerprint_path", "path_fingerprints", "identity", "describe_change"]


def fingerprint_path(path: Optional[str]) -> Optional[str]:
    """sha256 identifying a data file (of its content) or a model directory (of its
    top-level files' names, sizes and content digests; hidden files and subdirectories
    are not part of a model). None for None or a path that does not exist.

    The value of a file, and of a directory whose files are all under 64 MiB, is the
    one earlier versions gave (they skipped larger files' content), so run
    directories made with those stay the same runs."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return file_sha256(path)
    files = [(name, os.path.join(path, name)) for name in sorted(os.listdir(path))
             if not name.startswith(".") and os.path.isfile(os.path.join(path, name))]
    digests = file_sha256s(full for _, full in files)
    h = hashlib.sha256()
    for name, full in files:
        h.update(f"{name}\0{os.path.getsize(full)}\0".encode())
        h.update(digests[full].encode())
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
