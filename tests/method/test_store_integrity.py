"""A trajectory store returns exactly what was written, or an error naming the shard.

Faults as a user's machine makes them: single-bit flips anywhere in a shard, a deleted
shard, a shard cut short after it was closed, a damaged shard reopened for append, and
steps or positions too large for the int32 columns.
"""

import json
import warnings

import numpy as np
import pyarrow as pa
import pytest

from t3s.trajectory.shards import (ShardCorruption, read_shard, seal_path, shard_path,
                                   trajectory_schema)
from t3s.trajectory.reader import TrajectoryReader
from t3s.trajectory.writer import TrajectoryWriter

DS = "dataset-fp"


def _write(directory, rng, batches=6, rows=40, **kw):
    """Write `batches` appends of `rows` random records; returns the expected columns."""
    expected = {"step": [], "example_id": [], "position": [], "logprob": []}
    with TrajectoryWriter(directory, dataset_fingerprint=DS, **kw) as w:
        for step in range(batches):
            eid = rng.integers(0, 1000, rows)
            pos = rng.integers(0, 500, rows)
            lp = -rng.random(rows).astype(np.float32) * 5
            w.append(step, eid, pos, lp)
            for k, v in (("step", np.full(rows, step)), ("example_id", eid), ("position", pos),
                         ("logprob", lp)):
                expected[k].append(v)
    return {k: np.concatenate(v) for k, v in expected.items()}


def _same(table: pa.Table, expected) -> bool:
    return table.num_rows == len(expected["step"]) and all(
        np.array_equal(table.column(k).to_numpy(), v) for k, v in expected.items())


def _read_flipped(path, data, offset, rng, read):
    """Write ``data`` with one bit flipped at ``offset`` and read it back with ``read``."""
    damaged = bytearray(data)
    damaged[offset] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(damaged))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read()


def test_every_bit_flip_is_caught_or_harmless(tmp_path):
    """Flip one bit at many offsets: the read is exact, or a ValueError names the shard."""
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    expected = _write(tmp_path, rng)
    path = shard_path(tmp_path, 0)
    data = path.read_bytes()
    offsets = sorted(set(rng.integers(0, len(data), 150).tolist()))
    outcomes = {"exact": 0, "error": 0}
    for offset in offsets:
        try:
            table = _read_flipped(path, data, offset, rng, lambda: TrajectoryReader(
                tmp_path, dataset_fingerprint=DS).read())
        except ValueError as exc:
            assert str(path) in str(exc), exc
            outcomes["error"] += 1
            continue
        assert _same(table, expected), f"a flip at byte {offset} changed the values silently"
        outcomes["exact"] += 1
    assert outcomes["error"] >= len(offsets) * 0.9  # sealed: nearly every flip is seen

    # Unsealed (a killed writer): the per-batch checksums alone must catch value changes.
    seal_path(path).unlink()
    schema = trajectory_schema()
    for offset in offsets:
        try:
            table = _read_flipped(path, data, offset, rng, lambda: read_shard(path, schema=schema))
        except ShardCorruption as exc:
            assert str(path) in str(exc) and "byte" in str(exc)
            continue
        # no error: every record read is one that was written, in order (a torn tail
        # at the very end can only drop the last record)
        n = table.num_rows
        assert n >= len(expected["step"]) - 40, f"flip at {offset} dropped complete records"
        assert _same(table, {k: v[:n] for k, v in expected.items()}), offset


def test_a_missing_shard_is_an_error_unless_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    parts = [_write(tmp_path, rng, batches=2, rank=r, world_size=3) for r in range(3)]
    assert json.loads((tmp_path / "manifest.json").read_text())["world_size"] == 3
    shard_path(tmp_path, 1).unlink()
    with pytest.raises(ValueError, match="incomplete.*traj-rank00001.arrow"):
        TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    with pytest.warns(RuntimeWarning, match="allow_partial"):
        table = TrajectoryReader(tmp_path, dataset_fingerprint=DS, allow_partial=True).read()
    assert table.num_rows == len(parts[0]["step"]) + len(parts[2]["step"])
    # a single-process store knows it holds one shard
    solo = tmp_path / "solo"
    _write(solo, rng, batches=1)
    shard_path(solo, 0).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        TrajectoryReader(solo, dataset_fingerprint=DS).read()
    with pytest.raises(ValueError, match="outside world_size"):
        TrajectoryWriter(tmp_path / "x", dataset_fingerprint=DS, rank=3, world_size=3)


def test_a_sealed_shard_cut_short_is_an_error_not_a_torn_tail(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path, rng)
    path = shard_path(tmp_path, 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ShardCorruption, match="sealed with"):
        TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()


def test_appending_to_a_damaged_shard_is_refused_and_changes_nothing(tmp_path):
    rng = np.random.default_rng(2)
    _write(tmp_path, rng, batches=10)
    path = shard_path(tmp_path, 0)
    seal_path(path).unlink()  # as after a killed run: no seal, only the checksums
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # mid-file, inside a record batch
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged at byte .*Not appending"):
        TrajectoryWriter(tmp_path, dataset_fingerprint=DS)
    assert path.read_bytes() == bytes(data)
    # a real torn tail (cut inside the last record) is still dropped before appending
    clean = tmp_path / "clean"
    expected = _write(clean, rng, batches=3, rows=10)
    cpath = shard_path(clean, 0)
    seal_path(cpath).unlink()
    cpath.write_bytes(cpath.read_bytes()[:-7])
    with pytest.warns(RuntimeWarning, match="dropping a torn tail"):
        TrajectoryWriter(clean, dataset_fingerprint=DS).close()
    assert _same(TrajectoryReader(clean, dataset_fingerprint=DS).read(),
                 {k: v[:20] for k, v in expected.items()})


def test_int32_columns_never_wrap(tmp_path):
    with TrajectoryWriter(tmp_path, dataset_fingerprint=DS) as w:
        with pytest.raises(ValueError, match="step holds values outside int32"):
            w.append(2**31 + 5, [1], [2], [-1.0])
        with pytest.raises(ValueError, match="position holds values outside int32"):
            w.append(3, [1], [2**31 + 7], [-1.0])
        w.append(2**31 - 1, [2**40], [2**31 - 1], [-1.0])  # the extremes fit
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    assert table.column("step").to_pylist() == [2**31 - 1]
    assert table.column("example_id").to_pylist() == [2**40]


def test_version_1_stores_are_still_read(tmp_path):
    """A store written before checksums (format version 1) reads as before; writing to
    it is refused, since its shards cannot be verified."""
    schema = trajectory_schema()
    batch = pa.record_batch([pa.array([1, 2], pa.int32()), pa.array([7, 8], pa.int64()),
                             pa.array([3, 4], pa.int32()), pa.array([-1.0, -2.0], pa.float32())],
                            schema=schema)
    with pa.ipc.new_stream(str(shard_path(tmp_path, 0)), schema) as stream:
        stream.write_batch(batch)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "t3s.trajectory", "version": 1, "dataset_fingerprint": DS}))
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    assert table.column("example_id").to_pylist() == [7, 8]
    with pytest.raises(ValueError, match="format version 1"):
        TrajectoryWriter(tmp_path, dataset_fingerprint=DS)
