"""The shard file format of a trajectory store: one Arrow IPC stream per rank, verified.

A shard ``traj-rankNNNNN.arrow`` is a schema message followed by one record-batch
message per append; each batch carries the CRC32 of its decoded columns in its
custom metadata (``t3s.crc32``). A closed shard has a seal,
``traj-rankNNNNN.seal.json``: its size, rows and whole-file CRC32.

Compression. Record-batch bodies are zstd-compressed by default (Arrow IPC's own
per-message body compression, ``IpcWriteOptions(compression="zstd")``): about a
quarter of the uncompressed size (benchmarks/store_size.py). The framing is
unchanged: each message still has its length prefix, so the scanner, torn-tail
and rewind logic see whole messages as before. The CRC32 is of the *decoded*
values, so a changed bit in a compressed body fails either decompression or the
checksum. Whether a message is compressed is recorded in the message itself, so
uncompressed shards (written before compression, or with ``compression=None``)
read as before, and one shard may hold both.

`load_shard` / `read_shard` return exactly what was written, or raise
`ShardCorruption` naming the file, the byte offset and what to do. Only a record
cut off at the very end of an unsealed shard is a torn tail (skipped). The store
itself is `t3s.trajectory.manifest`, `t3s.trajectory.writer` and
`t3s.trajectory.reader`.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

PathLike = Union[str, os.PathLike]
CRC_KEY = b"t3s.crc32"

__all__ = ["BASE_FIELDS", "BASE_COLUMNS", "CRC_KEY", "DEFAULT_COMPRESSION", "ShardCorruption",
           "batch_crc32", "batch_message", "check_compression", "codec_available",
           "load_shard", "read_seal", "read_shard", "seal_path", "shard_batches", "shard_path",
           "trajectory_schema"]

BASE_FIELDS = (
    pa.field("step", pa.int32(), nullable=False),
    pa.field("example_id", pa.int64(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("logprob", pa.float32(), nullable=False),
)
BASE_COLUMNS = tuple(f.name for f in BASE_FIELDS)
END_MARKERS = (b"", b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")
DEFAULT_COMPRESSION = "zstd"

def shard_path(directory: PathLike, rank: int) -> Path:
    """Path of rank `rank`'s shard: ``<directory>/traj-rank{rank:05d}.arrow``."""
    return Path(directory) / f"traj-rank{int(rank):05d}.arrow"


