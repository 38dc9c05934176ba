"""TrajectoryRecorder: token keys of padded and packed batches, async writing, errors."""

import numpy as np
import pytest
import torch

from t3s.data import token_keys
from t3s.trajectory.recorder import TrajectoryRecorder
from t3s.trajectory.reader import TrajectoryReader
from t3s.trajectory.writer import TrajectoryWriter
from t3s_kernels import linear_cross_entropy

DS = "ds-recorder"
I = -100  # ignore_index


def _keys(rows, cols, eid, pos):
    return list(zip(rows.tolist(), cols.tolist(), eid.tolist(), pos.tolist()))


def test_padded_batch_keys_right_padding():
    # input_ids:   row 0 = p p r r r <pad>,  row 1 = p r r <pad> <pad> <pad>
    labels = torch.tensor([[I, I, 11, 12, 13, I],
                           [I, 21, 22, I, I, I]])
    # (row, hidden index predicting the target, example id, target position)
    expected = [(0, 1, 100, 2), (0, 2, 100, 3), (0, 3, 100, 4),
                (1, 0, 200, 1), (1, 1, 200, 2)]
    assert _keys(*token_keys(labels, [100, 200])) == expected
    am = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    assert _keys(*token_keys(labels, torch.tensor([100, 200]), attention_mask=am)) == expected
    # A 1-D sequence is one row.
    assert _keys(*token_keys(labels[1], [200])) == [(0, 0, 200, 1), (0, 1, 200, 2)]


def test_padded_batch_keys_left_padding_with_attention_mask():
    # row 0 = <pad> <pad> p r r, row 1 = p p p r r ; positions count attended tokens
    labels = torch.tensor([[I, I, I, 31, 32],
                           [I, I, I, 41, 42]])
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = [(0, 2, 7, 1), (0, 3, 7, 2), (1, 2, 8, 3), (1, 3, 8, 4)]
    assert _keys(*token_keys(labels, [7, 8], attention_mask=am)) == expected
    # A labelled first real token has no predecessor: it is never keyed.
    labels2 = labels.clone()
    labels2[0, 2] = 30
    assert _keys(*token_keys(labels2, [7, 8], attention_mask=am)) == expected


