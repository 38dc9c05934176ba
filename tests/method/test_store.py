"""Trajectory store: crash safety, shards, fingerprints and the visit queries."""

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from t3s.trajectory.queries import first_visit, nearest_visit, visits
from t3s.trajectory.manifest import MANIFEST_NAME
from t3s.trajectory.reader import TrajectoryReader
from t3s.trajectory.shards import read_shard, seal_path, shard_path
from t3s.trajectory.writer import TrajectoryWriter

DS = "dataset-sha256:abc"


def _records(rng, n_batches, n_rows=5, n_examples=4, n_positions=6):
    """Random append arguments: (step, example_id, position, logprob) per batch."""
    out = []
    for step in range(n_batches):
        out.append((step, rng.integers(0, n_examples, n_rows), rng.integers(1, n_positions, n_rows),
                    -rng.random(n_rows).astype(np.float32)))
    return out


def _write(directory, records, **kw):
    with TrajectoryWriter(directory, dataset_fingerprint=DS, **kw) as w:
        for r in records:
            w.append(*r)
        return w.path


def _expected_table(records):
    step = np.concatenate([np.full(len(r[1]), r[0]) for r in records]) if records else []
    cat = (lambda i: np.concatenate([r[i] for r in records])) if records else (lambda i: [])
    return {"step": np.asarray(step, np.int32), "example_id": np.asarray(cat(1), np.int64),
            "position": np.asarray(cat(2), np.int32), "logprob": np.asarray(cat(3), np.float32)}


def _assert_table(table, expected):
    for name, values in expected.items():
        np.testing.assert_array_equal(table.column(name).to_numpy(), values, err_msg=name)


def test_round_trip_is_a_standard_arrow_stream(tmp_path):
    rng = np.random.default_rng(0)
    records = _records(rng, 4)
    path = _write(tmp_path, records, tokenizer_fingerprint="tok", model_id="m")
    assert path == shard_path(tmp_path, 0) and path.name == "traj-rank00000.arrow"
    # Any Arrow reader opens the shard: it is one plain IPC stream.
    with pa.ipc.open_stream(pa.OSFile(str(path))) as reader:
        _assert_table(reader.read_all(), _expected_table(records))
    store = TrajectoryReader(tmp_path, dataset_fingerprint=DS, tokenizer_fingerprint="tok")
    _assert_table(store.read(), _expected_table(records))
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["dataset_fingerprint"] == DS and manifest["model_id"] == "m"
    assert manifest["tokenizer_fingerprint"] == "tok" and manifest["created"]
    np.testing.assert_array_equal(store.steps(), [0, 1, 2, 3])


