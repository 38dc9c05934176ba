"""Trajectory store: per-token log p(y_t) at every step it was trained on.

Layout of a store directory::

    manifest.json              dataset / tokenizer fingerprints, model id, columns
    traj-rank00000.arrow       one shard per rank, an Arrow IPC *stream*
    traj-rank00001.arrow
    ...

A shard is a standard Arrow IPC stream (``pyarrow.ipc.open_stream`` reads an
intact one): a schema message followed by one record-batch message per
`TrajectoryWriter.append`. Rows are

    step        int32    optimizer step whose parameters produced the value
    example_id  int64    example key
    position    int32    index of the target token y_t in the example's input_ids
    logprob     float32  log p(y_t | y_<t, x)
    <extra>     float32  optional columns declared at creation (e.g. entropy)

Crash safety. Each append writes one complete encapsulated IPC message with a
single buffered write and flushes it (``fsync=True`` also forces it to disk),
and no end-of-stream marker is needed. A killed run therefore leaves every
earlier message intact and at most one truncated message at the end: readers
skip such a torn tail with a warning. Reopening a shard for writing
(``mode="append"``, the default) truncates a torn tail, checks the schema, and
appends further messages, so the file stays one valid stream. A shard is locked
(``fcntl.flock``, where available) while a writer holds it.

Reading. `TrajectoryReader` checks the manifest against the dataset fingerprint
the caller expects (a mismatch is a ``ValueError``), merges all rank shards and
answers the queries T3S needs (`t3s.trajectory.queries`, all vectorised):

- `visits`: every visit of every token, sorted by (example_id, position, step);
- `nearest_visit(table, step)`: per token, the visit nearest a step (ties go to
  the earlier step): c_t(theta_b) from the online trajectory;
- `first_visit(table)`: per token, its earliest visit (step 0 when recorded).

If the same token appears twice at the same step (a resumed run re-recording a
step), the row written last wins.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from .._util import to_numpy
from .queries import KEY_COLUMNS, first_visit, join_tokens, nearest_visit, visits

try:  # advisory lock against two writers on one shard (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT_NAME = "t3s.trajectory"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BASE_FIELDS = (
    pa.field("step", pa.int32(), nullable=False),
    pa.field("example_id", pa.int64(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("logprob", pa.float32(), nullable=False),
)
BASE_COLUMNS = tuple(f.name for f in BASE_FIELDS)
_END_MARKERS = (b"", b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")

PathLike = Union[str, os.PathLike]

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "KEY_COLUMNS",
    "BASE_FIELDS",
    "BASE_COLUMNS",
    "PathLike",
    "StoreManifest",
    "TrajectoryWriter",
    "TrajectoryReader",
    "shard_path",
    "trajectory_schema",
    "read_shard",
    "visits",
    "nearest_visit",
    "first_visit",
    "join_tokens",
]


def shard_path(directory: PathLike, rank: int) -> Path:
    """Path of rank `rank`'s shard: ``<directory>/traj-rank{rank:05d}.arrow``."""
    return Path(directory) / f"traj-rank{int(rank):05d}.arrow"


def trajectory_schema(extra_columns: Sequence[str] = ()) -> pa.Schema:
    """Schema of a shard: the base columns plus float32 `extra_columns`."""
    extra = list(extra_columns)
    clash = [c for c in extra if c in BASE_COLUMNS]
    if clash:
        raise ValueError(f"extra column names clash with the base columns: {clash}")
    if len(set(extra)) != len(extra):
        raise ValueError(f"duplicate extra column names: {extra}")
    return pa.schema(list(BASE_FIELDS) + [pa.field(c, pa.float32(), nullable=False)
                                          for c in extra])


