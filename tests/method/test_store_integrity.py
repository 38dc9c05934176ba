"""A trajectory store returns exactly what was written, or an error naming the shard.

Faults as a user's machine makes them: single-bit flips anywhere in a shard, a deleted
shard, a shard cut short after it was closed, a damaged shard reopened for append, and
steps or positions too large for the int32 columns; each also with compressed message
bodies (the default), and stores written before compression.
"""

import json
import warnings

import numpy as np
import pyarrow as pa
import pytest

from t3s.trajectory import shards
from t3s.trajectory.shards import (ShardCorruption, read_shard, seal_path, shard_batches,
                                   shard_path, trajectory_schema)
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


def _write_compressible(directory, batches=8, rows=400, **kw):
    """Steps of sorted ids and contiguous positions, as a recorder writes them (so that a
    compressed body is much smaller than the raw columns); returns the expected columns."""
    rng = np.random.default_rng(5)
    expected = {"step": [], "example_id": [], "position": [], "logprob": []}
    with TrajectoryWriter(directory, dataset_fingerprint=DS, **kw) as w:
        for step in range(batches):
            eid = np.repeat(np.arange(step * 4, step * 4 + 4), rows // 4)
            pos = np.tile(np.arange(30, 30 + rows // 4), 4)
            lp = np.round(-rng.exponential(0.5, rows), 2).astype(np.float32)
            w.append(step, eid, pos, lp)
            for k, v in (("step", np.full(rows, step)), ("example_id", eid), ("position", pos),
                         ("logprob", lp)):
                expected[k].append(v)
    return {k: np.concatenate(v) for k, v in expected.items()}


def _body_offsets(path):
    """(start, end) of the body (the compressed buffers) of every record-batch message of
    an intact shard; a message ends with its body."""
    buf = pa.py_buffer(path.read_bytes())
    return [(e - pa.ipc.read_message(pa.BufferReader(buf[s:e])).body.size, e)
            for s, e, _ in shard_batches(buf)]


def test_compressed_shards_keep_every_check(tmp_path):
    """zstd bodies (the default): smaller, and a bit flip inside a compressed body, a torn
    compressed message and a rewind behave as in an uncompressed shard."""
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    expected = _write_compressible(plain, compression=None)
    assert _write_compressible(packed).keys() == expected.keys()
    path = shard_path(packed, 0)
    assert path.stat().st_size < 0.5 * shard_path(plain, 0).stat().st_size
    assert _same(TrajectoryReader(packed, dataset_fingerprint=DS).read(), expected)
    # a flip inside a compressed body is caught (or lands in padding and changes nothing),
    # sealed or not: the CRC is of the decoded values, so it does not matter whether
    # decompression itself fails
    data, spans = path.read_bytes(), _body_offsets(path)
    rng = np.random.default_rng(6)
    offsets = [int(rng.integers(s, e)) for s, e in spans for _ in range(6)]
    for sealed in (True, False):
        if not sealed:
            seal_path(path).unlink()
        for offset in offsets:
            try:
                table = _read_flipped(path, data, offset, rng, lambda: read_shard(
                    path, schema=trajectory_schema()))
            except ShardCorruption as exc:
                assert str(path) in str(exc) and "byte" in str(exc)
                continue
            assert _same(table, expected), f"a flip at byte {offset} changed values silently"
    # a compressed message cut short at the end is a torn tail: dropped, then appended to
    path.write_bytes(data[: spans[-1][1] - 50])
    with pytest.warns(RuntimeWarning, match="torn tail"):
        table = read_shard(path, schema=trajectory_schema())
    assert _same(table, {k: v[:7 * 400] for k, v in expected.items()})
    with pytest.warns(RuntimeWarning, match="dropping a torn tail"):
        w = TrajectoryWriter(packed, dataset_fingerprint=DS)
    assert w.rewind(5) == 2 * 400                 # steps 5 and 6 (7 was the torn tail)
    w.append(5, [1], [2], [-0.5])
    w.close()
    table = TrajectoryReader(packed, dataset_fingerprint=DS).read()
    assert table.num_rows == 5 * 400 + 1 and table.column("step").to_pylist()[-1] == 5
    with pytest.raises(ValueError, match="compression must be"):
        TrajectoryWriter(tmp_path / "x", dataset_fingerprint=DS, compression="gzip")


def test_uncompressed_stores_are_still_read_and_continued(tmp_path):
    """A store in the format before compression (``compression=None`` writes it byte for
    byte) reads as before; a writer appends compressed messages to it, and the mixed
    shard keeps its checks."""
    expected = _write_compressible(tmp_path, batches=4, compression=None)
    path = shard_path(tmp_path, 0)
    raw = sum(v.nbytes for v in (expected["step"].astype(np.int32), expected["example_id"],
                                 expected["position"].astype(np.int32), expected["logprob"]))
    assert path.stat().st_size > raw  # nothing compressed
    with pa.ipc.open_stream(str(path)) as stream:  # still a plain Arrow stream
        assert stream.read_all().num_rows == 4 * 400
    assert _same(TrajectoryReader(tmp_path, dataset_fingerprint=DS).read(), expected)
    old_size = path.stat().st_size
    more = _write_compressible(tmp_path / "more", batches=8)  # the rows to append
    with TrajectoryWriter(tmp_path, dataset_fingerprint=DS) as w:  # zstd by default
        for step in range(4, 8):
            keep = more["step"] == step
            w.append(step, more["example_id"][keep], more["position"][keep],
                     more["logprob"][keep])
    assert path.stat().st_size - old_size < 0.5 * old_size
    both = {k: np.concatenate([expected[k], more[k][more["step"] >= 4]]) for k in expected}
    assert _same(TrajectoryReader(tmp_path, dataset_fingerprint=DS).read(), both)
    with TrajectoryWriter(tmp_path, dataset_fingerprint=DS) as w:  # rewind across the mix
        assert w.rewind(3) == 5 * 400
    assert _same(TrajectoryReader(tmp_path, dataset_fingerprint=DS).read(),
                 {k: v[:3 * 400] for k, v in expected.items()})


def test_a_missing_codec_is_named_not_called_damage(tmp_path, monkeypatch):
    """Reading a zstd shard with a pyarrow built without zstd says what to install."""
    _write_compressible(tmp_path, batches=2)

    def no_codec(*args, **kwargs):
        raise pa.ArrowNotImplementedError("Support for codec 'zstd' not built")

    monkeypatch.setattr(pa.ipc, "open_stream", no_codec)
    monkeypatch.setattr(shards, "codec_available", lambda name: name != "zstd")
    with pytest.raises(ValueError, match="pyarrow built with zstd") as info:
        TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    assert not isinstance(info.value, ShardCorruption)