def test_packed_batch_keys():
    # Row 0 packs A (len 4) and B (len 3); row 1 packs C (len 2), D (len 3) and 2 pads
    # whose position ids are 0 (excluded through the attention mask).
    pid = torch.tensor([[0, 1, 2, 3, 0, 1, 2],
                        [0, 1, 0, 1, 2, 0, 0]])
    labels = torch.tensor([[I, I, 12, 13, 50, 51, 52],   # B's first token labelled on purpose
                           [I, 61, I, 71, 72, I, I]])
    am = torch.tensor([[1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    eids = [10, 11, 12, 13]
    expected = [(0, 1, 10, 2), (0, 2, 10, 3),             # A
                (0, 4, 11, 1), (0, 5, 11, 2),             # B (its position 0 is skipped)
                (1, 0, 12, 1),                            # C
                (1, 2, 13, 1), (1, 3, 13, 2)]             # D
    assert _keys(*token_keys(labels, eids, position_ids=pid, attention_mask=am)) == expected
    with pytest.raises(ValueError, match="packs 6 sequences"):
        token_keys(labels, eids, position_ids=pid)  # pads counted as sequences
    with pytest.raises(ValueError, match="packs 4 sequences"):
        token_keys(labels, eids[:3], position_ids=pid, attention_mask=am)


def test_packed_sequence_continuing_across_rows():
    # One long example E split over two rows, then F starts in row 1.
    pid = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    labels = torch.tensor([[I, 1, 2, 3], [4, 5, I, 9]])
    expected = [(0, 0, 5, 1), (0, 1, 5, 2), (0, 2, 5, 3),
                (1, 0, 5, 5),  # row 1 col 0 (position 4) has no in-row predecessor
                (1, 2, 6, 1)]
    assert _keys(*token_keys(labels, [5, 6], position_ids=pid)) == expected
    with pytest.raises(ValueError, match="before the first sequence start"):
        token_keys(labels[1:], [6], position_ids=pid[1:])


def _lce_stats(hidden, weight, labels, loss_mask=None):
    return linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], loss_mask=loss_mask,
                                return_stats=True, backend="torch")


def test_recorder_writes_token_stats_of_a_padded_batch(tmp_path):
    B, T, H, V = 3, 7, 8, 23
    weight = torch.randn(V, H)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = I
    labels[1, 5:] = I  # right padding
    eids = torch.tensor([40, 41, 42])
    # Anchors dropped from the loss (loss_mask 0) have NaN stats and are not recorded.
    loss_mask = torch.ones(B, T - 1)
    loss_mask[2, 3] = 0
    with TrajectoryRecorder(tmp_path, dataset_fingerprint=DS, extra_columns=("entropy",),
                            model_id="tiny") as rec:
        expected = {}
        for step in range(3):
            hidden = torch.randn(B, T, H)
            _, stats = _lce_stats(hidden, weight, labels, loss_mask)
            rec.record(step, stats, labels, eids)
            ref = torch.log_softmax(hidden[:, :-1] @ weight.T, -1)
            for b in range(B):
                for i in range(T - 1):
                    if labels[b, i + 1] != I and loss_mask[b, i] != 0:
                        expected[(step, int(eids[b]), i + 1)] = float(ref[b, i, labels[b, i + 1]])
        assert rec.steps_recorded == 3
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    got = {(s, e, p): lp for s, e, p, lp in zip(*(table.column(c).to_pylist() for c in
                                                  ("step", "example_id", "position", "logprob")))}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert np.all(np.isfinite(table.column("entropy").to_numpy()))
    assert (2, 42, 4) not in got  # the dropped anchor


def test_recorder_packed_batch_matches_unpacked(tmp_path):
    """Recording a packed batch gives the same rows as recording each sequence alone."""
    H, V = 8, 19
    weight = torch.randn(V, H)
    lengths, eids = [5, 3, 6], [7, 8, 9]
    seqs = [torch.randint(0, V, (n,)) for n in lengths]
    labs = [s.clone() for s in seqs]
    for lab in labs:
        lab[:1] = I
    # A per-token stand-in for a model: the hidden state depends on the token only,
    # so packed and unpacked runs give identical values.
    emb = torch.randn(V, H)
    packed_ids = torch.cat(seqs)[None]
    packed_labels = torch.cat(labs)[None]
    pid = torch.cat([torch.arange(n) for n in lengths])[None]
    with TrajectoryRecorder(tmp_path / "packed", dataset_fingerprint=DS) as rec:
        _, stats = _lce_stats(emb[packed_ids], weight, packed_labels)
        rec.record(0, stats.target_logprob, packed_labels, torch.tensor(eids), position_ids=pid)
    with TrajectoryRecorder(tmp_path / "alone", dataset_fingerprint=DS) as rec:
        for s, lab, e in zip(seqs, labs, eids):
            _, stats = _lce_stats(emb[s][None], weight, lab[None])
            rec.record(0, stats.target_logprob, lab[None], [e])
    a = TrajectoryReader(tmp_path / "packed", dataset_fingerprint=DS).first()
    b = TrajectoryReader(tmp_path / "alone", dataset_fingerprint=DS).first()
    # The packed values at sequence boundaries predict the next sequence's first
    # token; they must not appear.
    assert a.num_rows == sum(n - 1 for n in lengths) == b.num_rows
    assert a.column("example_id").to_pylist() == b.column("example_id").to_pylist()
    assert a.column("position").to_pylist() == b.column("position").to_pylist()
    np.testing.assert_allclose(a.column("logprob").to_numpy(), b.column("logprob").to_numpy(),
                               atol=1e-6)


def test_values_of_full_width_and_shape_errors(tmp_path):
    labels = torch.tensor([[I, 3, 4]])
    with TrajectoryRecorder(tmp_path, dataset_fingerprint=DS) as rec:
        # [B, T] values: the last column is ignored.
        rec.record(0, torch.tensor([[-1.0, -2.0, -99.0]]), labels, [1])
        with pytest.raises(ValueError, match=r"\[B, T-1\] or \[B, T\]"):
            rec.record(0, torch.zeros(1, 5), labels, [1])
        with pytest.raises(TypeError, match="Python int"):
            rec.record(torch.tensor(1), torch.zeros(1, 2), labels, [1])
        with pytest.raises(ValueError, match="extras"):
            rec.record(0, torch.zeros(1, 2), labels, [1], extras={"entropy": torch.zeros(1, 2)})
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    assert table.column("position").to_pylist() == [1, 2]
    assert table.column("logprob").to_pylist() == [-1.0, -2.0]


def test_writer_thread_errors_surface_on_the_next_call(tmp_path):
    writer = TrajectoryWriter(tmp_path, dataset_fingerprint=DS)
    calls = []

    def failing_append(*args, **kw):
        calls.append(args)
        raise OSError("disk full")

    writer.append = failing_append
    rec = TrajectoryRecorder(writer)
    labels = torch.tensor([[I, 1, 2]])
    rec.record(0, torch.zeros(1, 2), labels, [3])
    with pytest.raises(RuntimeError, match="disk full") as info:
        rec.flush()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="disk full"):
        rec.record(1, torch.zeros(1, 2), labels, [3])
    rec.close()  # already reported: closes quietly
    assert writer.closed and len(calls) == 1


