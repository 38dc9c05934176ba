"""The manifest of a trajectory store: the format facts every shard shares, and their checks.

Layout of a store directory::

    manifest.json              dataset / tokenizer fingerprints, model id, columns
    traj-rank00000.arrow       one shard per rank, an Arrow IPC *stream*
    traj-rank00001.arrow
    ...

A shard is a standard Arrow IPC stream (``pyarrow.ipc.open_stream`` reads an
intact one): a schema message followed by one record-batch message per
`TrajectoryWriter.append`, its body zstd-compressed by default (each message says
whether it is, so stores written uncompressed read as before). Rows are

    step        int32    optimizer step whose parameters produced the value
    example_id  int64    example key
    position    int32    index of the target token y_t in the example's input_ids
    logprob     float32  log p(y_t | y_<t, x)
    <extra>     float32  optional columns declared at creation (e.g. entropy)

(the schema and the shard format are `t3s.trajectory.shards`). The manifest is
written once, by whichever rank gets there first (`write_manifest_once`), and
records the fingerprints, the extra columns and the world size (how many rank
shards the store holds). Format version 2 checksums every record batch and seals
closed shards; version-1 stores (no checksums, no seals) are still read. The
writer is `t3s.trajectory.writer`, the reader `t3s.trajectory.reader`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from .shards import PathLike

FORMAT_NAME = "t3s.trajectory"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "StoreManifest", "write_manifest_once"]


@dataclasses.dataclass(frozen=True)
class StoreManifest:
    """Metadata of a store, written once as ``manifest.json``.

    dataset_fingerprint: identifies the tokenized data (readers refuse others).
    tokenizer_fingerprint: a string chosen by the caller (e.g. a hash of the vocab).
    model_id: the model (or checkpoint) the values come from.
    extra_columns: float32 columns beyond (step, example_id, position, logprob).
    world_size: how many rank shards the store holds (None: unknown, e.g. ranks
        given by hand without torch.distributed); readers refuse a store with
        one missing.
    created: ISO-8601 UTC time of creation. metadata: free-form JSON.
    """

    dataset_fingerprint: str
    tokenizer_fingerprint: str = ""
    model_id: str = ""
    extra_columns: tuple = ()
    world_size: Optional[int] = None
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


def write_manifest_once(directory: Path, manifest: StoreManifest) -> StoreManifest:
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
