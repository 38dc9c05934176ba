"""The training trajectory: per-token log p(y_t) at every step it was trained on.

- `t3s.trajectory.manifest`: the on-disk store (one shard per rank and a manifest that
  knows how many): `StoreManifest` and the format facts;
- `t3s.trajectory.writer`: `TrajectoryWriter`, which appends to one rank's shard;
- `t3s.trajectory.reader`: `TrajectoryReader`, which reads all shards merged;
- `t3s.trajectory.shards`: the verified shard format (per-batch CRC32, seals on
  close); a damaged shard raises `ShardCorruption`, naming the file and offset;
- `t3s.trajectory.queries`: `visits`, `nearest_visit` (c_t(θ_b) read online),
  `first_visit`, `join_tokens` on tables of that schema;
- `t3s.trajectory.recorder`: `TrajectoryRecorder`, which feeds the store from the
  fused loss's per-token statistics during training.
"""

from .manifest import StoreManifest
from .queries import first_visit, join_tokens, nearest_visit, visits
from .reader import TrajectoryReader
from .recorder import TrajectoryRecorder
from .shards import ShardCorruption, read_shard, shard_path
from .writer import TrajectoryWriter

__all__ = ["ShardCorruption", "StoreManifest", "TrajectoryWriter", "TrajectoryReader", "TrajectoryRecorder",
           "read_shard", "shard_path", "visits", "nearest_visit", "first_visit", "join_tokens"]