@dataclasses.dataclass(frozen=True)
class StoreManifest:
    """Metadata of a store, written once as ``manifest.json``.

    dataset_fingerprint: identifies the tokenized data (readers refuse others).
    tokenizer_fingerprint: a string chosen by the caller (e.g. a hash of the vocab).
    model_id: the model (or checkpoint) the values come from.
    extra_columns: float32 columns beyond (step, example_id, position, logprob).
    created: ISO-8601 UTC time of creation. metadata: free-form JSON.
    """

    dataset_fingerprint: str
    tokenizer_fingerprint: str = ""
    model_id: str = ""
    extra_columns: tuple = ()
    created: str = ""
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The manifest as indented, key-sorted JSON (the ``manifest.json`` text)."""
        d = dataclasses.asdict(self)
        d["extra_columns"] = list(self.extra_columns)
        d["metadata"] = dict(self.metadata)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: PathLike) -> "StoreManifest":
        """Read ``directory/manifest.json``; ValueError when it is missing, of another format,
        or of a newer format version."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(f"{directory} is not a trajectory store: {MANIFEST_NAME} is missing")
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a t3s trajectory manifest "
                             f"(format={d.get('format')!r})")
        if int(d.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {d['version']}, newer than this "
                             f"library's {FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["extra_columns"] = tuple(d.get("extra_columns", ()))
        return cls(**d)

    def check(self, *, dataset_fingerprint: Optional[str],
              tokenizer_fingerprint: Optional[str] = None, where: str = "") -> None:
        """ValueError unless the fingerprints match (None skips a check)."""
        if dataset_fingerprint is not None and dataset_fingerprint != self.dataset_fingerprint:
            raise ValueError(
                f"trajectory store {where} was recorded on dataset "
                f"{self.dataset_fingerprint!r}, not the expected {dataset_fingerprint!r}; "
                "its example ids and positions would not refer to the same tokens")
        if (tokenizer_fingerprint is not None and self.tokenizer_fingerprint
                and tokenizer_fingerprint and tokenizer_fingerprint != self.tokenizer_fingerprint):
            raise ValueError(
                f"trajectory store {where} was recorded with tokenizer "
                f"{self.tokenizer_fingerprint!r}, not the expected {tokenizer_fingerprint!r}")


def _write_manifest_once(directory: Path, manifest: StoreManifest) -> StoreManifest:
    """Create manifest.json atomically unless present; return the one on disk."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        tmp = directory / f".{MANIFEST_NAME}.{os.getpid()}.{id(manifest)}.tmp"
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        try:
            os.link(tmp, path)  # atomic and fails if another rank won the race
        except FileExistsError:
            pass
        except OSError:  # pragma: no cover - file systems without hard links
            if not path.exists():
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return StoreManifest.load(directory)


def _scan_messages(buf: pa.Buffer, path: Path):
    """Decode the messages of one shard held in `buf`.

    Returns (batches, schema, end) where `end` is the byte offset just past the
    last complete message; bytes beyond it are a torn tail. A schema message
    may appear again after an end-of-stream marker (concatenated streams).
    """
    reader = pa.BufferReader(buf)
    size = buf.size
    schema: Optional[pa.Schema] = None
    batches: List[pa.RecordBatch] = []
    end = 0
    while True:
        start = reader.tell()
        try:
            msg = pa.ipc.read_message(reader)
        except EOFError:
            # Clean end of file or an end-of-stream marker (another stream may
            # follow it); anything else read here is a torn length prefix.
            pos = reader.tell()
            if bytes(buf[start:pos]) not in _END_MARKERS:
                break
            end = pos
            if pos >= size:
                break
            continue
        except (OSError, pa.ArrowInvalid):
            break
        if msg.type == "schema":
            got = pa.ipc.read_schema(msg)
            if schema is not None and not got.equals(schema):
                raise ValueError(f"{path}: schema changes inside the shard: {schema} -> {got}")
            schema = got
        elif msg.type == "record batch":
            if schema is None:
                raise ValueError(f"{path}: record batch before any schema message")
            batches.append(pa.ipc.read_record_batch(msg, schema))
        else:
            raise ValueError(f"{path}: unexpected IPC message type {msg.type!r}")
        end = reader.tell()
    return batches, schema, end


def _read_bytes(path: Path) -> pa.Buffer:
    # Read into memory rather than memory-map: a writer may truncate the file
    # (torn tail, overwrite) while tables read from it are still alive.
    with pa.OSFile(str(path), "r") as source:
        return source.read_buffer()


def read_shard(path: PathLike, *, warn: bool = True) -> pa.Table:
    """All complete records of one shard; a torn tail is skipped with a warning."""
    path = Path(path)
    buf = _read_bytes(path)
    batches, schema, end = _scan_messages(buf, path)
    if end < buf.size and warn:
        warnings.warn(f"{path}: skipping a torn tail of {buf.size - end} bytes (a record "
                      "still being written, or cut off when a run stopped)", RuntimeWarning,
                      stacklevel=2)
    if schema is None:
        return trajectory_schema().empty_table()
    return pa.Table.from_batches(batches, schema=schema)


class TrajectoryWriter:
    """Appends records to one rank's shard of a trajectory store.

    Args:
        directory: the store directory (created if missing).
        dataset_fingerprint: must equal the manifest's if the store exists.
        tokenizer_fingerprint, model_id, metadata: written to a new manifest.
        rank: shard index (default: the torch.distributed rank, else 0).
        extra_columns: float32 columns beyond logprob (e.g. ("entropy",)).
        fsync: also ``os.fsync`` after every append (flush is always done).
        mode: 'append' (default) continues an existing shard after dropping a
            torn tail; 'overwrite' starts the shard afresh.

    Every `append` is one IPC message, written whole and flushed: a killed run
    loses at most the message being written. Not thread-safe; use one writer
    per shard (a second writer on the same shard gets a ``RuntimeError``).
    """

    def __init__(self, directory: PathLike, *, dataset_fingerprint: str,
                 tokenizer_fingerprint: str = "", model_id: str = "",
                 rank: Optional[int] = None, extra_columns: Sequence[str] = (),
                 fsync: bool = False, mode: str = "append",
                 metadata: Optional[Mapping[str, Any]] = None):
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be 'append' or 'overwrite', got {mode!r}")
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise ValueError("dataset_fingerprint must be a non-empty string")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = _default_rank() if rank is None else int(rank)
        self.schema = trajectory_schema(extra_columns)
        self.extra_columns = tuple(extra_columns)
        self.fsync = bool(fsync)
        self.rows_written = 0
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.manifest = _write_manifest_once(self.directory, StoreManifest(
            dataset_fingerprint=dataset_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
            model_id=model_id, extra_columns=self.extra_columns, created=created,
            metadata=dict(metadata or {})))
        self.manifest.check(dataset_fingerprint=dataset_fingerprint,
                            tokenizer_fingerprint=tokenizer_fingerprint, where=str(self.directory))
        if tuple(self.manifest.extra_columns) != self.extra_columns:
            raise ValueError(f"store {self.directory} has extra columns "
                             f"{list(self.manifest.extra_columns)}, not {list(self.extra_columns)}")
        self.path = shard_path(self.directory, self.rank)
        self._file = open(self.path, "a+b")
        try:
            self._lock()
            self._prepare(mode)
        except BaseException:
            self._file.close()
            self._file = None
            raise

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RuntimeError(f"{self.path} is already open by another writer") from e

    def _prepare(self, mode: str) -> None:
        f = self._file
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if mode == "overwrite" or size == 0:
            f.truncate(0)
            self._write(self.schema.serialize())
            return
        buf = _read_bytes(self.path)
        _, schema, end = _scan_messages(buf, self.path)
        if schema is None:
            f.truncate(0)
            self._write(self.schema.serialize())
            return
        if not schema.equals(self.schema):
            raise ValueError(f"{self.path} has schema {schema}, not {self.schema}; "
                             "use mode='overwrite' or another directory")
        if end < size:
            warnings.warn(f"{self.path}: dropping a torn tail of {size - end} bytes before "
                          "appending", RuntimeWarning, stacklevel=3)
            f.truncate(end)

    def _write(self, buf: pa.Buffer) -> None:
        f = self._file
        f.seek(0, os.SEEK_END)
        f.write(memoryview(buf))
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

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
            "step": np.broadcast_to(_as_array(step, np.int32), (n,)),
            "example_id": eid,
            "position": _as_array(position, np.int32),
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
        self._write(batch.serialize())
        self.rows_written += n
        return n

    def close(self) -> None:
        """Release the shard (idempotent). Every append is already on disk."""
        if self._file is not None:
            try:
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
            finally:
                self._file.close()  # also releases the flock
                self._file = None

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


class TrajectoryReader:
    """Reads a trajectory store: all rank shards merged.

    Args:
        directory: the store directory.
        dataset_fingerprint: the fingerprint the caller expects; a store
            recorded on other data is refused with ``ValueError``. Passing None
            explicitly skips the check.
        tokenizer_fingerprint: checked the same way when given (and when the
            store recorded one).

    The merged table is read once and cached; `reload` re-reads the shards
    (e.g. while a run is still writing). Torn tails are skipped with a warning.
    """

    def __init__(self, directory: PathLike, *, dataset_fingerprint: Optional[str],
                 tokenizer_fingerprint: Optional[str] = None):
        self.directory = Path(directory)
        self.manifest = StoreManifest.load(self.directory)
        self.manifest.check(dataset_fingerprint=dataset_fingerprint,
                            tokenizer_fingerprint=tokenizer_fingerprint,
                            where=str(self.directory))
        self.schema = trajectory_schema(self.manifest.extra_columns)
        self._table: Optional[pa.Table] = None

    def shards(self) -> List[Path]:
        """Shard files, in rank order."""
        return sorted(self.directory.glob("traj-rank*.arrow"))

    def reload(self) -> pa.Table:
        """Re-read every shard (torn tails skipped) and cache the merged table; returns it."""
        tables = []
        for path in self.shards():
            t = read_shard(path)
            if t.num_rows:
                if not t.schema.equals(self.schema):
                    raise ValueError(f"{path} has schema {t.schema}, but the manifest "
                                     f"declares {self.schema}")
                tables.append(t)
        self._table = (pa.concat_tables(tables) if tables
                       else self.schema.empty_table()).combine_chunks()
        return self._table

    def read(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """All records of all shards, in file order (rank 0 first)."""
        table = self._table if self._table is not None else self.reload()
        return table.select(list(columns)) if columns is not None else table

    @property
    def num_rows(self) -> int:
        """Rows in all shards (one per recorded token visit)."""
        return self.read().num_rows

    def example_ids(self) -> np.ndarray:
        """Sorted unique example ids present in the store."""
        return np.unique(self.read(["example_id"]).column(0).to_numpy())

    def steps(self) -> np.ndarray:
        """Sorted unique steps present in the store."""
        return np.unique(self.read(["step"]).column(0).to_numpy())

    def visits(self) -> pa.Table:
        """Every visit of every token, sorted by (example_id, position, step)."""
        return visits(self.read())

    def nearest(self, step: int, *, max_distance: Optional[int] = None) -> pa.Table:
        """Per token, the visit nearest `step`; see `nearest_visit`."""
        return nearest_visit(self.read(), step, max_distance=max_distance)

    def first(self) -> pa.Table:
        """Per token, its earliest visit; see `first_visit`."""
        return first_visit(self.read())


# --------------------------------------------------------------------------- helpers
def _as_array(x, dtype) -> np.ndarray:
    """A column as a numpy array of ``dtype``; float values cast to an integer dtype must be
    integral (so that a key is never silently rounded)."""
    arr = to_numpy(x)
    if arr.dtype != dtype:
        if (np.issubdtype(dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer)
                and arr.size and not np.all(np.floor(arr) == arr)):  # also catches NaN / inf
            raise ValueError(f"expected integers, got non-integral {arr.dtype} values")
        arr = arr.astype(dtype)
    return arr


def _default_rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return 0

