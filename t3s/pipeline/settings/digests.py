"""File digests that cost one read per change: `file_sha256` hashes a file's whole
content and remembers the digest, so that the run's identity can hash every byte of a
multi-GB model directory (`t3s.pipeline.settings.fingerprints`) and still start quickly.

The cache is one JSON file, ``$T3S_FINGERPRINT_CACHE`` or
``$XDG_CACHE_HOME/t3s/fingerprints.json`` (``~/.cache/t3s/fingerprints.json``);
``T3S_FINGERPRINT_CACHE=off`` turns it off (every file is read every time). An entry is
keyed by the file's real path and trusted only while the file's size, mtime, ctime, inode
and device are those it was hashed with. Writing new bytes changes the ctime, which no
program can set back, so a rewrite that keeps the size and resets the mtime is still seen.

The cache is never a reason to fail or to trust stale bytes:

* a digest is recorded only when the file did not change while it was read and its
  timestamps are at least `SETTLE_NS` older than the read (a write in the same timestamp
  tick would otherwise leave an identical key: file systems stamp in ticks of up to 2 s);
* an unreadable, corrupt or foreign cache file counts as empty and is rewritten;
* the file is replaced atomically (a temporary file, then ``os.replace``), under a lock
  (`filelock`) while entries of other processes are merged in, so concurrent runs lose
  at most each other's entries (a re-hash later), never the file;
* where the cache cannot be written (read-only home, no lock within `LOCK_TIMEOUT_S`),
  the digests are still right, only not remembered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from typing import Dict, Iterable, Optional

__all__ = ["file_sha256", "file_sha256s", "cache_path", "SETTLE_NS", "MAX_ENTRIES",
           "LOCK_TIMEOUT_S"]

#: how much older than the read a file's timestamps must be for its digest to be
#: recorded (2 s: FAT's mtime tick, the coarsest in use; ext4 and NTFS tick finer)
SETTLE_NS = 2_000_000_000
#: the most entries kept; the least recently used go first (one entry per file path)
MAX_ENTRIES = 4096
#: how long to wait for another process's cache write before giving up on this one
LOCK_TIMEOUT_S = 5.0
_FORMAT = "t3s-file-digests-1"
_BLOCK = 4 << 20   # 4 MiB reads: the hash, not the syscalls, sets the pace


def cache_path() -> Optional[str]:
    """The cache file, or None when ``T3S_FINGERPRINT_CACHE`` is ``off`` (or ``0``)."""
    env = os.environ.get("T3S_FINGERPRINT_CACHE")
    if env is not None and env.strip().lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "t3s", "fingerprints.json")


def file_sha256(path: str) -> str:
    """sha256 hex digest of the file's content, read only when the cache has no
    current digest for it (`file_sha256s` for several files at once)."""
    return file_sha256s([path])[path]


def file_sha256s(paths: Iterable[str]) -> Dict[str, str]:
    """{path: sha256 hex digest of its content} for existing regular files, with one
    cache read and at most one cache write for all of them."""
    paths = list(paths)
    where = cache_path()
    entries = _load(where) if where else {}
    out, fresh, recorded = {}, {}, False
    for path in paths:
        real = os.path.realpath(path)
        st = os.stat(real)
        key = _key(st)
        entry = entries.get(real)
        if entry is not None and entry["key"] == key:
            out[path] = entry["sha256"]
            fresh[real] = dict(entry, used=time.time())
            continue
        started = time.time_ns()
        digest = _hash(real)
        out[path] = digest
        after = os.stat(real)
        # recorded only if nothing wrote to the file while it was read, and no write
        # could still come in the same timestamp tick (the key would then not change)
        if _key(after) == key and max(st.st_mtime_ns, st.st_ctime_ns) + SETTLE_NS < started:
            fresh[real] = {"key": key, "sha256": digest, "used": time.time()}
            recorded = True
    # written only when a digest was recorded: a run that hashes nothing writes nothing
    # (the hits' use times then go in with it, for the least-recently-used pruning)
    if where and recorded:
        _store(where, fresh)
    return out


def _key(st: os.stat_result) -> list:
    """What must stay the same for a recorded digest to still be the file's."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _hash(path: str) -> str:
    h = hashlib.sha256()   # measured faster than blake2b here (SHA-NI), benchmarks/RESULTS.md
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _load(where: str) -> Dict[str, dict]:
    """The cache's well-formed entries; {} for a missing, unreadable, corrupt or foreign
    file."""
    try:
        with open(where, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT \
            or not isinstance(data.get("files"), dict):
        return {}
    # malformed entries are dropped (and so left out of the next write)
    return {path: e for path, e in data["files"].items()
            if isinstance(e, dict) and isinstance(e.get("key"), list)
            and isinstance(e.get("sha256"), str)}


def _store(where: str, fresh: Dict[str, dict]) -> None:
    """Merge ``fresh`` into the cache file as it is now (other processes may have written
    since it was read), keep the `MAX_ENTRIES` most recently used, replace it atomically.
    Any failure leaves the old file (or none) and is not an error."""
    try:
        from filelock import FileLock, Timeout
        directory = os.path.dirname(where)
        os.makedirs(directory, exist_ok=True)
        with FileLock(where + ".lock", timeout=LOCK_TIMEOUT_S):
            files = _load(where)
            files.update(fresh)
            if len(files) > MAX_ENTRIES:
                def used(item):
                    u = item[1].get("used") if isinstance(item[1], dict) else None
                    return u if isinstance(u, (int, float)) else 0.0
                files = dict(sorted(files.items(), key=used)[-MAX_ENTRIES:])
            fd, tmp = tempfile.mkstemp(prefix=".fingerprints-", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": _FORMAT, "files": files}, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, where)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except (OSError, Timeout, ImportError, TypeError, ValueError):
        pass   # not remembered; the digests returned are right all the same
