"""Reading a trajectory store: `TrajectoryReader`, all rank shards merged and verified.

`TrajectoryReader` checks the manifest (`t3s.trajectory.manifest`) against the
dataset fingerprint the caller expects (a mismatch is a ``ValueError``), merges all
rank shards and answers the queries T3S needs (`t3s.trajectory.queries`, all
vectorised):

- `visits`: every visit of every token, sorted by (example_id, position, step);
- `nearest_visit(table, step)`: per token, the visit nearest a step (ties go to
  the earlier step): c_t(theta_b) from the online trajectory;
- `first_visit(table)`: per token, its earliest visit (step 0 when recorded).

If the same token appears twice at the same step (a resumed run re-recording a
step), the row written last wins.

Integrity. A reader returns exactly what was written, or raises a ``ValueError``
naming the shard, the byte offset and what to do: for a flipped bit (a checksum
mismatch), a sealed shard that changed, a shard that is missing, or damage
mid-file. Only a record cut off at the very end of an unsealed shard (a killed
run) counts as a torn tail. ``allow_partial=True`` reads the shards that are there
when some are missing. Version-1 stores (no checksums, no seals) are still read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa

from .manifest import StoreManifest
from .queries import first_visit, nearest_visit, visits
from .shards import PathLike, read_seal, read_shard, shard_path, trajectory_schema

__all__ = ["TrajectoryReader"]


class TrajectoryReader:
    """Reads a trajectory store: all rank shards merged.

    Args:
        directory: the store directory.
        dataset_fingerprint: the fingerprint the caller expects; a store
            recorded on other data is refused with ``ValueError``. Passing None
            explicitly skips the check.
        tokenizer_fingerprint: checked the same way when given (and when the
            store recorded one).
        allow_partial: read the shards that are there when some of the
            manifest's ranks are missing (with a warning) instead of raising.

    The merged table is read once and cached; `reload` re-reads the shards
    (e.g. while a run is still writing). Every shard is verified (`load_shard`);
    torn tails of unsealed shards are skipped with a warning, and an unsealed
    shard (still being written, or its run was killed) is reported once.
    """

    def __init__(self, directory: PathLike, *, dataset_fingerprint: Optional[str],
                 tokenizer_fingerprint: Optional[str] = None, allow_partial: bool = False):
        self.directory = Path(directory)
        self.allow_partial = bool(allow_partial)
        self.manifest = StoreManifest.load(self.directory)
        self.manifest.check(dataset_fingerprint=dataset_fingerprint,
                            tokenizer_fingerprint=tokenizer_fingerprint,
                            where=str(self.directory))
        self.schema = trajectory_schema(self.manifest.extra_columns)
        self._table: Optional[pa.Table] = None
        self._reported: set = set()

    def shards(self) -> List[Path]:
        """Shard files, in rank order. With a known world size, every rank's shard must
        exist (else `ValueError`, or a warning under ``allow_partial``)."""
        found = sorted(self.directory.glob("traj-rank*.arrow"))
        world = self.manifest.world_size
        if world is None:
            return found
        expected = [shard_path(self.directory, r) for r in range(world)]
        extra = [p for p in found if p not in expected]
        if extra:
            raise ValueError(f"trajectory store {self.directory} holds {world} rank shard(s) "
                             f"by its manifest, but also {[p.name for p in extra]}")
        missing = [p for p in expected if not p.exists()]
        if missing:
            message = (f"trajectory store {self.directory} is incomplete: the shard(s) "
                       f"{[p.name for p in missing]} of its {world} rank(s) are missing, so "
                       "the tokens they recorded have no values")
            if not self.allow_partial:
                raise ValueError(message + "; restore them, or pass allow_partial=True to "
                                 "read the others")
            warnings.warn(message + "; reading the others (allow_partial=True)", RuntimeWarning,
                          stacklevel=3)
        return [p for p in expected if p.exists()]

    def reload(self) -> pa.Table:
        """Re-read every shard (verified; torn tails skipped) and cache the merged table;
        returns it."""
        tables = []
        legacy = self.manifest.version < 2
        for path in self.shards():
            if not legacy and read_seal(path) is None and path not in self._reported:
                self._reported.add(path)
                warnings.warn(f"{path} is not sealed: its writer is still open or its run was "
                              "stopped before closing it; reading its complete records",
                              RuntimeWarning, stacklevel=2)
            t = read_shard(path, legacy=legacy, schema=None if legacy else self.schema)
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
