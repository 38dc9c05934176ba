"""Writing a trajectory store: `TrajectoryWriter`, one rank's shard.

Crash safety. Each append writes one complete encapsulated IPC message with a
single buffered write and flushes it (``fsync=True`` also forces it to disk),
and no end-of-stream marker is needed. A killed run therefore leaves every
earlier message intact and at most one truncated message at the end: readers
skip such a torn tail with a warning. Reopening a shard for writing
(``mode="append"``, the default) truncates a verified torn tail, checks the
schema, and appends further messages, so the file stays one valid stream. A
shard is locked while a writer holds it (`filelock`, on every platform, through a hidden
``.traj-rankNNNNN.lock`` file beside it).

Integrity (format version 2). Every record batch carries the CRC32 of its
decoded columns in its custom metadata (``t3s.crc32``), and closing a writer
seals its shard: ``traj-rankNNNNN.seal.json`` records the shard's size, rows
and whole-file CRC32. The first writer of a store writes its manifest
(`t3s.trajectory.manifest`), world size included; later writers are checked
against it. A resumed run drops what it recorded past its checkpoint with
`TrajectoryWriter.rewind`.

Compression. Record-batch bodies are zstd-compressed by default (about a quarter
of the uncompressed size; see `t3s.trajectory.shards`). Compression happens inside
each message, so everything above still holds message by message; appending to a
shard written uncompressed (by an earlier version, or with ``compression=None``)
just adds compressed messages to it.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from .._util import to_numpy
from .manifest import FORMAT_VERSION, StoreManifest, write_manifest_once
from .shards import (DEFAULT_COMPRESSION, PathLike, ShardCorruption, batch_message,
                     check_compression, load_shard, seal_path, shard_batches, shard_path,
                     trajectory_schema)

INT32_RANGE = (-(2**31), 2**31 - 1)

__all__ = ["TrajectoryWriter"]


class TrajectoryWriter:
    """Appends records to one rank's shard of a trajectory store.

    Args:
        directory: the store directory (created if missing).
        dataset_fingerprint: must equal the manifest's if the store exists.
        tokenizer_fingerprint, model_id, metadata: written to a new manifest.
        rank: shard index (default: the torch.distributed rank, else 0).
        world_size: shards the store holds (default: the torch.distributed world
            size; 1 when neither rank nor torch.distributed is set; unknown when a
            rank is given without it). Written to a new manifest, checked
            against an existing one.
        extra_columns: float32 columns beyond logprob (e.g. ("entropy",)).
        fsync: also ``os.fsync`` after every append (flush is always done).
        mode: 'append' (default) continues an existing shard after dropping a
            torn tail; 'overwrite' starts the shard afresh.
        compression: codec of the record-batch bodies: 'zstd' (default), 'lz4'
            or None (uncompressed, the format before compression). Readers need
            no setting: each message says how it is compressed.

    Every `append` is one IPC message with its CRC32, written whole and flushed:
    a killed run loses at most the message being written. `close` seals the
    shard (size, rows, CRC32). Reopening for append verifies the shard first: a
    damaged one is refused and left unchanged; only a torn tail of an unsealed
    shard is dropped. Not thread-safe; use one writer per shard (a second writer
    on the same shard gets a ``RuntimeError``).
    """

    def __init__(self, directory: PathLike, *, dataset_fingerprint: str,
                 tokenizer_fingerprint: str = "", model_id: str = "",
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 extra_columns: Sequence[str] = (),
                 fsync: bool = False, mode: str = "append",
                 metadata: Optional[Mapping[str, Any]] = None,
                 compression: Optional[str] = DEFAULT_COMPRESSION):
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be 'append' or 'overwrite', got {mode!r}")
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise ValueError("dataset_fingerprint must be a non-empty string")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = _default_rank() if rank is None else int(rank)
        if world_size is None:
            world_size = _default_world_size() if rank is None or _dist_ready() else None
        if world_size is not None and not 0 <= self.rank < int(world_size):
            raise ValueError(f"rank {self.rank} is outside world_size {world_size}")
        self.world_size = None if world_size is None else int(world_size)
        self.schema = trajectory_schema(extra_columns)
        self.extra_columns = tuple(extra_columns)
        self.fsync = bool(fsync)
        self.compression = check_compression(compression)
        self.rows_written = 0
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.manifest = write_manifest_once(self.directory, StoreManifest(
            dataset_fingerprint=dataset_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
            model_id=model_id, extra_columns=self.extra_columns, world_size=self.world_size,
            created=created, metadata=dict(metadata or {})))
        if self.manifest.version < FORMAT_VERSION:
            raise ValueError(f"store {self.directory} has format version {self.manifest.version} "
                             f"(no checksums); write version {FORMAT_VERSION} to a new directory")
        self.manifest.check(dataset_fingerprint=dataset_fingerprint,
                            tokenizer_fingerprint=tokenizer_fingerprint, where=str(self.directory))
        if tuple(self.manifest.extra_columns) != self.extra_columns:
            raise ValueError(f"store {self.directory} has extra columns "
                             f"{list(self.manifest.extra_columns)}, not {list(self.extra_columns)}")
        known = self.manifest.world_size
        if known is not None and not self.rank < known:
            raise ValueError(f"store {self.directory} holds {known} rank shards; rank "
                             f"{self.rank} does not belong to it")
        if known is not None and self.world_size is not None and known != self.world_size:
            raise ValueError(f"store {self.directory} was created for world_size {known}, "
                             f"not {self.world_size}")
        self.path = shard_path(self.directory, self.rank)
        self._crc = 0  # running CRC32, size and rows of the shard, for the seal
        self._size = self._rows = 0
        self._shard_lock = self._lock()
        try:
            self._file = open(self.path, "a+b")
            self._prepare(mode)
        except BaseException:
            if getattr(self, "_file", None) is not None:
                self._file.close()
            self._file = None
            self._shard_lock.release()
            raise

    def _lock(self):
        """An exclusive lock on the shard, or RuntimeError when another writer (in this
        process or another) holds it. A separate lock file, not a lock on the shard itself:
        Windows byte-range locks would also block the readers of a running shard."""
        from filelock import FileLock, Timeout
        lock = FileLock(str(self.path.with_name(f".{self.path.stem}.lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RuntimeError(f"{self.path} is already open by another writer") from None
        return lock

    def _prepare(self, mode: str) -> None:
        f = self._file
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if mode == "overwrite" or size == 0:
            self._restart()
            return
        try:  # verify before changing anything: a damaged shard is refused untouched
            buf, batches, schema, end = load_shard(self.path, schema=self.schema)
        except ShardCorruption as exc:
            raise ValueError(f"{exc}. Not appending to it: the shard is left unchanged; use "
                             "mode='overwrite' to record it again") from None
        if schema is None:
            self._restart()
            return
        if not schema.equals(self.schema):
            raise ValueError(f"{self.path} has schema {schema}, not {self.schema}; "
                             "use mode='overwrite' or another directory")
        if end < size:
            warnings.warn(f"{self.path}: dropping a torn tail of {size - end} bytes before "
                          "appending", RuntimeWarning, stacklevel=3)
            f.truncate(end)
        self._unseal()
        self._crc, self._size = zlib.crc32(memoryview(buf[:end])), end
        self._rows = sum(b.num_rows for b in batches)

    def rewind(self, before_step: int) -> int:
        """Drop every record of step >= ``before_step``; returns the rows dropped.

        A run resumed from its checkpoint at step k records steps k, k+1, ...
        again; the records a killed run wrote past that checkpoint go first, so
        that every (step, example, position) is in the store once. The shard was
        verified when opened; records are in step order (one batch per step and
        micro-batch), so this truncates at a batch boundary. Call it before any
        `append`.
        """
        if self._file is None:
            raise RuntimeError(f"writer for {self.path} is closed")
        before_step = int(before_step)
        f = self._file
        f.seek(0)
        buf = pa.py_buffer(f.read(self._size))
        cut, kept_rows, seen_late = None, 0, False
        for start, end, batch in shard_batches(buf):
            steps = batch.column("step").to_numpy()
            late = steps >= before_step
            if late.all():
                seen_late = True
                if cut is None:
                    cut = start
            elif late.any() or seen_late:
                raise ValueError(f"{self.path}: records are not in step order around byte "
                                 f"{start}, so steps >= {before_step} cannot be dropped by "
                                 "truncation; record this shard again (mode='overwrite')")
            else:
                kept_rows += batch.num_rows
        if cut is None:
            return 0
        dropped = self._rows - kept_rows
        f.truncate(cut)
        self._unseal()
        self._crc, self._size, self._rows = zlib.crc32(memoryview(buf[:cut])), cut, kept_rows
        return dropped

    def _restart(self) -> None:
        self._unseal()
        self._file.truncate(0)
        self._crc = self._size = self._rows = 0
        self._write(self.schema.serialize())

    def _unseal(self) -> None:
        seal = seal_path(self.path)
        if seal.exists():
            seal.unlink()

    def _write(self, buf) -> None:
        f = self._file
        f.seek(0, os.SEEK_END)
        view = memoryview(buf)
        f.write(view)
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self._crc = zlib.crc32(view, self._crc)
        self._size += view.nbytes

    def append(self, step, example_id, position, logprob, **extra) -> int:
        """Append one record batch; returns its number of rows.

        step: int (broadcast) or [n] ints; example_id, position, logprob: [n]
        array-likes (numpy, lists or CPU tensors); extra: one [n] array per
        declared extra column. Empty inputs write nothing.
        """
        if self._file is None:
            raise RuntimeError(f"writer for {self.path} is closed")
        if set(extra) != set(self.extra_columns):
            raise ValueError(f"extra columns must be exactly {list(self.extra_columns)}, "
                             f"got {sorted(extra)}")
        eid = _as_array(example_id, np.int64)
        n = eid.shape[0]
        cols = {
            "step": np.broadcast_to(_as_array(step, np.int32, "step"), (n,)),
            "example_id": eid,
            "position": _as_array(position, np.int32, "position"),
            "logprob": _as_array(logprob, np.float32),
        }
        for name in self.extra_columns:
            cols[name] = _as_array(extra[name], np.float32)
        for name, col in cols.items():
            if col.ndim != 1 or col.shape[0] != n:
                raise ValueError(f"column {name!r} has shape {col.shape}, expected ({n},)")
        if n == 0:
            return 0
        batch = pa.record_batch([pa.array(cols[f.name], type=f.type) for f in self.schema],
                                schema=self.schema)
        self._write(batch_message(batch, self.schema, self.compression))
        self.rows_written += n
        self._rows += n
        return n

    def close(self) -> None:
        """Seal and release the shard (idempotent). Every append is already on disk."""
        if self._file is not None:
            try:
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
                self._seal()
            finally:
                self._file.close()
                self._file = None
                self._shard_lock.release()

    def _seal(self) -> None:
        seal = {"bytes": self._size, "rows": self._rows, "crc32": self._crc}
        path = seal_path(self.path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seal, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    @property
    def closed(self) -> bool:
        """True once `close` has been called (the shard is unlocked)."""
        return self._file is None

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- helpers
def _as_array(x, dtype, name: str = "") -> np.ndarray:
    """A column as a numpy array of ``dtype``; float values cast to an integer dtype must be
    integral (so that a key is never silently rounded), and int32 values must fit (so that
    a large step or position never wraps to a negative number)."""
    arr = to_numpy(x)
    if arr.dtype != dtype:
        if (np.issubdtype(dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer)
                and arr.size and not np.all(np.floor(arr) == arr)):  # also catches NaN / inf
            raise ValueError(f"expected integers, got non-integral {arr.dtype} values")
        if dtype == np.int32 and arr.size:
            low, high = INT32_RANGE
            if arr.min() < low or arr.max() > high:
                raise ValueError(f"{name or 'a column'} holds values outside int32 "
                                 f"[{low}, {high}] (got {arr.min()}..{arr.max()})")
        arr = arr.astype(dtype)
    return arr


def _dist_ready() -> bool:
    try:
        import torch.distributed as dist
        return dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover
        return False


def _default_world_size() -> int:
    if _dist_ready():
        import torch.distributed as dist
        return dist.get_world_size()
    return 1


def _default_rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return 0
