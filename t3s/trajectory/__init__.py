"""The training trajectory: per-token log p(y_t) at every step it was trained on.

- `t3s.trajectory.store`: the on-disk store (one shard per rank and a manifest that
  knows how many), `TrajectoryWriter` / `TrajectoryReader`;
- `t3s.trajectory.shards`: the verified shard format (per-batch CRC32, seals on
  close); a damaged shard raises `ShardCorruption`, naming the file and offset;
- `t3s.trajectory.queries`: `visits`, `nearest_visit` (c_t(θ_b) read online),
  `first_visit`, `join_tokens` on tables of that schema;
- `t3s.trajectory.recorder`: `TrajectoryRecorder`, which feeds the store from the
  fused loss's per-token statistics during training.
"""

from .queries import first_visit, join_tokens, nearest_visit, visits
from .recorder import TrajectoryRecorder
from .shards import ShardCorruption
from .store import StoreManifest, TrajectoryReader, TrajectoryWriter, read_shard, shard_path

__all__ = ["ShardCorruption", "StoreManifest", "TrajectoryWriter", "TrajectoryReader", "TrajectoryRecorder",
           "read_shard", "shard_path", "visits", "nearest_visit", "first_visit", "join_tokens"]