def test_mapping_errors_surface_on_close(tmp_path):
    rec = TrajectoryRecorder(tmp_path, dataset_fingerprint=DS)
    # Two example ids for one row: detected in the writer thread.
    rec.record(0, torch.zeros(1, 2), torch.tensor([[I, 1, 2]]), [3, 4])
    assert not rec.closed
    with pytest.raises(RuntimeError, match="one example id per row") as info:
        rec.close()
    assert rec.closed
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(RuntimeError, match="closed"):
        rec.record(1, torch.zeros(1, 2), torch.tensor([[I, 1, 2]]), [3])


def test_context_manager_does_not_mask_the_training_error(tmp_path):
    with pytest.raises(KeyError, match="from training"), \
            pytest.warns(RuntimeWarning, match="one example id per row"):
        with TrajectoryRecorder(tmp_path, dataset_fingerprint=DS) as rec:
            rec.record(0, torch.zeros(1, 2), torch.tensor([[I, 1, 2]]), [3, 4])
            raise KeyError("from training")


def test_record_returns_before_the_write_and_bounds_the_queue(tmp_path):
    import threading

    gate = threading.Event()
    writer = TrajectoryWriter(tmp_path, dataset_fingerprint=DS)
    real_append = writer.append

    def slow_append(*args, **kw):
        gate.wait(10)
        return real_append(*args, **kw)

    writer.append = slow_append
    rec = TrajectoryRecorder(writer, max_queue=2)
    labels = torch.tensor([[I, 1, 2]])
    values = torch.tensor([[-1.0, -2.0]])
    for step in range(3):  # one in the thread, two queued
        rec.record(step, values, labels, [5])
    values.fill_(0.0)  # the recorder holds its own copy
    assert writer.rows_written == 0
    blocked = threading.Thread(target=rec.record, args=(3, values, labels, [5]))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the queue is full: record waits
    gate.set()
    blocked.join(10)
    rec.close()
    table = TrajectoryReader(tmp_path, dataset_fingerprint=DS).read()
    assert table.column("step").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert table.column("logprob").to_pylist()[:6] == [-1.0, -2.0] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recorder_on_cuda_matches_cpu(tmp_path):
    B, T, H, V = 4, 33, 16, 101
    weight = torch.randn(V, H, device="cuda")
    hidden = torch.randn(B, T, H, device="cuda")
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :3] = I
    eids = torch.arange(B, device="cuda") + 1000
    _, stats = linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], return_stats=True)
    with TrajectoryRecorder(tmp_path / "gpu", dataset_fingerprint=DS) as rec:
        rec.record(0, stats, labels, eids)
    with TrajectoryRecorder(tmp_path / "cpu", dataset_fingerprint=DS) as rec:
        rec.record(0, stats.target_logprob.cpu(), labels.cpu(), eids.cpu())
    a = TrajectoryReader(tmp_path / "gpu", dataset_fingerprint=DS).read()
    b = TrajectoryReader(tmp_path / "cpu", dataset_fingerprint=DS).read()
    assert a.equals(b) and a.num_rows == B * (T - 3)