def seal_path(shard: PathLike) -> Path:
    """Where a closed shard's seal lives: ``traj-rankNNNNN.seal.json`` beside it."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(".arrow")] + ".seal.json")


def batch_crc32(batch: pa.RecordBatch) -> int:
    """CRC32 of a record batch's decoded content (row count, then each column's values).

    Computed from the values, not the bytes on disk, so damage to the message
    header that changes what is decoded is caught as well as damage to the body.
    """
    crc = zlib.crc32(int(batch.num_rows).to_bytes(8, "little"))
    for column in batch.columns:
        crc = zlib.crc32(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)).tobytes(),
                         crc)
    return crc


class ShardCorruption(ValueError):
    """A shard holds damaged data (not a torn tail): its message names the file and offset."""


def damaged(path: Path, offset: int, what: str) -> ShardCorruption:
    return ShardCorruption(
        f"{path}: damaged at byte {offset}: {what}. The shard's values cannot be trusted; "
        f"restore it from a copy or record it again (delete it and rerun the stage that "
        f"wrote it)")


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


def scan_messages(buf: pa.Buffer, path: Path, *, sealed: bool = False, legacy: bool = False,
                  expected: Optional[pa.Schema] = None):
    """Decode and verify the messages of one shard held in `buf`.

    Returns (batches, schema, end) where `end` is the byte offset just past the
    last complete message; bytes beyond it are a torn tail. A schema message
    may appear again after an end-of-stream marker (concatenated streams).
    Raises `ShardCorruption` for a checksum mismatch, a record batch without a
    checksum in a version-2 shard, or an undecodable message followed by a valid
    one (damage mid-file, not a torn tail); a sealed shard has no torn tail.
    With the `expected` schema (the store's), a schema message that differs from
    it is damage too, and so is an undecodable first message with bytes after it.
    """
    reader = pa.BufferReader(buf)
    size = buf.size
    schema: Optional[pa.Schema] = None
    schema_bytes = b""
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
            if bytes(buf[start:pos]) not in END_MARKERS:
                break
            end = pos
            if pos >= size:
                break
            continue
        except (OSError, pa.ArrowInvalid):
            break
        try:
            if msg.type == "schema":
                got = pa.ipc.read_schema(msg)
                if expected is not None and not got.equals(expected):
                    raise damaged(path, start, f"a schema message that differs from the "
                                  f"store's ({got} instead of {expected})")
                if schema is not None and not got.equals(schema):
                    raise ValueError(f"{path}: schema changes inside the shard: {schema} -> {got}")
                schema, schema_bytes = got, bytes(buf[start:reader.tell()])
            elif msg.type == "record batch":
                if schema is None:
                    raise damaged(path, start, "a record batch before any schema message")
                batches.append(verified_batch(bytes(buf[start:reader.tell()]), schema_bytes,
                                               schema, path, start, legacy))
            else:
                raise damaged(path, start, f"an unexpected IPC message type {msg.type!r}")
        except ShardCorruption:
            raise
        except (OSError, pa.ArrowInvalid, pa.ArrowException) as exc:
            raise damaged(path, start, f"an undecodable message ({exc})") from None
        end = reader.tell()
    if schema is None and expected is not None:
        schema, schema_bytes = expected, expected.serialize().to_pybytes()
        if end == 0 and size > len(schema_bytes):  # the schema is written whole, first
            raise damaged(path, 0, "an undecodable schema message")
    if end < size and (sealed or valid_message_after(buf, end, schema, schema_bytes)):
        raise damaged(path, end, "an undecodable message with complete records after it"
                       if not sealed else "the sealed shard does not end where it was closed")
    return batches, schema, end


def verified_batch(message: bytes, schema_bytes: bytes, schema: pa.Schema, path: Path,
                    offset: int, legacy: bool) -> pa.RecordBatch:
    """Decode one record-batch message and check its CRC32 (version-2 shards)."""
    try:
        with pa.ipc.open_stream(pa.py_buffer(schema_bytes + message)) as stream:
            batch, metadata = stream.read_next_batch_with_custom_metadata()
    except pa.ArrowNotImplementedError as exc:
        # A codec missing from this pyarrow build is not damage: say what to install
        # rather than calling the shard corrupt. With every codec present, it is damage.
        missing = [c for c in ("zstd", "lz4") if not codec_available(c)]
        if not missing:
            raise damaged(path, offset, f"an undecodable message ({exc})") from None
        raise ValueError(f"{path}: the record batch at byte {offset} is compressed with a "
                         f"codec this pyarrow lacks ({exc}; missing: {missing}); install a "
                         "pyarrow built with zstd and lz4 (the PyPI and conda packages "
                         "are)") from None
    if not batch.schema.equals(schema):
        raise damaged(path, offset, "a record batch whose columns differ from the schema")
    stored = None if metadata is None else metadata.get(CRC_KEY)
    if stored is None:
        if legacy:
            return batch
        raise damaged(path, offset, "a record batch without its checksum")
    try:
        stored = int(stored)
    except ValueError:
        raise damaged(path, offset, "a record batch with an unreadable checksum") from None
    if stored != batch_crc32(batch):
        raise damaged(path, offset, "the record batch's checksum does not match its values "
                       "(a changed bit)")
    return batch


def valid_message_after(buf: pa.Buffer, start: int, schema, schema_bytes: bytes) -> bool:
    """True when a decodable, checksum-valid record batch starts anywhere after `start`:
    then the undecodable bytes at `start` are damage, not a torn tail."""
    if schema is None:
        return False
    data = bytes(buf)
    marker = b"\xff\xff\xff\xff"
    pos = data.find(marker, start + 1)
    while pos != -1:
        try:
            msg = pa.ipc.read_message(pa.BufferReader(buf[pos:]))
            if msg.type == "record batch":
                length = msg.serialize().size
                verified_batch(data[pos:pos + length], schema_bytes, schema, Path("?"), pos,
                               legacy=False)
                return True
        except Exception:  # garbage or a checksum mismatch: keep looking
            pass
        pos = data.find(marker, pos + 1)
    return False


def shard_batches(buf: pa.Buffer):
    """(start, end, batch) of every record-batch message of a *verified* shard prefix
    ``buf`` (`load_shard` checked it), in file order."""
    reader = pa.BufferReader(buf)
    schema = None
    while reader.tell() < buf.size:
        start = reader.tell()
        try:
            msg = pa.ipc.read_message(reader)
        except EOFError:  # an end-of-stream marker between concatenated streams
            if reader.tell() == start:
                return
            continue
        if msg.type == "schema":
            schema = pa.ipc.read_schema(msg)
        elif msg.type == "record batch":
            yield start, reader.tell(), pa.ipc.read_record_batch(msg, schema)


def read_bytes(path: Path) -> pa.Buffer:
    # Read into memory rather than memory-map: a writer may truncate the file
    # (torn tail, overwrite) while tables read from it are still alive.
    with pa.OSFile(str(path), "r") as source:
        return source.read_buffer()


def read_seal(shard: PathLike) -> Optional[dict]:
    """The seal of a closed shard ({"bytes", "rows", "crc32"}), or None when it has none."""
    path = seal_path(shard)
    if not path.is_file():
        return None
    try:
        seal = json.loads(path.read_text(encoding="utf-8"))
        return {k: int(seal[k]) for k in ("bytes", "rows", "crc32")}
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardCorruption(f"{path}: unreadable seal ({exc}); delete it to read the shard "
                              "as unsealed") from None


def load_shard(path: PathLike, *, legacy: bool = False, schema: Optional[pa.Schema] = None):
    """Read and verify one shard: (buffer, batches, schema, end).

    A sealed shard (closed by its writer) must match its seal in size, CRC32 and
    rows; every record batch must match its checksum (``legacy=True``: a
    version-1 shard, which has none). Raises `ShardCorruption` (a ``ValueError``)
    naming the file and byte offset otherwise. Bytes past ``end`` are a torn tail.
    ``schema``: the store's schema, which the shard must carry.
    """
    path = Path(path)
    buf = read_bytes(path)
    seal = read_seal(path)
    if seal is not None:
        if buf.size != seal["bytes"]:
            raise damaged(path, min(buf.size, seal["bytes"]),
                           f"the shard has {buf.size} bytes but was sealed with {seal['bytes']}")
        if zlib.crc32(memoryview(buf)) != seal["crc32"]:
            raise damaged(path, 0, "the shard's CRC32 differs from its seal")
    batches, schema, end = scan_messages(buf, path, sealed=seal is not None, legacy=legacy,
                                         expected=schema)
    rows = sum(b.num_rows for b in batches)
    if seal is not None and rows != seal["rows"]:
        raise damaged(path, end, f"{rows} rows, sealed with {seal['rows']}")
    return buf, batches, schema, end


def read_shard(path: PathLike, *, warn: bool = True, legacy: bool = False,
               schema: Optional[pa.Schema] = None) -> pa.Table:
    """All records of one shard, verified (`load_shard`); a torn tail is skipped with a
    warning."""
    path = Path(path)
    buf, batches, schema, end = load_shard(path, legacy=legacy, schema=schema)
    if end < buf.size and warn:
        warnings.warn(f"{path}: skipping a torn tail of {buf.size - end} bytes (a record "
                      "still being written, or cut off when a run stopped)", RuntimeWarning,
                      stacklevel=2)
    if schema is None:
        return trajectory_schema().empty_table()
    return pa.Table.from_batches(batches, schema=schema)


def codec_available(name: str) -> bool:
    """True when this pyarrow build has the codec `name` (PyPI and conda builds have zstd
    and lz4)."""
    return pa.Codec.is_available(name)


def check_compression(compression: Optional[str]) -> Optional[str]:
    """The IPC body codec to write with: ``"zstd"``, ``"lz4"`` (LZ4 frame) or None (off).

    ValueError for another name or a codec this pyarrow build lacks (the PyPI and
    conda packages have both).
    """
    if compression in (None, "none", "uncompressed"):
        return None
    if compression not in ("zstd", "lz4"):
        raise ValueError(f"compression must be 'zstd', 'lz4' or None, got {compression!r}")
    if not codec_available(compression):
        raise ValueError(f"this pyarrow build has no {compression} codec; pass "
                         "compression=None to write uncompressed shards")
    return compression


def batch_message(batch: pa.RecordBatch, schema: pa.Schema,
                  compression: Optional[str] = None) -> pa.Buffer:
    """One encapsulated record-batch message carrying its CRC32 in custom metadata, its
    body compressed with `compression` (a `check_compression` value; None: off)."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, schema, options=options) as stream:
        stream.write_batch(batch, custom_metadata={CRC_KEY: str(batch_crc32(batch)).encode()})
    data = sink.getvalue()
    # the stream is: schema message, our batch message, an 8-byte end-of-stream marker
    # (compression applies to record-batch bodies only: the schema message is unchanged)
    head = schema.serialize().size
    return data.slice(head, data.size - head - 8)