def test_torn_tail_is_skipped_and_append_resumes(tmp_path):
    rng = np.random.default_rng(1)
    records = _records(rng, 3)
    path = _write(tmp_path, records)
    full = path.stat().st_size
    # The last message alone, to cut through its middle.
    with TrajectoryWriter(tmp_path / "probe", dataset_fingerprint=DS) as w:
        before = w.path.stat().st_size
        w.append(*records[-1])
        last_len = w.path.stat().st_size - before
    with open(path, "r+b") as f:
        f.truncate(full - last_len // 2)
    seal_path(path).unlink()  # a killed writer never seals its shard

    with pytest.warns(RuntimeWarning, match="torn tail"):
        table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    _assert_table(table, _expected_table(records[:-1]))

    # Decision: a writer reopening the shard (mode='append') drops the torn tail
    # and continues, so the shard is again one valid stream.
    more = _records(rng, 2)
    with pytest.warns(RuntimeWarning, match="dropping a torn tail"):
        _write(tmp_path, more)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
        with pa.ipc.open_stream(pa.OSFile(str(path))) as reader:
            assert reader.read_all().num_rows == table.num_rows
    _assert_table(table, _expected_table(records[:-1] + more))

    # mode='overwrite' starts afresh.
    _write(tmp_path, more[:1], mode="overwrite")
    _assert_table(TrajectoryReader(tmp_path, dataset_fingerprint=DS).read(),
                  _expected_table(more[:1]))


def test_every_truncation_point_keeps_exactly_the_complete_records(tmp_path):
    rng = np.random.default_rng(2)
    records = _records(rng, 3, n_rows=3)
    sizes = []
    with TrajectoryWriter(tmp_path / "src", dataset_fingerprint=DS) as w:
        sizes.append(w.path.stat().st_size)
        for r in records:
            w.append(*r)
            sizes.append(w.path.stat().st_size)
        data = w.path.read_bytes()
    cut_path = tmp_path / "cut.arrow"
    for cut in range(len(data) + 1):
        cut_path.write_bytes(data[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = read_shard(cut_path)
        complete = sum(s <= cut for s in sizes[1:])
        _assert_table(table, _expected_table(records[:complete]))
        torn = cut not in sizes and cut != 0
        assert bool(caught) == torn, cut


def test_rank_shards_are_merged(tmp_path):
    rng = np.random.default_rng(3)
    per_rank = {r: _records(rng, 2, n_rows=4) for r in range(3)}
    for rank, records in per_rank.items():
        _write(tmp_path, records, rank=rank)
    assert sorted(p.name for p in tmp_path.glob("*.arrow")) == [
        "traj-rank00000.arrow", "traj-rank00001.arrow", "traj-rank00002.arrow"]
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    _assert_table(table, _expected_table(per_rank[0] + per_rank[1] + per_rank[2]))

    # A token visited on two ranks: the nearest visit comes from either shard.
    d = tmp_path / "two"
    _write(d, [(2, [7], [3], [-2.0])], rank=0)
    _write(d, [(5, [7], [3], [-5.0])], rank=1)
    store = TrajectoryReader(d, dataset_fingerprint=DS)
    assert store.nearest(4).column("logprob").to_pylist() == [-5.0]
    assert store.nearest(3).column("logprob").to_pylist() == [-2.0]
    assert store.first().column("step").to_pylist() == [2]


def test_store_from_another_dataset_is_refused(tmp_path):
    _write(tmp_path, [(0, [1], [1], [-1.0])], tokenizer_fingerprint="tok-a")
    with pytest.raises(ValueError, match="dataset"):
        TrajectoryReader(tmp_path, dataset_fingerprint="another-dataset")
    with pytest.raises(ValueError, match="dataset"):
        TrajectoryWriter(tmp_path, dataset_fingerprint="another-dataset", rank=1)
    with pytest.raises(ValueError, match="tokenizer"):
        TrajectoryReader(tmp_path, dataset_fingerprint=DS, tokenizer_fingerprint="tok-b")
    with pytest.raises(ValueError, match="not a trajectory store"):
        TrajectoryReader(tmp_path / "missing", dataset_fingerprint=DS)
    # None skips the check explicitly.
    assert TrajectoryReader(tmp_path, dataset_fingerprint=None).num_rows == 1


def test_nearest_visit_ties_and_duplicates():
    table = pa.table({
        "step": pa.array([2, 6, 0, 10, 4, 4, 3], pa.int32()),
        "example_id": pa.array([1, 1, 2, 2, 3, 3, 3], pa.int64()),
        "position": pa.array([5, 5, 1, 1, 2, 2, 2], pa.int32()),
        "logprob": pa.array([-2, -6, -0.5, -10, -4, -4.5, -3], pa.float32()),
    })
    near4 = nearest_visit(table, 4)
    # token (1,5): steps 2 and 6 tie at distance 2 -> the earlier step 2.
    # token (2,1): steps 0 and 10 -> 0. token (3,2): step 4 twice -> the row written last.
    assert near4.column("example_id").to_pylist() == [1, 2, 3]
    assert near4.column("step").to_pylist() == [2, 0, 4]
    assert near4.column("logprob").to_pylist() == [-2, -0.5, -4.5]
    assert nearest_visit(table, 5).column("step").to_pylist() == [6, 0, 4]
    assert nearest_visit(table, 8).column("step").to_pylist() == [6, 10, 4]
    far = nearest_visit(table, 8, max_distance=2)
    assert list(zip(far.column("example_id").to_pylist(), far.column("step").to_pylist())) == [
        (1, 6), (2, 10)]
    first = first_visit(table)
    assert first.column("step").to_pylist() == [2, 0, 3]


@pytest.mark.parametrize("query", [0, 3, 7, 50])
def test_queries_match_a_brute_force_reference(query):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
    n = 400
    table = pa.table({
        "step": pa.array(rng.integers(0, 12, n), pa.int32()),
        "example_id": pa.array(rng.integers(0, 5, n), pa.int64()),
        "position": pa.array(rng.integers(1, 8, n), pa.int32()),
        "logprob": pa.array(-rng.random(n), pa.float32()),
    })
    rows = list(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    best, first = {}, {}
    for i, (step, eid, pos, lp) in enumerate(rows):
        key = (eid, pos)
        # nearest: smaller distance, then earlier step, then later row
        rank = (abs(step - query), step, -i)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, step, lp)
        if key not in first or (step, -i) < first[key][0]:
            first[key] = ((step, -i), step, lp)
    cols = ("example_id", "position", "step", "logprob")
    near = nearest_visit(table, query)
    got = {(e, p): (s, lp) for e, p, s, lp in zip(*(near.column(c).to_pylist() for c in cols))}
    assert got == {k: v[1:] for k, v in best.items()}
    keys = list(zip(near.column("example_id").to_pylist(), near.column("position").to_pylist()))
    assert keys == sorted(keys)
    fv = first_visit(table)
    got = {(e, p): (s, lp) for e, p, s, lp in zip(*(fv.column(c).to_pylist() for c in cols))}
    assert got == {k: v[1:] for k, v in first.items()}
    v = visits(table)
    order = list(zip(*(v.column(c).to_pylist() for c in ("example_id", "position", "step"))))
    assert order == sorted(order) and v.num_rows == n


def test_extra_columns_locking_and_validation(tmp_path):
    with TrajectoryWriter(tmp_path, dataset_fingerprint=DS, extra_columns=("entropy",),
                          fsync=True) as w:
        w.append(3, torch.tensor([4, 4]), np.array([1, 2]), [-1.0, -2.0], entropy=[0.5, 0.25])
        with pytest.raises(RuntimeError, match="another writer"):
            TrajectoryWriter(tmp_path, dataset_fingerprint=DS, extra_columns=("entropy",))
        with pytest.raises(ValueError, match="extra columns"):
            w.append(3, [1], [1], [-1.0])
        with pytest.raises(ValueError, match="shape"):
            w.append(3, [1, 2], [1], [-1.0, -2.0], entropy=[0.0, 0.0])
        assert w.append(3, [], [], [], entropy=[]) == 0
    assert w.closed
    with pytest.raises(RuntimeError, match="closed"):
        w.append(0, [1], [1], [-1.0], entropy=[0.0])
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    assert table.column("entropy").to_pylist() == [0.5, 0.25]
    assert table.column("step").to_pylist() == [3, 3]
    with pytest.raises(ValueError, match="extra columns"):
        TrajectoryWriter(tmp_path, dataset_fingerprint=DS, rank=1)
    with pytest.raises(ValueError, match="clash"):
        TrajectoryWriter(tmp_path / "x", dataset_fingerprint=DS, extra_columns=("logprob",))


def test_empty_store_reads_as_empty(tmp_path):
    TrajectoryWriter(tmp_path, dataset_fingerprint=DS).close()
    store = TrajectoryReader(tmp_path, dataset_fingerprint=DS)
    assert store.num_rows == 0
    assert store.nearest(3).num_rows == 0 and store.first().num_rows == 0
    assert os.path.getsize(shard_path(tmp_path, 0)) > 0  # the schema message
